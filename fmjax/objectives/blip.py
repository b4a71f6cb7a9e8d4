"""BLIP pre-training (Li et al., 2022): ITC + ITM + LM on one image encoder and one MED.

Reference: salesforce/BLIP ``models/blip_pretrain.py`` ``BLIP_Pretrain.forward`` and
``pretrain.py`` ``train`` (commit 056a169437371659074aa2732649d5de3bffb4a8). Checked step by step by
tests/reference/test_blip_trajectory.py. ``loss = loss_ita + loss_itm + loss_lm``:

* **ITC with a momentum encoder and queues.** The momentum model (``extra['momentum']``: an EMA,
  ``momentum`` = 0.995 per step, of the image tower, ``vision_proj``, the text encoder's
  unimodal params and ``text_proj``) is updated FIRST, with the current params, then embeds the
  batch (``_momentum_update()`` then ``visual_encoder_m(image)``). Image->text similarities
  are against ``[momentum text features of the batch; text_queue]`` / temp (text->image
  likewise), the targets ``alpha * softmax(momentum similarities) + (1 - alpha) * one-hot``
  (momentum distillation), ``alpha = objective.alpha * min(1, step / alpha_ramp_steps)``
  (pretrain.py ramps over the first 2 epochs: ``alpha_ramp_steps`` = 2 x steps per epoch).
  Then the batch's momentum features replace the oldest queue entries at ``queue_ptr``
  (``queue_size`` a multiple of the global batch). ``temp`` is clamped to [0.001, 0.5] after
  each update (the reference clamps at the start of the next forward: the same values).
  The momentum text encoder keeps only what its text mode runs (embeddings, ``attn``,
  ``ffn``): BLIP's ``text_encoder_m`` also averages cross-attention weights it never uses.
* **ITM with hard negatives.** The image-grounded encoder (first token [ENC]) on the positive
  pairs, then on ``[(positive text, negative image); (negative text, positive image)]``: for
  each text one other image of the batch drawn with probability ``softmax(sim_t2i[:, :B]) +
  1e-4`` (its own image excluded), for each image one other text likewise (``torch.multinomial``
  there, ``jax.random.categorical`` here, over the GLOBAL batch: the reference draws within
  each GPU's batch). Cross-entropy of ``itm_head`` over 3B pairs, labels (1, 0, 0).
  ``objective.itm_exclude_key`` (default ''): a batch key (e.g. the ``attribute_id`` op's
  ``group``) whose equal values are not negatives either, as blip_retrieval.py masks pairs of
  the same image id: in the shapes data many scenes share their caption's every attribute, and
  drawn as "negatives" they teach the ITM head that matching captions often do not match.
* **LM.** The decoder (first token [DEC]) on the positive pairs: the cross-entropy of
  ``logits[:, :-1]`` against ``tokens[:, 1:]``, pad targets ignored, label smoothing
  ``lm_label_smoothing`` (med.py: 0.1), averaged over the non-pad targets.

Metrics: ``ita_loss``, ``itm_loss``, ``lm_loss``, ``itm_acc`` (over the 3B training pairs),
``i2t_acc`` (in-batch), ``temp``, ``alpha``. Hooks: ``features`` / ``text_features`` (ITC
embeddings), ``caption`` (greedy, the 'captioning' eval), ``match_scores`` (the 'itm' eval).
Gradient accumulation is refused (the ITC targets, the queue and the negatives couple the batch).

The optimizer is the config's: BLIP's pretrain.py runs AdamW over ``model.parameters()`` in one
group (``optimizer.decay_all=True``, the temperature included), a linear warm-up from
``warmup_lr`` (``warmup_init``) and a per-epoch step decay (``decay='multistep'``, ``gamma``
0.9 at each epoch's first step); configs/blip.py:base.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.data import text_ops
from fmjax.errors import ConfigError
from fmjax.models.clip import l2_normalize
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective
from fmjax.objectives.coca import greedy_captions
from fmjax.objectives.moco import dequeue_and_enqueue, momentum_update

TEMP_RANGE = (0.001, 0.5)
MOMENTUM_PARTS = ("image", "vision_proj", "text", "text_proj")


def _text_mode_params(text):
    """The MED params its text mode uses (drops the decoder's ``dec_attn``, ``cross`` and the LM
    head): what BLIP's momentum text encoder needs."""
    out = {}
    for k, v in text.items():
        if k == "lm_head":
            continue
        if k.startswith("layer_"):
            v = {n: p for n, p in v.items() if n in ("attn", "ffn")}
        out[k] = v
    return out


def momentum_params(params):
    """The momentum model's params (a copy of these parts of ``params``)."""
    out = {k: params[k] for k in MOMENTUM_PARTS}
    out["text"] = _text_mode_params(params["text"])
    return out


def soft_cross_entropy(logits, targets):
    """``-sum(log_softmax(logits) * targets, 1).mean()``."""
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), -1) * targets, -1))


def itc_loss(img, txt, img_m, txt_m, image_queue, text_queue, temp, alpha):
    """blip_pretrain.py's ITC: (loss_ita, sim_i2t, sim_t2i). ``img``/``txt`` [B, D] normalised
    features, ``*_m`` the momentum ones, queues [Q, D], ``temp`` the (clamped) temperature."""
    txt_all = jnp.concatenate([txt_m, text_queue], 0)
    img_all = jnp.concatenate([img_m, image_queue], 0)
    txt_all, img_all = jax.lax.stop_gradient(txt_all), jax.lax.stop_gradient(img_all)
    eye = jnp.eye(img.shape[0], txt_all.shape[0], dtype=jnp.float32)
    sim_i2t_m = img_m @ txt_all.T / temp
    sim_t2i_m = txt_m @ img_all.T / temp
    i2t_targets = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_i2t_m, 1) + (1 - alpha) * eye)
    t2i_targets = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_t2i_m, 1) + (1 - alpha) * eye)
    sim_i2t = img @ txt_all.T / temp
    sim_t2i = txt @ img_all.T / temp
    loss = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    return loss, sim_i2t, sim_t2i


def negative_weights(sim, same=None):
    """blip_pretrain.py: ``softmax(sim[:, :B], 1) + 1e-4`` with the diagonal zeroed (no grad).
    ``same`` (B, B) bool: pairs that are not negatives either (blip_retrieval.py's
    ``weights.masked_fill_(mask, 0)`` for equal image ids); a row left without any candidate
    keeps the diagonal-only mask."""
    b = sim.shape[0]
    w = jax.nn.softmax(jax.lax.stop_gradient(sim[:, :b]).astype(jnp.float32), 1) + 1e-4
    eye = jnp.eye(b, dtype=bool)
    if same is not None:
        excluded = same | eye
        empty = jnp.all(excluded, axis=1, keepdims=True)
        return jnp.where(jnp.where(empty, eye, excluded), 0.0, w)
    return jnp.where(eye, 0.0, w)


def sample_negatives(rng, weights):
    """One index per row of ``weights`` [B, B] drawn with probability proportional to it
    (``torch.multinomial(weights[b], 1)``), by the Gumbel-max trick:
    ``argmax(log(weights) + gumbel(rng, (B, B)), 1)`` (zero weights are never drawn)."""
    noise = jax.random.gumbel(rng, weights.shape, jnp.float32)
    return jnp.argmax(jnp.log(weights) + noise, axis=-1)


def smoothed_lm_loss(logits, tokens, pad_id: int, smoothing: float):
    """med.py ``BertLMHeadModel``: ``CrossEntropyLoss(label_smoothing)`` of ``logits[:, :-1]``
    against ``tokens[:, 1:]``, pad targets ignored (-100); (loss, token accuracy)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    per = (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, -1)
    mask = (targets != pad_id).astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    acc = ((jnp.argmax(logp, -1) == targets) * mask).sum() / n
    return (per * mask).sum() / n, acc


class BLIPObjective(Objective):
    batch_keys = ("image", "tokens")
    couples_examples = ("ITC over the batch and the queues, and ITM negatives drawn from the "
                        "batch")

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("image_text", "captioning", "image_text_matching"), "objective 'blip'",
                config.model.name)
        self.model.check_towers()
        self.patch_size = self.model.image_patch_size
        o = config.objective
        self.momentum = float(o.get("momentum", 0.995))
        self.alpha = float(o.get("alpha", 0.4))
        self.alpha_ramp_steps = int(o.get("alpha_ramp_steps", 0))
        self.queue_size = int(o.get("queue_size", 0))
        self.smoothing = float(o.get("lm_label_smoothing", 0.1))
        self.pad_id = int(self.model.pad_id)
        # blip_retrieval.py's idx: a batch key whose equal values are never ITM negatives
        self.itm_exclude_key = str(o.get("itm_exclude_key", "") or "")
        if self.itm_exclude_key:
            self.batch_keys = self.batch_keys + (self.itm_exclude_key,)
        self.enc_id, self.dec_id = self.model.special_ids

    def check(self, config):
        o = config.objective
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"config.objective.momentum={self.momentum} must be in [0, 1] "
                              "(BLIP: 0.995).")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"config.objective.alpha={self.alpha} must be in [0, 1] (BLIP: 0.4).")
        if self.alpha_ramp_steps < 0:
            raise ConfigError(f"config.objective.alpha_ramp_steps={self.alpha_ramp_steps} must be "
                              ">= 0 (BLIP: 2 epochs of steps).")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"config.objective.lm_label_smoothing={self.smoothing} must be in "
                              "[0, 1) (BLIP: 0.1).")
        batch = int(config.batch_size)
        if self.queue_size < 0 or (self.queue_size and self.queue_size % batch):
            k = max(1, round(self.queue_size / batch)) * batch
            raise ConfigError(f"config.objective.queue_size={o.get('queue_size')} must be >= 0 and "
                              f"a multiple of batch_size={batch} (BLIP asserts it), e.g. {k}.")
        if batch < 2:
            raise ConfigError(f"batch_size={batch}: BLIP's ITM draws each negative from the rest "
                              "of the batch; use batch_size >= 2.")
        tok = config.data.get("tokenize") or {}
        if not tok:
            raise ConfigError("objective 'blip' needs config.data.tokenize (the captions' tokenizer).")
        text_ops.check_vocab(config, self.model.vocab_size)
        vocab = text_ops.tokenizer_vocab_size(config)
        if vocab is not None and min(self.enc_id, self.dec_id) < vocab:
            raise ConfigError(
                f"BLIP's [ENC]/[DEC] ids {self.enc_id}/{self.dec_id} collide with the tokenizer's "
                f"{vocab} ids; set config.model.vocab_size >= {vocab + 2} (they default to the "
                "last two ids).")

    # -- state ------------------------------------------------------------------------------
    def init(self, rng, batch):
        p_rng, i_rng, t_rng = jax.random.split(rng, 3)
        params = self.model.init({"params": p_rng}, batch["image"], batch["tokens"])["params"]
        extra = {"momentum": momentum_params(params)}
        if self.queue_size:
            d = self.model.embed_dim
            # blip_pretrain.py: randn(embed_dim, queue_size) normalised along embed_dim.
            for name, key in (("image_queue", i_rng), ("text_queue", t_rng)):
                queue = l2_normalize(jax.random.normal(key, (self.queue_size, d), jnp.float32))
                extra[name] = nn.LogicallyPartitioned(queue, ("batch", None))
            extra["queue_ptr"] = jnp.zeros((), jnp.int32)
        return params, extra

    def after_model_init(self, params, extra):
        return {**extra, "momentum": momentum_params(params)}

    def alpha_at(self, step):
        if self.alpha_ramp_steps <= 0:
            return jnp.float32(self.alpha)
        return self.alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / self.alpha_ramp_steps)

    # -- loss -------------------------------------------------------------------------------
    def _apply(self, params, method, *args, rng=None, **kw):
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply({"params": params}, *args, method=getattr(self.model, method),
                                rngs=rngs, **kw)

    def loss(self, params, extra, batch, rng, step):
        images, tokens = batch["image"], batch["tokens"]
        b = tokens.shape[0]
        r_img, r_txt, r_pos, r_neg, r_lm, r_ni, r_nt = jax.random.split(rng, 7)
        temp = params["temp"].astype(jnp.float32)
        alpha = self.alpha_at(step)

        image_tokens, img = self._apply(params, "image_features", images, True, rng=r_img)
        img = l2_normalize(img.astype(jnp.float32))
        txt = l2_normalize(self._apply(params, "text_embedding", tokens, True,
                                       rng=r_txt).astype(jnp.float32))

        momentum = momentum_update(extra["momentum"], momentum_params(params),
                                   self.momentum, 1.0 - self.momentum)
        model_m = dict(momentum, temp=params["temp"])  # the model's setup declares temp
        img_m = l2_normalize(self._apply(model_m, "image_features", images, False)[1])
        txt_m = l2_normalize(self._apply(model_m, "text_embedding", tokens, False))
        img_m, txt_m = jax.lax.stop_gradient(img_m), jax.lax.stop_gradient(txt_m)
        new_extra = dict(extra, momentum=momentum)
        if self.queue_size:
            iq, tq = extra["image_queue"], extra["text_queue"]
        else:
            iq = tq = jnp.zeros((0, img.shape[-1]), jnp.float32)
        loss_ita, sim_i2t, sim_t2i = itc_loss(img, txt, img_m, txt_m, iq.astype(jnp.float32),
                                              tq.astype(jnp.float32), temp, alpha)
        if self.queue_size:
            ptr = extra["queue_ptr"]
            new_extra["image_queue"], new_ptr = dequeue_and_enqueue(iq, ptr, img_m)
            new_extra["text_queue"], _ = dequeue_and_enqueue(tq, ptr, txt_m)
            new_extra["queue_ptr"] = new_ptr

        # ITM: positives, then hard negatives drawn by the ITC similarities.
        enc = tokens.at[:, 0].set(self.enc_id)
        out_pos = self._apply(params, "itm_logits", image_tokens, enc, True, rng=r_pos)
        same = None
        if self.itm_exclude_key:
            group = batch[self.itm_exclude_key]
            same = group[:, None] == group[None, :]
        neg_image = sample_negatives(r_ni, negative_weights(sim_t2i, same))   # one image per text
        neg_text = sample_negatives(r_nt, negative_weights(sim_i2t, same))    # one text per image
        texts_all = jnp.concatenate([enc, enc[neg_text]], 0)
        images_all = jnp.concatenate([image_tokens[neg_image], image_tokens], 0)
        out_neg = self._apply(params, "itm_logits", images_all, texts_all, True, rng=r_neg)
        vl = jnp.concatenate([out_pos, out_neg], 0).astype(jnp.float32)
        labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
        logp = jax.nn.log_softmax(vl, -1)
        loss_itm = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], -1))
        itm_acc = jnp.mean(jnp.argmax(vl, -1) == labels)

        dec = tokens.at[:, 0].set(self.dec_id)
        logits = self._apply(params, "lm_logits", image_tokens, dec, True, rng=r_lm)
        loss_lm, lm_acc = smoothed_lm_loss(logits, dec, self.pad_id, self.smoothing)

        metrics = dict(ita_loss=loss_ita, itm_loss=loss_itm, lm_loss=loss_lm, itm_acc=itm_acc,
                       lm_token_accuracy=lm_acc, temp=temp, alpha=alpha,
                       i2t_acc=jnp.mean(jnp.argmax(sim_i2t[:, :b], 1) == jnp.arange(b)))
        return loss_ita + loss_itm + loss_lm, (metrics, new_extra)

    def project_params(self, params, step):
        """Clamp ``temp`` to [0.001, 0.5] (blip_pretrain.py's ``self.temp.clamp_``)."""
        params = dict(params)
        params["temp"] = jnp.clip(params["temp"], *TEMP_RANGE)
        return params

    # -- evaluation hooks -------------------------------------------------------------------
    def features(self, params, extra, images):
        return self.model.apply({"params": params}, images, method=self.model.encode_image)

    def text_features(self, params, extra, tokens):
        return self.model.apply({"params": params}, tokens, method=self.model.encode_text)

    def match_scores(self, params, extra, images, tokens):
        """P(match) of each (images[i], tokens[i]) pair by the ITM head, (B,)."""
        return self.model.apply({"params": params}, images, tokens,
                                method=self.model.match_probability)

    def caption(self, params, extra, images):
        return greedy_captions(self.model, self.config, params, images)


def make(config) -> BLIPObjective:
    return BLIPObjective(config)
