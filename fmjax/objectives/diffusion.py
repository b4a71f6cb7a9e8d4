"""Denoising diffusion (DDPM, Ho et al. 2020) with a U-Net or a DiT, class- or text-conditional.

Training: ``t ~ U{0..T-1}``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``; the network predicts
eps, v or x0 (``prediction_type``) under an optional loss weighting (min-SNR, ...). The
condition is dropped with probability ``cond_drop_prob`` (the null class / a zero text vector)
so one network serves classifier-free guidance. Sampling (DDPM or DDIM, ``fmjax.diffusion.
process``, equal to diffusers' schedulers step for step) uses the EMA weights, carried as
objective state (``extra['ema']``) with diffusers ``EMAModel``'s decay and warm-up
(``ema.mode='diffusers'``, the default) or facebookresearch/DiT's constant-decay ``update_ema``
(``ema.mode='constant'``). ``schedule_precision='float64'`` builds q_sample's sqrt(a_t) and
sqrt(1 - a_t) tables, and the DDPM sampler's posterior coefficients, in float64 as DiT's
GaussianDiffusion does (default 'float32', diffusers').

Text conditioning: a causal text transformer (the CLIP text tower, ``fmjax.models.text``)
trained jointly, or locked (``text_lock``) e.g. after loading a CLIP checkpoint's text tower;
its pooled, projected embedding is the model's ``context`` vector.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import text_ops
from fmjax.diffusion import process
from fmjax.diffusion import sampling
from fmjax.models.registry import build_model, require
from fmjax.models.text import TextTransformer
from fmjax.objectives.base import Objective

CONDITIONINGS = ("class", "text", "none")
# 'diffusers': EMAModel.get_decay (warm-up (1+s)/(10+s) or 1-(1+s/inv_gamma)^-power, capped at
# decay, 0 at the first update); 'constant': facebookresearch/DiT's update_ema, ``decay`` every step.
EMA_MODES = ("diffusers", "constant")


def ema_one_minus_decay(optimization_step, decay: float = 0.9999, min_decay: float = 0.0,
                        update_after_step: int = 0, use_ema_warmup: bool = False,
                        inv_gamma: float = 1.0, power: float = 2 / 3):
    """``1 - EMAModel.get_decay`` (``optimization_step`` counts updates from 1), the EMA's
    update rate, computed directly: ``(1 + s / inv_gamma) ** -power`` or ``9 / (10 + s)``,
    between ``1 - decay`` and ``1 - min_decay`` (Python floats), 1 at the first update.
    diffusers takes ``1 - decay`` in float64; ``1 - d`` of a float32 d ~ 0.9999 is off by up to
    1.7e-4 relative (float32(0.9999) = 0.99989998), this by float32 rounding only."""
    step = jnp.maximum(jnp.asarray(optimization_step, jnp.float32) - update_after_step - 1, 0.0)
    if use_ema_warmup:
        rate = (1 + step / inv_gamma) ** -power
    else:
        rate = 9 / (10 + step)
    rate = jnp.minimum(jnp.maximum(rate, 1 - decay), 1 - min_decay)
    return jnp.where(step <= 0, 1.0, rate)


def ema_decay(optimization_step, decay: float = 0.9999, min_decay: float = 0.0,
              update_after_step: int = 0, use_ema_warmup: bool = False,
              inv_gamma: float = 1.0, power: float = 2 / 3):
    """diffusers ``EMAModel.get_decay`` (``optimization_step`` counts updates from 1):
    ``1 - ema_one_minus_decay``, 0 at the first update."""
    return 1 - ema_one_minus_decay(optimization_step, decay, min_decay, update_after_step,
                                   use_ema_warmup, inv_gamma, power)


class DiffusionObjective(Objective):

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.conditioning = o.get("conditioning", "class")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"config.objective.conditioning={self.conditioning!r}; valid: {list(CONDITIONINGS)}.")
        require(config.model.name, ("denoiser",), "objective 'diffusion'")   # before building it
        extra_kw = {}
        if self.conditioning == "text":
            text = dict(o.get("text", {}))
            self.text = TextTransformer(**text)
            extra_kw["context_dim"] = self.text.embed_dim
        self.model = build_model(config.model, config.get("dtype", "float32"), **extra_kw)
        self.num_classes = int(getattr(self.model, "num_classes", 0) or 0)
        if self.conditioning == "class" and self.num_classes <= 0:
            raise ValueError("conditioning='class' needs config.model.num_classes > 0 (or conditioning='none').")
        if self.conditioning != "none":
            require(self.model, (f"{self.conditioning}_conditional",), "objective 'diffusion'", config.model.name)
        self.batch_keys = {"class": ("image", "label"), "text": ("image", "tokens"),
                           "none": ("image",)}[self.conditioning]
        self.patch_size = getattr(self.model, "patch_size", None)
        self.schedule = process.make_schedule(
            o.get("schedule", "linear"), int(o.get("num_timesteps", 1000)),
            float(o.get("beta_start", 1e-4)), float(o.get("beta_end", 0.02)),
            precision=o.get("schedule_precision", "float32"))
        self.prediction_type = o.get("prediction_type", "epsilon")
        self.weighting = o.get("loss_weighting", "none")
        self.snr_gamma = float(o.get("snr_gamma", 5.0))
        self.cond_drop = float(o.get("cond_drop_prob", 0.1))
        self.text_lock = bool(o.get("text_lock", False))
        self.ema = dict(o.get("ema", {}))
        if self.ema.get("mode", "diffusers") not in EMA_MODES:
            raise ValueError(f"config.objective.ema.mode={self.ema.get('mode')!r}; valid: {list(EMA_MODES)}.")
        self.sampling = dict(o.get("sample", {}))
        for name, valid in (("prediction_type", process.PREDICTION_TYPES),
                            ("loss_weighting", process.LOSS_WEIGHTINGS)):
            if o.get(name, valid[0]) not in valid:
                raise ValueError(f"config.objective.{name}={o.get(name)!r}; valid: {list(valid)}.")

    def check(self, config):
        if self.conditioning == "text":
            text_ops.check_vocab(config, (config.objective.get("text") or {}).get("vocab_size"))

    # -- conditioning ------------------------------------------------------------------------
    def _cond(self, params, batch, drop=None):
        """Model keyword arguments for ``batch``; ``drop`` [B] bool replaces the condition by null."""
        if self.conditioning == "class":
            y = batch["label"].astype(jnp.int32)
            if drop is not None:
                y = jnp.where(drop, self.num_classes, y)
            return {"y": y}
        if self.conditioning == "text":
            ctx = self.text.apply({"params": params["text"]}, batch["tokens"])["embedding"]
            if self.text_lock:
                ctx = jax.lax.stop_gradient(ctx)
            if drop is not None:
                ctx = jnp.where(drop[:, None], 0.0, ctx)
            return {"context": ctx}
        return {}

    def null_cond(self, batch_size: int):
        """Model keyword arguments for the null condition (classifier-free guidance)."""
        if self.conditioning == "class":
            return {"y": jnp.full((batch_size,), self.num_classes, jnp.int32)}
        if self.conditioning == "text":
            return {"context": jnp.zeros((batch_size, self.text.embed_dim), jnp.float32)}
        return {}

    # -- objective ---------------------------------------------------------------------------
    def init(self, rng, batch):
        m_rng, t_rng = jax.random.split(rng)
        x = batch["image"]
        params = {}
        if self.conditioning == "text":
            params["text"] = self.text.init({"params": t_rng}, batch["tokens"])["params"]
        params["model"] = self.model.init({"params": m_rng}, x, jnp.zeros((x.shape[0],), jnp.int32),
                                          **self.null_cond(x.shape[0]))["params"]
        return params, {"ema": params}

    def loss(self, params, extra, batch, rng, step):
        t_rng, n_rng, d_rng, drop_rng = jax.random.split(rng, 4)
        x0 = batch["image"].astype(jnp.float32)
        b = x0.shape[0]
        t = jax.random.randint(t_rng, (b,), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
        x_t = process.add_noise(self.schedule, x0, noise, t)
        drop = jax.random.uniform(drop_rng, (b,)) < self.cond_drop if self.conditioning != "none" else None
        out = self.model.apply({"params": params["model"]}, x_t, t, **self._cond(params, batch, drop),
                               train=True, rngs={"dropout": d_rng})
        target = process.training_target(self.schedule, x0, noise, t, self.prediction_type)
        mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
        w = process.loss_weight(self.schedule, t, self.prediction_type, self.weighting, self.snr_gamma)
        loss = jnp.mean(w * mse)
        return loss, ({"mse": mse.mean()}, extra)

    def update_mask(self, params, step):
        """A locked text tower is skipped by the optimizer."""
        return {k: jax.tree.map(lambda _: not (k == "text" and self.text_lock), v) for k, v in params.items()}

    def after_model_init(self, params, extra):
        return {**extra, "ema": params}  # the ema starts as the (loaded) params, as in init

    def after_update(self, params, extra, step):
        e = self.ema
        if e.get("mode", "diffusers") == "constant":
            # facebookresearch/DiT train.py update_ema: ema = decay * ema + (1 - decay) * param
            # after every step, from the first (the EMA starts as a copy of the params).
            d = float(e.get("decay", 0.9999))
            ema = jax.tree.map(lambda s, p: s * d + p * (1 - d), extra["ema"], params)
            return dict(extra, ema=ema)
        rate = ema_one_minus_decay(step + 1, e.get("decay", 0.9999), e.get("min_decay", 0.0),
                                   e.get("update_after_step", 0), e.get("use_ema_warmup", False),
                                   e.get("inv_gamma", 1.0), e.get("power", 2 / 3))
        # EMAModel.step: s_param.sub_(one_minus_decay * (s_param - param))
        ema = jax.tree.map(lambda s, p: s - rate * (s - p), extra["ema"], params)
        return dict(extra, ema=ema)

    def features(self, params, extra, images):
        raise ValueError("objective 'diffusion' has no image features for knn / linear_probe evals.")

    # -- sampling ----------------------------------------------------------------------------
    def generate(self, params, extra, cond_batch, rng, shape=None, use_ema: bool = True, **overrides):
        """Samples in [-1, 1], (B, H, W, C), for the conditions in ``cond_batch`` ('label' or
        'tokens'; for 'none' just a batch size via ``shape``). Sampler settings come from
        ``config.objective.sample`` and ``overrides``."""
        p = extra["ema"] if use_ema else params
        s = dict(self.sampling, **overrides)
        guidance = float(s.pop("guidance_scale", 1.0))
        if shape is None:
            n = next(iter(cond_batch.values())).shape[0]
            size = int(self.config.data.image_size)
            shape = (n, size, size, int(self.config.model.get("in_channels", 3)))
        cond = self._cond(p, cond_batch) if self.conditioning != "none" else {}
        null = self.null_cond(shape[0])
        model_fn = lambda x, t: self.model.apply({"params": p["model"]}, x, t, **cond)
        uncond_fn = None
        if guidance != 1.0 and self.conditioning != "none":
            uncond_fn = lambda x, t: self.model.apply({"params": p["model"]}, x, t, **null)
        s.setdefault("prediction_type", self.prediction_type)
        return sampling.sample(model_fn, self.schedule, shape, rng,
                              guidance_scale=guidance if uncond_fn is not None else 1.0,
                              uncond_fn=uncond_fn, **s)

    def visualize(self, params, extra, batch, rng):
        """A grid of EMA samples: one row per class (class-conditional) or per prompt."""
        from fmjax.evals.images import image_grid
        if self.conditioning == "class":
            per_row = 8
            labels = np.repeat(np.arange(min(self.num_classes, 8)), per_row)
            cond = {"label": jnp.asarray(labels, jnp.int32)}
        elif self.conditioning == "text":
            cond = {"tokens": jnp.repeat(batch["tokens"][:8], 4, axis=0)}
            per_row = 4
        else:
            cond, per_row = {}, 8
        shape = None if cond else (16, *batch["image"].shape[1:])
        x = self.generate(params, extra, cond, rng, shape=shape)
        pics = np.asarray((jnp.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)
        return {"samples": image_grid([pics[i:i + per_row] for i in range(0, len(pics), per_row)])}

def make(config) -> DiffusionObjective:
    return DiffusionObjective(config)
