"""LARS as SimCLR steps it, and LAMB, against their published update rules.

LARS: google-research/simclr tf2/lars_optimizer.py (commit 383d4143fd8cf7879ae10f1046a9baeb753ff438)
``LARSOptimizer._resource_apply_dense`` with ``classic_momentum=True`` (SimCLR's setting), no
Nesterov, ``exclude_from_weight_decay=['batch_normalization', 'bias']`` (model.py
``build_optimizer``; 'head_supervised' is not trained here) and the same list for the layer
adaptation, transcribed in NumPy below over Keras-style variable names, with the lr of
model.py ``WarmUpAndCosineDecay`` (linear or sqrt scaling, warm-up, tf CosineDecay to 0) at
``optimizer.iterations`` (0 at the first step). fmjax runs ``make_optimizer`` with
``lars_lr_in_momentum=True`` and ``lars_exclude=()`` (configs/simclr.py's
``reference_optimizer``).

LAMB: You et al. 2020 ("Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2) with phi = identity, the trust ratio 1 where a norm is 0 (optax.lamb),
decay lambda on the decay groups only; also against ``optax.lamb`` itself.
"""
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from fmjax.train import optimizer as opt_lib

# fmjax param path -> the Keras variable name the reference's regexes see.
KERAS_NAMES = {
    "backbone/cls_token": "vit/cls_token:0",                     # 3-D: decayed and adapted
    "backbone/block_0/attn/query/kernel": "vit/block_0/query/kernel:0",
    "backbone/block_0/attn/query/bias": "vit/block_0/query/bias:0",   # 2-D in fmjax; 'bias'
    "backbone/block_0/mlp/fc1/kernel": "vit/block_0/dense/kernel:0",
    "backbone/block_0/mlp/fc1/bias": "vit/block_0/dense/bias:0",
    "head/fc_0/kernel": "projection_head/nl_0/dense/kernel:0",
    "head/bn_0_scale": "projection_head/nl_0/batch_normalization/gamma:0",
    "head/bn_0_bias": "projection_head/nl_0/batch_normalization/beta:0",
    "head/zero_kernel": "projection_head/zero/kernel:0",        # |w| = 0 at the start: trust 1
}
SHAPES = {"backbone/cls_token": (1, 1, 6), "backbone/block_0/attn/query/kernel": (6, 2, 3),
          "backbone/block_0/attn/query/bias": (2, 3), "backbone/block_0/mlp/fc1/kernel": (6, 8),
          "backbone/block_0/mlp/fc1/bias": (8,), "head/fc_0/kernel": (8, 5),
          "head/bn_0_scale": (5,), "head/bn_0_bias": (5,), "head/zero_kernel": (5, 4)}


class NumpyLARS:
    """lars_optimizer.py LARSOptimizer (classic_momentum=True, use_nesterov=False)."""

    def __init__(self, momentum=0.9, weight_decay=0.0, exclude_from_weight_decay=None,
                 exclude_from_layer_adaptation=None, eeta=0.001):
        self.momentum, self.weight_decay, self.eeta = momentum, weight_decay, eeta
        self.exclude_from_weight_decay = exclude_from_weight_decay
        self.exclude_from_layer_adaptation = exclude_from_layer_adaptation or exclude_from_weight_decay
        self.slots = {}

    def _use_weight_decay(self, name):
        if not self.weight_decay:
            return False
        return not any(re.search(r, name) for r in (self.exclude_from_weight_decay or ()))

    def _do_layer_adaptation(self, name):
        return not any(re.search(r, name) for r in (self.exclude_from_layer_adaptation or ()))

    def apply(self, grads, params, names, learning_rate):
        out = {}
        for k, param in params.items():
            grad, name = np.asarray(grads[k], np.float64), names[k]
            v = self.slots.get(k, np.zeros_like(param))
            if self._use_weight_decay(name):
                grad = grad + self.weight_decay * param
            trust_ratio = 1.0
            if self._do_layer_adaptation(name):
                w_norm, g_norm = np.linalg.norm(param), np.linalg.norm(grad)
                trust_ratio = (self.eeta * w_norm / g_norm) if (w_norm > 0 and g_norm > 0) else 1.0
            scaled_lr = learning_rate * trust_ratio
            next_v = self.momentum * v + scaled_lr * grad
            self.slots[k] = next_v
            out[k] = param - next_v
        return out


def warmup_and_cosine_decay(step, base_learning_rate, num_examples, batch_size, warmup_epochs,
                            train_epochs, scaling="linear"):
    """model.py WarmUpAndCosineDecay.__call__ with get_train_steps (train_steps flag 0)."""
    warmup_steps = int(round(warmup_epochs * num_examples // batch_size))
    if scaling == "linear":
        scaled_lr = base_learning_rate * batch_size / 256.
    elif scaling == "sqrt":
        scaled_lr = base_learning_rate * math.sqrt(batch_size)
    else:
        raise ValueError(scaling)
    learning_rate = step / float(warmup_steps) * scaled_lr if warmup_steps else scaled_lr
    total_steps = num_examples * train_epochs // batch_size + 1
    decay_steps = total_steps - warmup_steps
    cosine = scaled_lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps) / decay_steps))
    return learning_rate if step < warmup_steps else cosine


# A run of the schedule: 5 warm-up steps, cosine to 0 over the rest (16 steps in all).
RUN = dict(num_examples=320, batch_size=64, warmup_epochs=1, train_epochs=3)   # 5 per epoch


def _params(seed=0):
    rng = np.random.default_rng(seed)
    flat = {k: (rng.normal(size=s) * (0.5 if "bias" in k else 1.0)).astype(np.float32) for k, s in SHAPES.items()}
    flat["head/zero_kernel"] = np.zeros(SHAPES["head/zero_kernel"], np.float32)
    flat["head/bn_0_scale"] = (1 + 0.1 * rng.normal(size=SHAPES["head/bn_0_scale"])).astype(np.float32)
    return flat


def _grads(step, seed=1):
    rng = np.random.default_rng(seed + 100 * step)
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    if step == 2:  # a zero gradient on a decayed param: trust uses |g + wd w| = wd |w|
        g["head/fc_0/kernel"] = np.zeros_like(g["head/fc_0/kernel"])
    return g


def _simclr_opt(scaling="linear", blr=0.3, weight_decay=1e-2, lr_in_momentum=True):
    total = RUN["num_examples"] * RUN["train_epochs"] // RUN["batch_size"] + 1
    warmup = int(round(RUN["warmup_epochs"] * RUN["num_examples"] // RUN["batch_size"]))
    cfg = ml_collections.ConfigDict(dict(
        name="lars", lars_lr_in_momentum=lr_in_momentum, lars_exclude=(), trust_coefficient=1e-3,
        momentum=0.9, lr_scaling=scaling, blr=blr, weight_decay=weight_decay, min_lr=0.0,
        decay="cosine", warmup_mode="linear", warmup_steps=warmup, clip_norm=0.0))
    tx, schedule = opt_lib.make_optimizer(cfg, total, RUN["batch_size"])
    return tx, schedule, total


def _run_fmjax(tx, total, params):
    p = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in params.items()})
    state = tx.init(p)
    traj = []
    for step in range(total):
        g = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in _grads(step).items()})
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        traj.append({"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(p).items()})
    return traj


@pytest.mark.parametrize("scaling,blr", [("linear", 0.3), ("sqrt", 0.075)])
def test_lars_lr_in_momentum_matches_simclr_lars_optimizer(scaling, blr):
    wd = 1e-2   # larger than SimCLR's 1e-6 so that the decay (and its exclusions) show
    tx, schedule, total = _simclr_opt(scaling, blr, wd)
    params = _params()
    ref = NumpyLARS(momentum=0.9, weight_decay=wd, exclude_from_weight_decay=["batch_normalization", "bias"])
    ref_p = {k: v.astype(np.float64) for k, v in params.items()}
    traj = _run_fmjax(tx, total, params)
    lrs = []
    for step in range(total):
        lr = warmup_and_cosine_decay(step, blr, scaling=scaling, **RUN)
        lrs.append(lr)
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-9,  # float32 cosine
                                   err_msg=f"lr @ {step}")
        ref_p = ref.apply(_grads(step), ref_p, KERAS_NAMES, lr)
        for k in params:  # atol: float32 rounding of params that plain-SGD steps of ~lr move by O(1)
            np.testing.assert_allclose(traj[step][k], ref_p[k], rtol=1e-5,
                                       atol=1e-6 * max(1.0, np.abs(ref_p[k]).max()),
                                       err_msg=f"{k} @ step {step}")
    # The run covers what it should: lr 0 at step 0, a warm-up, a peak, a cosine to ~0.
    peak = blr * (RUN["batch_size"] / 256 if scaling == "linear" else math.sqrt(RUN["batch_size"]))
    assert lrs[0] == 0 and max(lrs) == pytest.approx(peak) and lrs[-1] < 0.05 * peak
    moved = {k: np.linalg.norm(ref_p[k] - params[k]) / (np.linalg.norm(params[k]) + 1e-12) for k in params}
    assert all(m > 0 for m in moved.values()), moved


def test_exclusions_are_simclrs():
    """Decay and trust ratio: cls_token and kernels yes; biases (the 2-D q/k/v one included)
    and BatchNorm scale / bias no; the same predicate as the reference's regexes."""
    ref = NumpyLARS(weight_decay=1e-6, exclude_from_weight_decay=["batch_normalization", "bias"])
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in _params().items()})
    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(opt_lib.decay_mask(params, ())).items()}
    for k, name in KERAS_NAMES.items():
        assert mask[k] == ref._use_weight_decay(name) == ref._do_layer_adaptation(name), k
    assert sorted(k for k, v in mask.items() if v) == [
        "backbone/block_0/attn/query/kernel", "backbone/block_0/mlp/fc1/kernel", "backbone/cls_token",
        "head/fc_0/kernel", "head/zero_kernel"]


def test_default_lars_ordering_differs_while_the_lr_changes():
    """fmjax's default LARS (lr after the momentum: MAE / BYOL) is SimCLR's under a constant
    lr, and not while the lr changes (so the option matters)."""
    params = _params()
    a = _run_fmjax(*_simclr_opt(lr_in_momentum=True)[::2], params)
    b = _run_fmjax(*_simclr_opt(lr_in_momentum=False)[::2], params)
    k = "head/fc_0/kernel"
    assert np.abs(a[-1][k] - b[-1][k]).max() > 1e-4 * np.abs(a[-1][k]).max()
    cfg = lambda flag: ml_collections.ConfigDict(dict(
        name="lars", lars_lr_in_momentum=flag, lars_exclude=(), lr=0.7, warmup_steps=0,
        decay="constant", weight_decay=1e-2, clip_norm=0.0))
    c = _run_fmjax(opt_lib.make_optimizer(cfg(True), 8, 64)[0], 8, params)
    d = _run_fmjax(opt_lib.make_optimizer(cfg(False), 8, 64)[0], 8, params)
    for key in params:
        np.testing.assert_allclose(c[-1][key], d[-1][key], rtol=1e-5, atol=1e-7)


def test_lars_none_exclusion_skips_two_dimensional_biases():
    """lars_exclude=None (MAE's LARS: ndim <= 1 skipped) also skips fmjax's 2-D q/k/v biases,
    which are 1-D (one qkv bias) in the torch models (bug fixed with this test)."""
    cfg = ml_collections.ConfigDict(dict(name="lars", lr=1.0, warmup_steps=0, decay="constant",
                                         weight_decay=0.5, momentum=0.0, clip_norm=0.0))
    tx, _ = opt_lib.make_optimizer(cfg, 4, 64)
    p = {"attn": {"query": {"bias": jnp.ones((2, 3)), "kernel": jnp.ones((4, 2, 3))}}}
    g = jax.tree.map(jnp.ones_like, p)
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u["attn"]["query"]["bias"]), -1.0)     # plain SGD step
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u["attn"]["query"]["kernel"])),
                               1e-3 * np.linalg.norm(np.ones((4, 2, 3))), rtol=1e-5)


# -- LAMB -------------------------------------------------------------------------------------

def numpy_lamb(params, grads_per_step, lrs, b1, b2, eps, wd, decays):
    """You et al. 2020, Algorithm 2 (phi = identity; ratio 1 where a norm is 0)."""
    x = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(v) for k, v in x.items()}
    out = []
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for k in x:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            u = r + (wd * x[k] if decays[k] else 0.0)
            xn, un = np.linalg.norm(x[k]), np.linalg.norm(u)
            ratio = xn / un if (xn > 0 and un > 0) else 1.0
            x[k] = x[k] - lr * ratio * u
        out.append({k: val.copy() for k, val in x.items()})
    return out


def test_lamb_matches_published_rule_and_optax():
    b1, b2, eps, wd = 0.9, 0.999, 1e-6, 0.01
    cfg = ml_collections.ConfigDict(dict(name="lamb", lr=2e-3, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                                         warmup_steps=3, decay="cosine", min_lr=0.0, no_decay=(),
                                         clip_norm=0.0))
    total = 10
    tx, schedule = opt_lib.make_optimizer(cfg, total, 64)
    params = _params()
    traj = _run_fmjax(tx, total, params)
    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(
        opt_lib.decay_mask(traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()}),
                           ())).items()}
    grads = [{k: v.astype(np.float64) for k, v in _grads(s).items()} for s in range(total)]
    ref = numpy_lamb(params, grads, [float(schedule(s)) for s in range(total)], b1, b2, eps, wd, mask)
    for step in range(total):
        for k in params:
            np.testing.assert_allclose(traj[step][k], ref[step][k], rtol=1e-5, atol=1e-7, err_msg=f"{k} @ {step}")
    # optax.lamb with the same mask and schedule: the same transformation.
    p = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in params.items()})
    otx = optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                     mask=lambda q: opt_lib.decay_mask(q, ()))
    state = otx.init(p)
    for step in range(total):
        g = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in _grads(step).items()})
        u, state = otx.update(g, state, p)
        p = optax.apply_updates(p, u)
    for k, val in traverse_util.flatten_dict(p).items():
        np.testing.assert_allclose(np.asarray(val), traj[-1]["/".join(k)], rtol=1e-5, atol=1e-7)
