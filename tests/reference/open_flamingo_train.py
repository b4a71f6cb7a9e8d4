"""open_flamingo's training step, transcribed for tests/reference/test_flamingo_trajectory.py
(test code, not product code). Source: mlfoundations/open_flamingo commit
655f693fbfa04cd6e9a987d960654624d48917cf:

* ``src/flamingo_lm.py`` ``FlamingoLayer``: the gated cross-attention block (conditioned on the
  media and media locations), then the LM's own decoder layer; ``FlamingoLMMixin.init_flamingo``
  puts one before every ``cross_attn_every_n_layers``-th layer (``(i + 1) % n == 0``);
* ``src/flamingo.py`` ``Flamingo.forward``: ``_encode_vision_x`` (the vision encoder's tokens,
  (b, T, 1, v, d), through the perceiver) and ``_condition_media_locations`` (``lang_x ==
  media_token_id``), then ``lang_encoder(input_ids, attention_mask, labels)``;
* ``src/factory.py``: everything frozen but the perceiver and the gated layers
  (``freeze_lm_embeddings=True``);
* ``train/train_utils.py`` ``train_one_epoch`` (the mmc4 pass): labels = input ids with pad and
  ``<image>`` set to -100 (and tokens before the first ``<image>`` / between an
  ``<|endofchunk|>`` and the next ``<image>``: none in these sequences), ``loss.backward()``,
  ``clip_grad_norm_(model.parameters(), 1.0)``, ``optimizer.step()``, ``lr_scheduler.step()``;
* ``train/train.py``: ``AdamW`` over ``get_grouped_params`` (weight decay only on params named
  ``gated_cross_attn``, none on the perceiver), ``get_cosine_schedule_with_warmup``.

The vision encoder is frozen: the test feeds its tokens (fmjax's tower on the same images).
The blocks themselves are tests/reference/open_flamingo_helpers.py.
"""
import math

import torch
from torch import nn

import open_flamingo_helpers as of


class FlamingoLayer(nn.Module):
    def __init__(self, gated_cross_attn_layer, decoder_layer):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.vis_x = self.media_locations = None

    def forward(self, lang_x, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            lang_x = self.gated_cross_attn_layer(lang_x, self.vis_x, self.media_locations)
        return self.decoder_layer(lang_x, *args, **kwargs)


class Flamingo(nn.Module):
    """A GPT-2 (transformers) as ``lang_encoder`` with gated layers, and the perceiver."""

    def __init__(self, lang_encoder, dim_visual, media_token_id, cross_attn_every_n_layers=1,
                 heads=8, dim_head=64, ff_mult=4, perceiver_depth=6, perceiver_heads=8,
                 perceiver_dim_head=64, num_latents=64):
        super().__init__()
        self.media_token_id = media_token_id
        self.perceiver = of.PerceiverResampler(dim=dim_visual, depth=perceiver_depth,
                                               dim_head=perceiver_dim_head, heads=perceiver_heads,
                                               num_latents=num_latents)
        self.lang_encoder = lang_encoder
        width = lang_encoder.config.n_embd
        blocks = lang_encoder.transformer.h
        self.gated_cross_attn_layers = nn.ModuleList([
            of.GatedCrossAttentionBlock(dim=width, dim_visual=dim_visual, dim_head=dim_head,
                                        heads=heads, ff_mult=ff_mult)
            if (i + 1) % cross_attn_every_n_layers == 0 else nn.Identity()
            for i in range(len(blocks))])
        lang_encoder.transformer.h = nn.ModuleList([
            FlamingoLayer(g if isinstance(g, of.GatedCrossAttentionBlock) else None, b)
            for g, b in zip(self.gated_cross_attn_layers, blocks)])
        self.requires_grad_(False)                      # factory.py
        self.perceiver.requires_grad_(True)
        self.gated_cross_attn_layers.requires_grad_(True)

    def forward(self, vis_tokens, input_ids, attention_mask, labels):
        vis_x = self.perceiver(vis_tokens)              # (b, T, n, d)
        for layer in self.lang_encoder.transformer.h:
            layer.vis_x, layer.media_locations = vis_x, input_ids == self.media_token_id
        out = self.lang_encoder(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        for layer in self.lang_encoder.transformer.h:
            layer.vis_x = layer.media_locations = None
        return out.loss


def labels_of(input_ids, pad_token_id, media_token_id):
    labels = input_ids.clone()
    labels[labels == pad_token_id] = -100
    labels[labels == media_token_id] = -100
    return labels


def optimizer_and_schedule(model, lr, weight_decay, warmup, total):
    params_to_optimize = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with_wd = [p for n, p in params_to_optimize if "gated_cross_attn" in n]
    without = [p for n, p in params_to_optimize if "gated_cross_attn" not in n]
    opt = torch.optim.AdamW([{"params": with_wd, "weight_decay": weight_decay},
                             {"params": without, "weight_decay": 0.0}], lr=lr)

    def lr_lambda(step):  # transformers.get_cosine_schedule_with_warmup
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(model, optimizer, scheduler, vis_tokens, input_ids, attention_mask, labels):
    loss = model(vis_tokens, input_ids, attention_mask, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
