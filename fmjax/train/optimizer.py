"""Optimizer factory: AdamW / Adam / SGD with warmup + cosine, clipping and a decay mask.

The recipe follows the MAE / DINO / CLIP references: linear warmup from 0 to the
peak lr, cosine decay to ``min_lr``; the peak lr is either ``lr`` or, when
``lr_scaling == 'linear'``, ``blr * global_batch / 256``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# Params whose path matches one of these never get weight decay: biases, norms,
# position / class / mask / register embeddings (as in the MAE and DINO references).
NO_DECAY_PATTERNS = (r"bias$", r"scale$", r"(^|/)pos_embed", r"cls", r"token", r"register",
                     r"(^|/)norm", r"ln_", r"logit_scale", r"logit_bias", r"gamma$")


def peak_learning_rate(opt: Mapping[str, Any], global_batch: int) -> float:
    scaling = opt.get("lr_scaling", "none")
    if scaling == "linear":
        return float(opt["blr"]) * global_batch / 256
    if scaling in ("none", None):
        return float(opt["lr"])
    raise ValueError(f"config.optimizer.lr_scaling={scaling!r}; valid: 'none', 'linear'.")


def make_schedule(opt: Mapping[str, Any], total_steps: int, global_batch: int):
    peak = peak_learning_rate(opt, global_batch)
    warmup = int(opt.get("warmup_steps", 0))
    min_lr = float(opt.get("min_lr", 0.0))
    decay = opt.get("decay", "cosine")
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=min_lr / peak if peak else 0.0)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "linear":
        after = optax.linear_schedule(peak, min_lr, max(total_steps - warmup, 1))
    else:
        raise ValueError(f"config.optimizer.decay={decay!r}; valid: 'cosine', 'linear', 'constant'.")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_wd_schedule(opt: Mapping[str, Any], total_steps: int):
    """Weight decay per step: constant ``weight_decay``, or (DINO) a cosine from
    ``weight_decay`` to ``weight_decay_end`` over the whole run when that is set."""
    wd = float(opt.get("weight_decay", 0.0))
    end = opt.get("weight_decay_end")
    if end is None or float(end) == wd:
        return wd
    end = float(end)
    return lambda step: end + 0.5 * (wd - end) * (1 + jnp.cos(jnp.pi * jnp.minimum(step / max(total_steps, 1), 1.0)))


def clip_by_param_norm(max_norm: float) -> optax.GradientTransformation:
    """DINO's ``clip_gradients``: each tensor's gradient is rescaled by
    ``max_norm / (norm + 1e-6)`` when that factor is below 1 (tensors are clipped separately)."""
    def update(updates, state, params=None):
        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            coef = max_norm / (norm + 1e-6)
            return jnp.where(coef < 1, g * coef.astype(g.dtype), g)
        return jax.tree.map(clip, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params, patterns=NO_DECAY_PATTERNS):
    """True for params that get weight decay (matrices that are not embeddings)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    compiled = [re.compile(p) for p in patterns]
    mask = {k: (v.ndim > 1 and not any(c.search(k) for c in compiled)) for k, v in flat.items()}
    return traverse_util.unflatten_dict(mask, sep="/")


def make_optimizer(opt: Mapping[str, Any], total_steps: int, global_batch: int):
    """Returns (optax transformation, lr schedule)."""
    schedule = make_schedule(opt, total_steps, global_batch)
    name = opt.get("name", "adamw")
    wd = make_wd_schedule(opt, total_steps)
    if name == "adamw":
        kw = dict(b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8), mask=decay_mask)
        if callable(wd):  # a scheduled weight decay needs its value injected each step
            tx = optax.inject_hyperparams(optax.adamw, static_args=("mask", "b1", "b2", "eps"))(
                learning_rate=schedule, weight_decay=wd, **kw)
        else:
            tx = optax.adamw(schedule, weight_decay=wd, **kw)
    elif name == "adam":
        tx = optax.adam(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8))
    elif name == "sgd":
        if callable(wd):
            raise ValueError("config.optimizer.weight_decay_end (a weight-decay schedule) needs name='adamw'.")
        tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                         optax.sgd(schedule, momentum=opt.get("momentum", 0.9)))
    else:
        raise ValueError(f"Unknown optimizer {name!r}; valid: 'adamw', 'adam', 'sgd'.")
    clip = opt.get("clip_norm")
    mode = opt.get("clip_mode", "global")
    if mode not in ("global", "per_param"):
        raise ValueError(f"config.optimizer.clip_mode={mode!r}; valid: 'global', 'per_param'.")
    if clip:
        clipper = optax.clip_by_global_norm if mode == "global" else clip_by_param_norm
        tx = optax.chain(clipper(float(clip)), tx)
    return tx, schedule


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)
