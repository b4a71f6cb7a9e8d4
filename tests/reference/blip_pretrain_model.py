"""A minimal PyTorch transcription of salesforce/BLIP's pre-training model, for
tests/reference/test_blip_trajectory.py (test code, not product code).

Source: salesforce/BLIP commit 056a169437371659074aa2732649d5de3bffb4a8 (``models/blip_pretrain.py``
``BLIP_Pretrain``, ``models/med.py`` ``BertEmbeddings`` ... ``BertLMHeadModel``, ``models/vit.py``
``VisionTransformer``). Kept: absolute position embeddings, the additive -10000 attention
masks of ``get_extended_attention_mask`` (causal for the decoder), ``mode='text'`` skipping the
cross-attention, the LM loss with ``label_smoothing=0.1`` on ``[:, :-1]`` vs ``[:, 1:]``,
``tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention')`` (here: the
decoder's layers hold the encoder's ``crossattention`` / ``intermediate`` / ``output`` modules and
its embeddings; only ``attention`` is its own) and HF's tie of the LM decoder to the word
embedding, the momentum pairs, ``copy_params``, ``_momentum_update``, ``_dequeue_and_enqueue``
(one process: no all_gather) and ``forward``. Changed: the tokenizer (token ids and the
attention mask come in), dropout 0, and ``torch.multinomial(weights[b], 1)`` is the Gumbel-max
draw ``argmax(log(weights[b]) + g[b])`` with the noise ``g`` given, so that fmjax's draws can be
replayed (the same distribution).
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import timm032_blocks as tb


class VisionTransformer(nn.Module):
    """models/vit.py: patch embed, class token, learned pos_embed, pre-norm blocks (qkv bias,
    LayerNorm eps 1e-6), final norm; returns every token."""

    def __init__(self, img_size, patch_size, width, depth, heads):
        super().__init__()
        self.patch_embed = tb.PatchEmbed(img_size, patch_size, 3, width)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([tb.Block(width, heads, 4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(width)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embed[:, :x.size(1)]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1])[None]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))


class BertSelfAttention(nn.Module):
    def __init__(self, c, is_cross_attention):
        super().__init__()
        self.h, self.d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        kv_width = c.encoder_width if is_cross_attention else c.hidden_size
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(kv_width, c.hidden_size)
        self.value = nn.Linear(kv_width, c.hidden_size)

    def split(self, x):
        return x.view(*x.shape[:-1], self.h, self.d).permute(0, 2, 1, 3)

    def forward(self, hidden, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        q = self.split(self.query(hidden))
        if encoder_hidden_states is not None:
            k = self.split(self.key(encoder_hidden_states))
            v = self.split(self.value(encoder_hidden_states))
            attention_mask = encoder_attention_mask
        else:
            k, v = self.split(self.key(hidden)), self.split(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        if attention_mask is not None:
            scores = scores + attention_mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.h * self.d)


class BertSelfOutput(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, hidden, inp):
        return self.LayerNorm(self.dense(hidden) + inp)


class BertAttention(nn.Module):
    def __init__(self, c, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(c, is_cross_attention)
        self.output = BertSelfOutput(c)

    def forward(self, hidden, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        return self.output(self.self(hidden, attention_mask, encoder_hidden_states,
                                     encoder_attention_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, inp):
        return self.LayerNorm(self.dense(x) + inp)


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = BertAttention(c)
        self.crossattention = BertAttention(c, is_cross_attention=True)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, hidden, attention_mask, encoder_hidden_states, encoder_attention_mask, mode):
        x = self.attention(hidden, attention_mask)
        if mode == "multimodal":
            x = self.crossattention(x, attention_mask, encoder_hidden_states, encoder_attention_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])


class BertModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)

    def forward(self, input_ids, attention_mask, encoder_hidden_states=None,
                encoder_attention_mask=None, mode="multimodal", is_decoder=False):
        # med.py get_extended_attention_mask (and the encoder mask's invert) in float32
        b, n = input_ids.shape
        dtype = self.embeddings.word_embeddings.weight.dtype
        if is_decoder:
            seq = torch.arange(n)
            causal = (seq[None, None, :].repeat(b, n, 1) <= seq[None, :, None]).to(attention_mask.dtype)
            ext = causal[:, None, :, :] * attention_mask[:, None, None, :]
        else:
            ext = attention_mask[:, None, None, :]
        ext = (1.0 - ext.to(dtype)) * -10000.0
        enc_ext = None
        if encoder_hidden_states is not None:
            enc_ext = (1.0 - encoder_attention_mask[:, None, None, :].to(dtype)) * -10000.0
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, ext, encoder_hidden_states, enc_ext, mode)
        return x


class BertLMHeadModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bert = BertModel(c)
        self.transform_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.transform_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                labels):
        h = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                      mode="multimodal", is_decoder=True)
        scores = self.decoder(self.transform_norm(F.gelu(self.transform_dense(h)))) + self.bias
        shifted = scores[:, :-1, :].contiguous()
        labels = labels[:, 1:].contiguous()
        loss_fct = nn.CrossEntropyLoss(reduction="mean", label_smoothing=0.1)
        return loss_fct(shifted.view(-1, scores.shape[-1]), labels.view(-1))

    def state_names(self):
        """The BLIP checkpoint names of this transcription's LM head params."""
        return {"transform_dense": "cls.predictions.transform.dense",
                "transform_norm": "cls.predictions.transform.LayerNorm",
                "decoder": "cls.predictions.decoder", "bias": "cls.predictions.bias"}


def tie(encoder: BertModel, decoder: BertModel):
    """tie_encoder_decoder_weights(encoder, decoder, '', '/attention'): everything but each
    layer's self-attention module is the encoder's."""
    decoder.embeddings = encoder.embeddings
    for le, ld in zip(encoder.encoder.layer, decoder.encoder.layer):
        ld.crossattention, ld.intermediate, ld.output = le.crossattention, le.intermediate, le.output


class BLIPPretrain(nn.Module):
    def __init__(self, image_size, patch, vision_width, vision_depth, vision_heads, bert: Cfg,
                 embed_dim, queue_size, momentum, temp):
        super().__init__()
        self.visual_encoder = VisionTransformer(image_size, patch, vision_width, vision_depth,
                                                vision_heads)
        self.text_encoder = BertModel(bert)
        text_width = bert.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.visual_encoder_m = VisionTransformer(image_size, patch, vision_width, vision_depth,
                                                  vision_heads)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(bert)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                            [self.vision_proj, self.vision_proj_m],
                            [self.text_encoder, self.text_encoder_m],
                            [self.text_proj, self.text_proj_m]]
        self.copy_params()
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.queue_size, self.momentum = queue_size, momentum
        self.temp = nn.Parameter(temp * torch.ones([]))
        self.text_decoder = BertLMHeadModel(bert)
        tie(self.text_encoder, self.text_decoder.bert)
        self.text_decoder.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.enc_token_id, self.bos_token_id, self.pad_token_id = (
            bert.vocab_size - 1, bert.vocab_size - 2, bert.pad_token_id)

    @torch.no_grad()
    def copy_params(self):
        for model, model_m in self.model_pairs:
            for p, p_m in zip(model.parameters(), model_m.parameters()):
                p_m.data.copy_(p.data)
                p_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        for model, model_m in self.model_pairs:
            for p, p_m in zip(model.parameters(), model_m.parameters()):
                p_m.data = p_m.data * self.momentum + p.data * (1. - self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat):
        n, ptr = image_feat.shape[0], int(self.queue_ptr)
        assert self.queue_size % n == 0
        self.image_queue[:, ptr:ptr + n] = image_feat.T
        self.text_queue[:, ptr:ptr + n] = text_feat.T
        self.queue_ptr[0] = (ptr + n) % self.queue_size

    def forward(self, image, input_ids, attention_mask, alpha, gumbel_t2i, gumbel_i2t):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_output = self.text_encoder(input_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_output[:, 0, :]), dim=-1)
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_output_m = self.text_encoder_m(input_ids, attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_output_m[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype)
            sim_targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        encoder_input_ids = input_ids.clone()
        encoder_input_ids[:, 0] = self.enc_token_id
        bs = image.size(0)
        output_pos = self.text_encoder(encoder_input_ids, attention_mask, image_embeds, image_atts)
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1) + 1e-4
            weights_t2i.fill_diagonal_(0)
            weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1) + 1e-4
            weights_i2t.fill_diagonal_(0)
        # torch.multinomial(weights[b], 1) -> Gumbel-max with the given noise (module docstring)
        neg_img = torch.argmax(torch.log(weights_t2i) + gumbel_t2i.to(weights_t2i.dtype), 1)
        neg_txt = torch.argmax(torch.log(weights_i2t) + gumbel_i2t.to(weights_i2t.dtype), 1)
        image_embeds_neg = torch.stack([image_embeds[int(i)] for i in neg_img], dim=0)
        text_ids_neg = torch.stack([encoder_input_ids[int(i)] for i in neg_txt], dim=0)
        text_atts_neg = torch.stack([attention_mask[int(i)] for i in neg_txt], dim=0)
        text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
        text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
        image_atts_all = torch.cat([image_atts, image_atts], dim=0)
        output_neg = self.text_encoder(text_ids_all, text_atts_all, image_embeds_all, image_atts_all)
        vl_embeddings = torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0)
        vl_output = self.itm_head(vl_embeddings)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
        loss_itm = F.cross_entropy(vl_output, itm_labels)

        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.bos_token_id
        decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == self.pad_token_id, -100)
        loss_lm = self.text_decoder(decoder_input_ids, attention_mask, image_embeds, image_atts,
                                    decoder_targets)
        return loss_ita, loss_itm, loss_lm

    def blip_state_dict(self):
        """The state dict under BLIP_Pretrain's own names (the LM head as ``cls.predictions``;
        the tied decoder entries included, as torch saves them)."""
        sd = {}
        for k, v in self.state_dict().items():
            if k.startswith("text_decoder.") and not k.startswith("text_decoder.bert."):
                mod, _, rest = k[len("text_decoder."):].partition(".")
                names = self.text_decoder.state_names()
                k = (f"text_decoder.{names[mod]}.{rest}" if rest else f"text_decoder.{names[mod]}")
            sd[k] = v
        return sd
