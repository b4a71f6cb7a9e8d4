"""Supervised classification: a ViT with a linear head, cross-entropy with label smoothing.

Fine-tuning options (``config.objective``; all off by default, and off the objective is what
it was before they existed, bit for bit):

- Mixup / CutMix, on device inside ``loss``: timm's ``timm/data/mixup.py`` ``Mixup`` in
  ``mode='batch'`` as facebookresearch/deit and /mae ``main_finetune.py`` use it
  (``cutmix_minmax=None``, ``correct_lam=True``). ``mixup_alpha`` / ``cutmix_alpha`` (> 0: on;
  DeiT / MAE: 0.8 / 1.0), ``mix_prob`` (timm's ``prob``, 1.0), ``switch_prob`` (0.5).
  Per (micro-)batch: with probability ``mix_prob`` mix; CutMix instead of mixup with
  probability ``switch_prob`` when both alphas are > 0; ``lam ~ Beta(alpha, alpha)``; mixup
  ``x = lam x + (1 - lam) x[::-1]``; CutMix pastes ``x[::-1]`` into timm's ``rand_bbox`` box
  (side ``int(H sqrt(1 - lam))``, centre uniform, clipped) and sets ``lam = 1 - box / (H W)``.
  Targets are timm's ``mixup_target``: ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` with
  ``label_smoothing`` (off value ``s / C``, on value ``1 - s + s / C``), the loss the soft-target
  cross-entropy (DeiT's ``SoftTargetCrossEntropy``). The draws come from the step's rng (split
  off the dropout rng only when mixing is on), so they are deterministic and resume exactly.
  The box is a mask from iota comparisons (no data-dependent shapes under jit). The batch is
  flipped over the whole (micro-)batch the step sees, not per device as torch's per-GPU loader.
  The box arithmetic is float32 (timm: float64). Train ``accuracy`` is against the unmixed
  labels; ``mix_lam`` logs the effective lam.
- EMA of the weights (timm ``ModelEmaV2`` / DeiT ``--model-ema``): ``ema_decay`` (> 0: on;
  DeiT 0.99996). ``extra = {'ema': params}`` (checkpointed and sharded with the state; starts
  as the init or the ``model_init``-loaded params), updated after every optimizer step as
  ``ema = decay * ema + (1 - decay) * params``, computed as ``ema + (1 - decay) * (params - ema)``
  (timm's newer ``lerp_``; in float32 it has no drift of ``decay + (1 - decay) != 1``).
  ``eval_metrics`` reports ``accuracy`` / ``top5`` of the trained params AND ``ema_accuracy`` /
  ``ema_top5`` of the EMA (timm's train.py evaluates both); ``predict`` and ``features`` (kNN,
  probes, a diffusion eval's classifier) use the EMA weights when it is on.

Model state (a backbone with ``state_collections``, e.g. TinyViT's BatchNorm running statistics,
``'batch_stats'``): ``extra[collection]`` starts as the model's init, the training forward pass
updates it (``mutable``; with ``grad_accum_steps`` K > 1 once per micro-batch, in order, as
torch's forward passes do) and evaluation reads it. With the EMA on, ``extra['ema_' +
collection]`` averages it as the weights are (timm's ``ModelEmaV2`` averages the buffers too)
and the EMA evaluations use it. A ``config.model_init`` checkpoint fills the params only: the
running statistics start from the init and follow the data from the first training step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fmjax.errors import ConfigError
from fmjax.models.registry import build_model, require, state_collections
from fmjax.objectives.base import Objective

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob")


# -- Mixup / CutMix (timm/data/mixup.py, mode='batch') -----------------------------------------

def sample_mix(rng, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
               switch_prob: float = 0.5, image_hw: tuple[int, int] = (1, 1)):
    """The random draws of timm ``Mixup._params_per_batch`` and ``rand_bbox`` (margin 0):
    ``(lam, use_cutmix, cy, cx)``; ``lam = 1`` and ``use_cutmix = False`` when the batch is
    not mixed (probability ``1 - prob``). ``cy, cx``: the box centre, uniform in
    ``[0, H)`` x ``[0, W)`` (drawn always, used only by CutMix)."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError("sample_mix needs mixup_alpha > 0 or cutmix_alpha > 0.")
    k_apply, k_switch, k_cut, k_mix, k_cy, k_cx = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
        lam_mix = jnp.where(use_cutmix, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha),
                            jax.random.beta(k_mix, mixup_alpha, mixup_alpha))
    elif mixup_alpha > 0:
        use_cutmix = jnp.zeros((), bool)
        lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    else:
        use_cutmix = jnp.ones((), bool)
        lam_mix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    lam = jnp.where(apply, lam_mix, 1.0).astype(jnp.float32)
    h, w = image_hw
    cy = jax.random.randint(k_cy, (), 0, h)
    cx = jax.random.randint(k_cx, (), 0, w)
    return lam, use_cutmix & apply, cy, cx


def cutmix_box(lam, cy, cx, image_hw: tuple[int, int]):
    """timm ``rand_bbox`` (margin 0) for a drawn centre, then ``cutmix_bbox_and_lam``'s
    ``correct_lam``: ``((yl, yh, xl, xh), lam)`` with ``lam = 1 - box area / (H W)``."""
    h, w = image_hw
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)   # int(): truncation, ratio >= 0
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    area = (yh - yl) * (xh - xl)
    lam = (h * w - area).astype(jnp.float32) / float(h * w)
    return (yl, yh, xl, xh), lam


def mixup_target(labels, num_classes: int, lam, smoothing: float = 0.0):
    """timm ``mixup_target``: ``lam * one_hot(y) + (1 - lam) * one_hot(y[::-1])`` with
    off value ``smoothing / C`` and on value ``1 - smoothing + smoothing / C``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = jnp.where(jax.nn.one_hot(labels, num_classes) > 0, on, off).astype(jnp.float32)
    y2 = y1[::-1]
    return y1 * lam + y2 * (1.0 - lam)


def apply_mix(images, labels, lam, use_cutmix, cy, cx, num_classes: int, smoothing: float = 0.0):
    """timm ``Mixup._mix_batch`` + ``mixup_target`` for given draws (``sample_mix``):
    ``(mixed images, soft targets [B, C], effective lam)``. Images are ``[B, H, W, C]``."""
    h, w = images.shape[1], images.shape[2]
    x = images.astype(jnp.float32)
    flipped = x[::-1]
    (yl, yh, xl, xh), lam_box = cutmix_box(lam, cy, cx, (h, w))
    rows = jax.lax.broadcasted_iota(jnp.int32, (h, w), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (h, w), 1)
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    cut = jnp.where(inside[None, :, :, None], flipped, x)
    mixed = x * lam + flipped * (1.0 - lam)
    out = jnp.where(use_cutmix, cut, mixed).astype(images.dtype)
    lam = jnp.where(use_cutmix, lam_box, lam)
    return out, mixup_target(labels, num_classes, lam, smoothing), lam


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params`` as ``ema + (1 - decay) * (params - ema)``."""
    rate = 1.0 - float(decay)
    return jax.tree.map(lambda e, p: e + rate * (p - e), ema, params)


class SupervisedObjective(Objective):
    batch_keys = ("image", "label")

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        self.num_classes = int(config.model.get("num_classes", 0))
        if self.num_classes <= 0:
            raise ValueError("objective 'supervised' needs config.model.num_classes > 0.")
        require(self.model, ("classifier", "pooled"), "objective 'supervised'", config.model.name, carries=True)
        self.state_keys = state_collections(self.model)   # e.g. ('batch_stats',): carried in extra
        self.patch_size = getattr(self.model, "patch_size", None)
        o = config.objective
        self.label_smoothing = float(o.get("label_smoothing", 0.0))
        self.mixup_alpha = float(o.get("mixup_alpha", 0.0) or 0.0)
        self.cutmix_alpha = float(o.get("cutmix_alpha", 0.0) or 0.0)
        self.mix_prob = float(o.get("mix_prob", 1.0))
        self.switch_prob = float(o.get("switch_prob", 0.5))
        self.ema_decay = float(o.get("ema_decay", 0.0) or 0.0)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check(self, config):
        o = config.objective
        for key in ("mixup_alpha", "cutmix_alpha"):
            if float(o.get(key, 0.0) or 0.0) < 0:
                raise ConfigError(f"config.objective.{key}={o.get(key)}; must be >= 0 (0: off, "
                                  "DeiT / MAE fine-tuning: mixup_alpha=0.8, cutmix_alpha=1.0).")
        for key, default in (("mix_prob", 1.0), ("switch_prob", 0.5)):
            v = float(o.get(key, default))
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"config.objective.{key}={v}; must be a probability in [0, 1].")
        decay = float(o.get("ema_decay", 0.0) or 0.0)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"config.objective.ema_decay={decay}; must be in [0, 1) (0: no EMA, "
                              "DeiT: 0.99996).")
        if self.mixing:
            micro = int(config.batch_size) // max(int(config.get("grad_accum_steps", 1)), 1)
            if micro % 2:
                raise ConfigError(f"mixup / cutmix pair each example with the batch reversed, so the "
                                  f"(micro-)batch must be even (timm asserts it); got {micro}: pick "
                                  "an even batch_size / grad_accum_steps.")

    def init(self, rng, batch):
        variables = self.model.init({"params": rng}, batch["image"])
        params = variables["params"]
        extra = {k: variables[k] for k in self.state_keys}
        if self.ema_decay > 0:
            extra.update(ema=params, **{f"ema_{k}": variables[k] for k in self.state_keys})
        return params, extra

    def after_model_init(self, params, extra):
        return {**extra, "ema": params} if self.ema_decay > 0 else extra  # EMA starts as the loaded params

    def after_update(self, params, extra, step):
        if self.ema_decay <= 0:
            return extra
        return dict(extra, ema=ema_update(extra["ema"], params, self.ema_decay),
                    **{f"ema_{k}": ema_update(extra[f"ema_{k}"], extra[k], self.ema_decay)
                       for k in self.state_keys})

    def inputs_and_targets(self, batch, rng):
        """(images, soft targets, metrics, dropout rng) of a training step: mixup / CutMix
        when on (their draws split off ``rng``), else the label-smoothed one-hot labels."""
        images, metrics = batch["image"], {}
        if self.mixing:
            rng, mix_rng = jax.random.split(rng)
            draws = sample_mix(mix_rng, self.mixup_alpha, self.cutmix_alpha, self.mix_prob,
                               self.switch_prob, images.shape[1:3])
            images, targets, lam = apply_mix(images, batch["label"], *draws, self.num_classes,
                                             self.label_smoothing)
            metrics["mix_lam"] = lam
        else:
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], self.num_classes),
                                          self.label_smoothing)
        return images, targets, metrics, rng

    def apply_train(self, params, extra, images, rng):
        """The model's outputs in training mode, and ``extra`` with the model state that the
        forward pass updated (unchanged for a model without state)."""
        if not self.state_keys:
            return self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng}), extra
        out, state = self.model.apply(self._variables(params, extra), images, train=True,
                                      rngs={"dropout": rng}, mutable=list(self.state_keys))
        return out, {**extra, **state}

    def loss(self, params, extra, batch, rng, step):
        images, targets, metrics, rng = self.inputs_and_targets(batch, rng)
        out, extra = self.apply_train(params, extra, images, rng)
        logits = out["logits"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        metrics["accuracy"] = (logits.argmax(-1) == batch["label"]).mean()
        return loss, (metrics, extra)

    def _variables(self, params, extra, ema: bool = False):
        """The model's variables: ``params`` (the EMA's with ``ema``) and its state from ``extra``."""
        prefix = "ema_" if ema else ""
        return {"params": extra["ema"] if ema else params, **{k: extra[prefix + k] for k in self.state_keys}}

    def _eval_variables(self, params, extra):
        return self._variables(params, extra, ema=self.ema_decay > 0)

    def _accuracy(self, variables, batch):
        logits = self.model.apply(variables, batch["image"])["logits"]
        top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
        return ((logits.argmax(-1) == batch["label"]).astype(jnp.float32),
                (top5 == batch["label"][:, None]).any(-1).astype(jnp.float32))

    def eval_metrics(self, params, extra, batch, rng):
        acc, top5 = self._accuracy(self._variables(params, extra), batch)
        out = {"accuracy": acc, "top5": top5}
        if self.ema_decay > 0:
            out["ema_accuracy"], out["ema_top5"] = self._accuracy(self._variables(params, extra, ema=True), batch)
        return out

    def predict(self, params, extra, images):
        """Class logits [B, num_classes] (inference mode; the EMA weights when kept); used to
        score generated samples."""
        return self.model.apply(self._eval_variables(params, extra), images)["logits"]

    def features(self, params, extra, images):
        return self.model.apply(self._eval_variables(params, extra), images)["pre_logits"]


def make(config) -> SupervisedObjective:
    return SupervisedObjective(config)
