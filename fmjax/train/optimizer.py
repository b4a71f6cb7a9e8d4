"""Optimizer factory: AdamW / Adam / SGD with warmup + cosine, clipping and a decay mask.

The recipe follows the MAE / DINO / CLIP references: linear warmup from 0 to the
peak lr, cosine decay to ``min_lr``; the peak lr is either ``lr`` or, when
``lr_scaling == 'linear'``, ``blr * global_batch / 256`` (``'sqrt'``: ``blr * sqrt(global_batch)``,
SimCLR's ``--learning_rate_scaling=sqrt``).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fmjax.train import param_groups

# Weight decay groups. Every ViT reference skips params with fewer than 2 dims and biases (whose
# q/k/v parts are 2-D here, (heads, head_dim), where torch has one 1-D qkv bias); beyond that
# ``config.optimizer.no_decay`` lists path regexes, per method:
#   MAE (timm add_weight_decay, as facebookresearch/mae calls it): ()  - cls/mask tokens decay
#   DINO (utils.get_params_groups): ()                                  - cls token, pos_embed decay
#   open_clip (main.py exclude): cls_token (open_clip's class_embedding is 1-D)
#   DeiT (timm 0.3.2 no_weight_decay): pos_embed, cls_token - dist_token decays
# NO_DECAY_PATTERNS is the default for configs that set nothing: fmjax's own, broader choice.
# ``config.optimizer.decay_all=True`` (default False) decays every param, < 2-D ones and biases
# included: one torch param group, as diffusers' train_unconditional.py builds its AdamW.
NO_DECAY_PATTERNS = (r"bias$", r"scale$", r"(^|/)pos_embed", r"cls", r"token", r"register",
                     r"(^|/)norm", r"ln_", r"logit_scale", r"logit_bias", r"gamma$",
                     r"relative_position_bias_table$", r"attention_biases$")
ALWAYS_NO_DECAY = (r"bias$",)
# Named weight-decay groups: ``config.optimizer.wd_groups='<name>'`` is the reference's exact
# exclusion list on top of the < 2-D / bias rule (tests/train/test_wd_presets.py checks each
# against the reference's own predicate on real param names).
NO_DECAY_PRESETS = {
    "fmjax": NO_DECAY_PATTERNS,
    # timm add_weight_decay(model, wd) as facebookresearch/mae main_pretrain.py calls it (no
    # skip list): cls_token and mask_token ([1, 1, D]) decay.
    "mae": (),
    # facebookresearch/dino utils.get_params_groups: only biases and 1-D params are skipped.
    "dino": (),
    # DeiT's create_optimizer on timm 0.3.2 (the version facebookresearch/deit pins): the skip
    # list is VisionTransformer.no_weight_decay() = {pos_embed, cls_token}, which DeiT's
    # DistilledVisionTransformer (models.py) inherits unchanged, so its dist_token ([1, 1, D])
    # DECAYS (tests/reference/test_distill_trajectory.py; later timm adds dist_token to the list).
    "deit": (r"pos_embed$", r"cls_token$"),
    # MAE's main_finetune / lr_decay.param_groups_lrd with its ViT's no_weight_decay() (timm
    # 0.3.2 as well; MAE's models have no dist_token, which the list still skips).
    "mae_finetune": (r"pos_embed$", r"cls_token$", r"dist_token$"),
    # open_clip main.py: p.ndim < 2 or 'bn'/'ln'/'bias'/'logit_scale' in the name; its
    # class_embedding is 1-D there, fmjax's cls_token [1, 1, D].
    "open_clip": (r"cls_token$",),
    # microsoft/SimMIM build_pretrain_optimizer with its VisionTransformer.no_weight_decay() =
    # {pos_embed, cls_token}: mask_token and the relative position tables decay.
    "simmim_vit": (r"(^|/)pos_embed$", r"(^|/)cls_token$"),
    # microsoft/unilm beit optim_factory.get_parameter_groups with no_weight_decay() =
    # {pos_embed, cls_token}: the same groups.
    "beit": (r"(^|/)pos_embed$", r"(^|/)cls_token$"),
    # microsoft/Swin-Transformer optimizer.py set_weight_decay with SwinTransformer's
    # no_weight_decay() = {absolute_pos_embed} (fmjax's pos_embed) and
    # no_weight_decay_keywords() = {relative_position_bias_table}.
    "swin": (r"(^|/)pos_embed$", r"relative_position_bias_table$"),
    # microsoft/Cream TinyViT optimizer.py set_weight_decay with TinyViT's
    # no_weight_decay_keywords() = {attention_biases}: the BatchNorm / LayerNorm scales are 1-D.
    "tinyvit": (r"attention_biases$",),
    # karpathy/nanoGPT model.py configure_optimizers: every param with >= 2 dims decays (token
    # and position embeddings included), biases and LayerNorm params do not.
    "nanogpt": (),
    # big_vision: weight decay only on kernels (wd_mults default '.*/kernel$').
    "big_vision": (r"^(?!.*(^|/)kernel$)",),
}


def no_decay_patterns(no_decay, wd_groups: str = ""):
    """The no-decay regexes of ``config.optimizer``: ``wd_groups`` (a preset name) or
    ``no_decay`` (regexes; None: fmjax's default NO_DECAY_PATTERNS), not both."""
    if wd_groups:
        if wd_groups not in NO_DECAY_PRESETS:
            raise ValueError(f"config.optimizer.wd_groups={wd_groups!r}; valid: {sorted(NO_DECAY_PRESETS)} "
                             "(or leave it '' and list regexes in no_decay).")
        if no_decay is not None:
            raise ValueError(f"config.optimizer.wd_groups={wd_groups!r} and no_decay={tuple(no_decay)} are both "
                             "set; use one (wd_groups names a reference's list, no_decay lists regexes).")
        return NO_DECAY_PRESETS[wd_groups]
    return NO_DECAY_PATTERNS if no_decay is None else tuple(no_decay)


def peak_learning_rate(opt: Mapping[str, Any], global_batch: int) -> float:
    scaling = opt.get("lr_scaling", "none")
    if scaling == "linear":
        return float(opt["blr"]) * global_batch / 256
    if scaling == "sqrt":  # google-research/simclr WarmUpAndCosineDecay: base_lr * sqrt(batch)
        return float(opt["blr"]) * math.sqrt(global_batch)
    if scaling in ("none", None):
        return float(opt["lr"])
    raise ValueError(f"config.optimizer.lr_scaling={scaling!r}; valid: 'none', 'linear', 'sqrt'.")


def make_schedule(opt: Mapping[str, Any], total_steps: int, global_batch: int):
    """The lr per optimizer step.

    Reference options (defaults: fmjax's per-step schedule, unchanged):
    ``warmup_init`` (0.0): the linear warm-up starts there (timm's ``warmup_lr_init``);
    ``decay_from`` ('warmup_end'): 'start' runs the cosine over the whole run,
    ``min_lr + (peak - min_lr) * (1 + cos(pi * s / total_steps)) / 2``, cut by the warm-up
    (timm's ``CosineLRScheduler`` with ``warmup_prefix=False``, so the peak is never reached);
    ``schedule_steps_per_epoch`` (0 = per step): K > 0 holds the lr constant within each
    epoch of K steps at the value of the epoch's first step (timm schedulers stepped per epoch);
    ``schedule_epoch_lag`` (0): epoch e uses the value of epoch max(e - lag, 0) (DeiT's
    ``lr_scheduler.step(epoch)`` at the END of epoch e sets the lr of epoch e + 1 to timm's
    value for e: lag 1).
    """
    base = _make_step_schedule(opt, total_steps, global_batch)
    per_epoch = int(opt.get("schedule_steps_per_epoch", 0) or 0)
    lag = int(opt.get("schedule_epoch_lag", 0) or 0)
    if per_epoch < 0 or lag < 0:
        raise ValueError("config.optimizer.schedule_steps_per_epoch and schedule_epoch_lag must be >= 0.")
    if per_epoch == 0:
        if lag:
            raise ValueError("config.optimizer.schedule_epoch_lag needs schedule_steps_per_epoch > 0.")
        return base
    warmup = int(opt.get("warmup_steps", 0))
    if warmup % per_epoch:
        raise ValueError(f"config.optimizer.warmup_steps={warmup} is not a whole number of epochs of "
                         f"schedule_steps_per_epoch={per_epoch} steps.")

    def schedule(step):
        epoch = jnp.maximum(jnp.asarray(step) // per_epoch - lag, 0)
        return base(epoch * per_epoch)
    return schedule


def _make_step_schedule(opt: Mapping[str, Any], total_steps: int, global_batch: int):
    peak = peak_learning_rate(opt, global_batch)
    warmup = int(opt.get("warmup_steps", 0))
    min_lr = float(opt.get("min_lr", 0.0))
    decay = opt.get("decay", "cosine")
    decay_from = opt.get("decay_from", "warmup_end")
    if decay_from not in ("warmup_end", "start"):
        raise ValueError(f"config.optimizer.decay_from={decay_from!r}; valid: 'warmup_end', 'start'.")
    if decay_from == "start" and decay != "cosine":
        raise ValueError("config.optimizer.decay_from='start' needs decay='cosine'.")
    warmup_init = float(opt.get("warmup_init", 0.0) or 0.0)
    if decay == "cosine" and decay_from == "start":
        # timm CosineLRScheduler (warmup_prefix=False): t counts from the run's start; join_schedules
        # hands the post-warm-up schedule ``step - warmup``. (1 + cos x) / 2 = cos(x / 2)^2, which
        # keeps float32's relative precision near the end of the cosine.
        total = max(total_steps, 1)
        after = lambda s: min_lr + (peak - min_lr) * jnp.square(jnp.cos(jnp.pi / 2 * (s + warmup) / total))
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=min_lr / peak if peak else 0.0)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "linear":
        after = optax.linear_schedule(peak, min_lr, max(total_steps - warmup, 1))
    elif decay == "multistep":
        # timm-style MultiStepLRScheduler (SimMIM): peak * gamma^(number of milestones <= step);
        # milestones count from the run's start (join_schedules hands ``step - warmup``).
        milestones = sorted(int(m) for m in (opt.get("milestones") or ()))
        gamma = float(opt.get("gamma", 0.1))
        if any(m < warmup for m in milestones):
            raise ValueError(f"config.optimizer.milestones={tuple(milestones)} must be >= warmup_steps={warmup}.")
        ms = jnp.asarray(milestones or [total_steps + 1], jnp.int32)
        after = lambda s: peak * gamma ** jnp.sum(jnp.asarray(s + warmup) >= ms).astype(jnp.float32)
    else:
        raise ValueError(f"config.optimizer.decay={decay!r}; valid: 'cosine', 'linear', 'constant', 'multistep'.")
    if warmup <= 0:
        return after
    mode = opt.get("warmup_mode", "linear")
    if warmup_init and mode != "linear":
        raise ValueError(f"config.optimizer.warmup_init needs warmup_mode='linear', got {mode!r}.")
    if mode == "linear":  # optax / MAE / open_clip: peak * s / W; timm: init + (peak - init) * s / W
        if warmup_init:  # timm's _get_lr: init + s * (peak - init) / W (exact at s = 0)
            ramp = lambda s: warmup_init + jnp.minimum(s, warmup) * ((peak - warmup_init) / warmup)
        else:
            ramp = optax.linear_schedule(0.0, peak, warmup)
    elif mode == "linspace":  # DINO's cosine_scheduler: np.linspace(0, peak, W)[s] = peak * s / (W - 1)
        ramp = lambda s: peak * jnp.minimum(s, warmup - 1) / max(warmup - 1, 1)
    elif mode == "plus_one":  # open_clip's _warmup_lr: peak * (s + 1) / W (never 0)
        ramp = lambda s: peak * (jnp.minimum(s, warmup - 1) + 1) / warmup
    elif mode == "nanogpt":  # nanoGPT train.py get_lr: peak * (s + 1) / (W + 1) (never 0 or the peak)
        ramp = lambda s: peak * (jnp.minimum(s, warmup - 1) + 1) / (warmup + 1)
    else:
        raise ValueError(f"config.optimizer.warmup_mode={mode!r}; valid: 'linear', 'linspace', 'plus_one', "
                         "'nanogpt'.")
    return optax.join_schedules([ramp, after], [warmup])


def make_wd_schedule(opt: Mapping[str, Any], total_steps: int):
    """Weight decay per step: constant ``weight_decay``, or (DINO) a cosine from
    ``weight_decay`` to ``weight_decay_end`` over the whole run when that is set."""
    wd = float(opt.get("weight_decay", 0.0))
    end = opt.get("weight_decay_end")
    if end is None or float(end) == wd:
        return wd
    end = float(end)
    return lambda step: end + 0.5 * (wd - end) * (1 + jnp.cos(jnp.pi * jnp.minimum(step / max(total_steps, 1), 1.0)))


QKV = re.compile(r"/(query|key|value)/")


def clip_group(path: str, fuse_qkv: bool) -> str:
    """The clipping group of a param: itself, or with ``fuse_qkv`` one group for the q, k and
    v kernels (and one for their biases) of an attention layer, as torch's fused ``qkv``."""
    return QKV.sub("/qkv/", path) if fuse_qkv else path


def clip_by_param_norm(max_norm: float, fuse_qkv: bool = False) -> optax.GradientTransformation:
    """DINO's ``clip_gradients``: each tensor's gradient is rescaled by
    ``max_norm / (norm + 1e-6)`` when that factor is below 1 (tensors are clipped separately).
    ``fuse_qkv``: q, k and v count as one tensor (DINO's ViT has one ``qkv`` Linear)."""
    def update(updates, state, params=None):
        flat = traverse_util.flatten_dict(updates, sep="/") if isinstance(updates, Mapping) else None
        if flat is None:  # a bare array or non-dict tree: per leaf
            groups = None
        else:
            groups = {}
            for k, g in flat.items():
                key = clip_group(k, fuse_qkv)
                groups[key] = groups.get(key, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))

        def clip(g, sq):
            coef = max_norm / (jnp.sqrt(sq) + 1e-6)
            return jnp.where(coef < 1, g * coef.astype(g.dtype), g)
        if groups is None:
            return jax.tree.map(lambda g: clip(g, jnp.sum(jnp.square(g.astype(jnp.float32)))), updates), state
        out = {k: clip(g, groups[clip_group(k, fuse_qkv)]) for k, g in flat.items()}
        return traverse_util.unflatten_dict(out, sep="/"), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm_eps(max_norm: float, eps: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: every gradient times ``min(max_norm / (norm + eps), 1)``
    (torch's eps is 1e-6), ``norm`` the global 2-norm. optax's clip_by_global_norm (fmjax's
    default) divides by the norm itself, ``g / norm * max_norm`` when norm > max_norm."""
    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class PerParamAdamState(NamedTuple):
    count: Any  # int32 scalar per param: its own step count, as torch.optim.Adam(W) keeps
    mu: Any
    nu: Any


def bias_correction(decay: float, count) -> jax.Array:
    """``1 - decay ** count`` to float32 rounding. torch computes it in float64 (Python
    floats); float32 ``decay ** count`` loses ~3e-5 relative at count 2 for decay 0.999,
    which a 25-step trajectory comparison sees. ``-expm1(count * log(decay))`` with the log
    taken in float64 does not."""
    return -jnp.expm1(count.astype(jnp.float32) * np.float32(np.log(decay)))


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, per_param_count: bool = False) -> optax.GradientTransformation:
    """Adam's scaling, as torch.optim.Adam(W) computes it (``optax.scale_by_adam``'s state).

    ``per_param_count``: a step count per param instead of one shared count. torch counts
    each param's steps in its own state; a param skipped while frozen (DINO's last layer)
    resumes with its own count and bias correction. Paired with the step's ``mask_update``,
    which keeps a frozen param's slots (its count included) unchanged.
    """
    def init(params):
        mu, nu = jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
        if per_param_count:
            return PerParamAdamState(count=jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params), mu=mu, nu=nu)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=nu)

    def update(updates, state, params=None):
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)

        def step(m, v, c):
            return (m / bias_correction(b1, c)) / (jnp.sqrt(v / bias_correction(b2, c)) + eps)
        if per_param_count:
            count = jax.tree.map(lambda c: optax.safe_int32_increment(c), state.count)
            return jax.tree.map(step, mu, nu, count), PerParamAdamState(count=count, mu=mu, nu=nu)
        count = optax.safe_int32_increment(state.count)
        return (jax.tree.map(lambda m, v: step(m, v, count), mu, nu),
                optax.ScaleByAdamState(count=count, mu=mu, nu=nu))

    return optax.GradientTransformation(init, update)


def decay_mask(params, patterns=NO_DECAY_PATTERNS):
    """True for params that get weight decay: at least 2 dims, not a bias, and no match of
    ``patterns`` (regexes on the '/'-joined path)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    compiled = [re.compile(p) for p in tuple(ALWAYS_NO_DECAY) + tuple(patterns)]
    mask = {k: (v.ndim > 1 and not any(c.search(k) for c in compiled)) for k, v in flat.items()}
    return traverse_util.unflatten_dict(mask, sep="/")


def _decays(patterns):
    """``decays(path, param)``: the decay groups as a predicate (``patterns`` None: every param)."""
    if patterns is None:
        return lambda path, p: True
    compiled = [re.compile(p) for p in tuple(ALWAYS_NO_DECAY) + tuple(patterns)]
    return lambda path, p: p.ndim > 1 and not any(c.search(path) for c in compiled)


def make_optimizer(opt: Mapping[str, Any], total_steps: int, global_batch: int):
    """Returns (optax transformation, lr schedule).

    Parameter groups (``frozen``, ``lr_mult``, ``wd_mult``, ``llrd``; see
    ``fmjax/train/param_groups.py``) are off by default; with all of them empty the
    transformation is exactly the one without groups. With groups the update of a param is
    ``-lr * mult * (direction + wd * wd_mult * p)``, ``mult`` = lr_mult x LLRD factor (torch's
    per-group lr scales the decoupled decay too), and a frozen param's update is -0.0.
    """
    schedule = make_schedule(opt, total_steps, global_batch)
    groups = param_groups.parse(opt)
    name = opt.get("name", "adamw")
    wd = make_wd_schedule(opt, total_steps)
    patterns = opt.get("no_decay")
    if opt.get("decay_all", False) and opt.get("wd_groups", ""):
        raise ValueError("config.optimizer.decay_all=True decays every param; wd_groups="
                         f"{opt.get('wd_groups')!r} contradicts it.")
    if opt.get("decay_all", False):
        # torch.optim.AdamW(model.parameters(), weight_decay=wd): one group, every param decays
        # (biases, norms, 1-D params too), as diffusers' train_unconditional.py.
        if patterns:
            raise ValueError(f"config.optimizer.decay_all=True decays every param; no_decay={tuple(patterns)} "
                             "contradicts it (leave no_decay None or ()).")
        mask = None
    else:
        patterns = no_decay_patterns(patterns, opt.get("wd_groups", ""))
        mask = functools.partial(decay_mask, patterns=patterns)
    count = opt.get("adam_count", "global")
    if count not in ("global", "per_param"):
        raise ValueError(f"config.optimizer.adam_count={count!r}; valid: 'global', 'per_param'.")
    clip = opt.get("clip_norm")
    mode = opt.get("clip_mode", "global")
    if mode not in ("global", "per_param", "per_example"):
        raise ValueError(f"config.optimizer.clip_mode={mode!r}; valid: 'global', 'per_param', 'per_example'.")
    clip_eps = float(opt.get("clip_eps", 0.0) or 0.0)
    if clip_eps < 0 or (clip_eps and mode != "global"):
        raise ValueError(f"config.optimizer.clip_eps={clip_eps} needs clip_mode='global' and must be >= 0 "
                         "(clip_mode='per_param' has DINO's 1e-6 built in).")
    clipper = None
    if clip and mode == "per_example":
        # each example's gradient is clipped by the train step (fmjax.train.step), not here
        if groups.frozen:
            raise ValueError("config.optimizer.clip_mode='per_example' does not take frozen parameter "
                             "groups (optimizer.frozen); drop one of them.")
    elif clip:
        if mode == "per_param":
            clipper = clip_by_param_norm(float(clip), fuse_qkv=bool(opt.get("clip_fuse_qkv", False)))
        elif clip_eps:
            clipper = clip_by_global_norm_eps(float(clip), clip_eps)
        else:
            clipper = optax.clip_by_global_norm(float(clip))
    # Frozen params' gradients stay out of clipping (torch: no grad), so the clip goes inside.
    inner_clip = clipper is not None and bool(groups.frozen)
    b1, b2, eps = opt.get("b1", 0.9), opt.get("b2", 0.999), opt.get("eps", 1e-8)
    adam = lambda: scale_by_adam(b1, b2, eps, per_param_count=count == "per_param")

    def grouped(body, learning_rate):
        """body (the gradient-side transformations, decay included) on the trained params,
        then the per-param lr multipliers, the lr, and -0.0 for frozen params."""
        train = optax.chain(*([clipper] if inner_clip else []), *body)
        if groups.frozen:
            train = param_groups.without_frozen(train, groups)
        parts = [train, param_groups.scale_by_multipliers(groups),
                 optax.scale_by_learning_rate(learning_rate)]
        if groups.frozen:
            parts.append(param_groups.keep_frozen(groups))
        return optax.chain(*parts)

    def decayed(weight_decay):
        if groups.active:
            return param_groups.add_decayed_weights(weight_decay, groups,
                                                    _decays(None if mask is None else patterns))
        return optax.add_decayed_weights(weight_decay, mask)

    if name == "adamw":
        def adamw(learning_rate, weight_decay):
            if groups.active:
                return grouped([adam(), decayed(weight_decay)], learning_rate)
            return optax.chain(adam(), decayed(weight_decay), optax.scale_by_learning_rate(learning_rate))
        if callable(wd):  # a scheduled weight decay needs its value injected each step
            tx = optax.inject_hyperparams(adamw)(learning_rate=schedule, weight_decay=wd)
        else:
            tx = adamw(schedule, wd)
    elif name == "adam":
        if groups.active:
            tx = grouped([adam()], schedule)
        else:
            tx = optax.chain(adam(), optax.scale_by_learning_rate(schedule))
    elif name == "sgd":
        if callable(wd):
            raise ValueError("config.optimizer.weight_decay_end (a weight-decay schedule) needs name='adamw'.")
        momentum = opt.get("momentum", 0.9)
        if groups.active:  # optax.sgd = trace(momentum) then the lr
            tx = grouped([decayed(wd), optax.trace(decay=momentum, nesterov=False)], schedule)
        else:
            tx = optax.chain(optax.add_decayed_weights(wd, mask=mask), optax.sgd(schedule, momentum=momentum))
    elif name == "lars":
        # MAE's util/lars.py (main_linprobe.py): params with ndim > 1 get the weight decay and
        # the trust ratio trust_coefficient * |p| / |g + wd p| (1 where either norm is 0);
        # every param then gets momentum on the unscaled update, and only then the lr (BYOL's
        # optimizers.py lars orders it the same way).
        # ``lars_exclude`` (regexes, re.search on the '/'-joined path, on top of the ndim <= 1 and
        # 'bias' rule of the decay groups; None: that rule alone, as MAE) names the
        # params that get neither decay nor trust ratio: SimCLR's
        # exclude_from_weight_decay=['batch_normalization', 'bias'] (and the same list for
        # the layer adaptation), BYOL's bias/batchnorm filter.
        # ``lars_lr_in_momentum=True``: google-research/simclr lars_optimizer.py, whose momentum
        # accumulates lr * trust * g (v = m v + lr_t trust g; p -= v): it differs from the
        # above whenever the lr changes (warm-up, cosine).
        if callable(wd):
            raise ValueError("config.optimizer.weight_decay_end (a weight-decay schedule) needs name='adamw'.")
        momentum = float(opt.get("momentum", 0.9))
        trust = float(opt.get("trust_coefficient", 0.001))
        # Either way a param whose path ends in 'bias' is excluded: fmjax stores the q/k/v biases
        # 2-D (heads, head_dim) where torch has one 1-D qkv bias, which the ndim rule alone
        # would decay and adapt.
        exclude = opt.get("lars_exclude")
        patterns = () if exclude is None else tuple(exclude)
        adapted = lambda params: (decay_mask(params, patterns) if isinstance(params, Mapping)
                                  else jax.tree.map(lambda p: p.ndim > 1, params))
        body = [optax.add_decayed_weights(wd, mask=adapted),
                optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust), adapted)]
        if opt.get("lars_lr_in_momentum", False):
            if groups.active:
                raise ValueError("config.optimizer.lars_lr_in_momentum=True (SimCLR's LARS) does not take "
                                 "parameter groups (frozen / lr_mult / wd_mult / llrd); drop one of them.")
            tx = optax.chain(*body, optax.scale_by_learning_rate(schedule),
                             optax.trace(decay=momentum, nesterov=False))
        else:
            body.append(optax.trace(decay=momentum, nesterov=False))
            tx = grouped(body, schedule) if groups.active else optax.chain(
                *body, optax.scale_by_learning_rate(schedule))
    elif name == "lamb":
        # LAMB (You et al. 2020) as optax.lamb: Adam direction, decoupled decay on the decay
        # groups, then the trust ratio |p| / |update| per param, then the lr.
        if callable(wd):
            raise ValueError("config.optimizer.weight_decay_end (a weight-decay schedule) needs name='adamw'.")
        body = [adam(), decayed(wd), optax.scale_by_trust_ratio()]
        tx = grouped(body, schedule) if groups.active else optax.chain(
            *body, optax.scale_by_learning_rate(schedule))
    else:
        raise ValueError(f"Unknown optimizer {name!r}; valid: 'adamw', 'adam', 'sgd', 'lars', 'lamb'.")
    if clipper is not None and not inner_clip:
        tx = optax.chain(clipper, tx)
    return tx, schedule


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)
