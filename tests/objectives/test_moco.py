"""MoCo v3 (and MoCo v2's queue): components against NumPy transcriptions of the references,
the objective inside the trainer (8 devices == 1, the momentum update before the keys,
gradient accumulation, resume with the queue), config errors, and a short learning run.

References: facebookresearch/moco-v3 @ c349e6e (moco/builder.py, main_moco.py, vits.py),
facebookresearch/moco @ 7397dfe (moco/builder.py: the queue, ``_dequeue_and_enqueue``).
The full training step is checked by tests/reference/test_moco_trajectory.py.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import testing

from fmjax.data import pipeline
from fmjax.errors import ConfigError
from fmjax.models.layers import get_2d_sincos_pos_embed
from fmjax.objectives import dino as dino_lib
from fmjax.objectives import moco as moco_lib
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import loop, setup, validate
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step

ONE_DEVICE = jax.devices()[:1]


# -- NumPy transcriptions of the references -------------------------------------------------------

def np_normalize(x):                                  # F.normalize(x, dim=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_contrastive_loss(q, k, T):
    """moco-v3 builder.py MoCo.contrastive_loss (world size 1), and d loss / d q (k has no
    gradient: the momentum encoder runs under no_grad)."""
    qn, kn = np_normalize(q), np_normalize(k)
    logits = qn @ kn.T / T
    n = len(q)
    loss = -np.mean(np_log_softmax(logits)[np.arange(n), np.arange(n)]) * (2 * T)
    d_logits = (np.exp(np_log_softmax(logits)) - np.eye(n)) / n * (2 * T)
    d_qn = d_logits @ kn / T
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    d_q = (d_qn - qn * np.sum(d_qn * qn, axis=1, keepdims=True)) / norm
    return loss, d_q


def np_queue_loss(q, k, queue_dk, T):
    """moco (v2) builder.py forward's logits / labels + CrossEntropyLoss, and d loss / d q.
    ``queue_dk``: v2's [dim, K] layout."""
    qn, kn = np_normalize(q), np_normalize(k)
    l_pos = np.sum(qn * kn, axis=1, keepdims=True)
    l_neg = qn @ queue_dk
    logits = np.concatenate([l_pos, l_neg], axis=1) / T
    n = len(q)
    loss = -np.mean(np_log_softmax(logits)[:, 0])
    d_logits = np.exp(np_log_softmax(logits))
    d_logits[:, 0] -= 1
    d_logits /= n * T
    d_qn = d_logits[:, :1] * kn + d_logits[:, 1:] @ queue_dk.T
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return loss, (d_qn - qn * np.sum(d_qn * qn, axis=1, keepdims=True)) / norm


class NpQueue:
    """moco (v2) builder.py's queue buffer and ``_dequeue_and_enqueue`` (world size 1)."""

    def __init__(self, queue_dk):
        self.queue = queue_dk.copy()          # [dim, K]
        self.queue_ptr = np.zeros(1, np.int64)
        self.K = queue_dk.shape[1]

    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr[0])          # torch: int() of a 1-element tensor
        assert self.K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr


def np_build_2d_sincos_position_embedding(h, w, embed_dim, temperature=10000.):
    """vits.py build_2d_sincos_position_embedding (torch.meshgrid: 'ij' indexing), in NumPy."""
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32),
                                 indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1. / temperature ** (np.arange(pos_dim, dtype=np.float32) / pos_dim)
    out_w = np.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = np.einsum("m,d->md", grid_h.flatten(), omega)
    pos = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), pos], axis=0)


# -- components ----------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [0.2, 1.0])
def test_contrastive_loss_and_gradient_match_reference(T):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(12, 16)), rng.normal(size=(12, 16))
    want, want_grad = np_contrastive_loss(q, k, T)
    fn = lambda q_: moco_lib.contrastive_loss(q_, jnp.asarray(k, jnp.float32), T, 2 * T)[0]
    got, grad = jax.value_and_grad(fn)(jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    # Accuracy of the positive key; a query equal to its key is found at T -> small.
    _, acc = moco_lib.contrastive_loss(jnp.asarray(k), jnp.asarray(k), 0.05, 1.0)
    assert acc == 1.0


def test_queue_loss_and_gradient_match_moco_v2():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    queue_dk = np_normalize(rng.normal(size=(64, 16))).T       # v2's [dim, K]
    want, want_grad = np_queue_loss(q, k, queue_dk, 0.07)
    fn = lambda q_: moco_lib.queue_loss(q_, jnp.asarray(k, jnp.float32),
                                        jnp.asarray(queue_dk.T, jnp.float32), 0.07, 1.0)[0]
    got, grad = jax.value_and_grad(fn)(jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_dequeue_and_enqueue_matches_moco_v2_with_wrap_around():
    rng = np.random.default_rng(2)
    dim, K, n = 4, 24, 8
    init = np_normalize(rng.normal(size=(dim, K)).T).T
    ref = NpQueue(init)
    queue, ptr = jnp.asarray(init.T, jnp.float32), jnp.int32(0)
    update = jax.jit(moco_lib.dequeue_and_enqueue)
    ptrs = []
    for step in range(7):                       # 7 x 8 keys in a 24-key queue: wraps twice
        keys = np_normalize(rng.normal(size=(n, dim)))
        ref._dequeue_and_enqueue(keys)
        queue, ptr = update(queue, ptr, jnp.asarray(keys, jnp.float32))
        np.testing.assert_allclose(np.asarray(queue).T, ref.queue, rtol=1e-6)
        assert int(ptr) == int(ref.queue_ptr[0])
        ptrs.append(int(ptr))
    assert ptrs == [8, 16, 0, 8, 16, 0, 8]
    with pytest.raises(ValueError, match="multiple"):
        moco_lib.dequeue_and_enqueue(queue, ptr, jnp.zeros((5, dim)))


def test_momentum_schedule_matches_reference():
    """main_moco.py adjust_moco_momentum(epoch + i / iters_per_epoch) == the step schedule, and
    the same cosine as DINO's ema_momentum."""
    epochs, iters, m0 = 5, 7, 0.99
    total = epochs * iters
    for epoch in range(epochs):
        for i in range(iters):
            e = epoch + i / iters
            want = 1. - 0.5 * (1. + math.cos(math.pi * e / epochs)) * (1. - m0)
            m, one_minus = moco_lib.momentum_schedule(epoch * iters + i, m0, total)
            np.testing.assert_allclose(m, want, rtol=1e-7)
            np.testing.assert_allclose(one_minus, 1 - want, rtol=1e-5)
            np.testing.assert_allclose(m, dino_lib.ema_momentum(epoch * iters + i, m0, total), rtol=1e-7)
    m, one_minus = moco_lib.momentum_schedule(3, m0, total, cos=False)   # without --moco-m-cos
    assert float(m) == np.float32(m0) and float(one_minus) == np.float32(1 - m0)


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (3, 5)])
def test_sincos_moco_is_vits_table_and_not_maes(grid):
    h, w = grid
    want = np_build_2d_sincos_position_embedding(h, w, 32)
    got = get_2d_sincos_pos_embed(32, (h, w), cls_token=True, layout="moco_v3")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    mae = get_2d_sincos_pos_embed(32, (h, w), cls_token=True)
    assert np.abs(mae - got).max() > 0.1                  # MAE's table is another one
    if h == w:  # square: MAE's [col | row] halves swapped into MoCo's [row | col]
        np.testing.assert_allclose(np.concatenate([mae[:, 16:], mae[:, :16]], axis=1), got, atol=1e-6)


def test_vit_sincos_moco_uses_the_table():
    from fmjax.models.vit import ViT
    model = ViT(width=32, depth=0, num_heads=2, mlp_dim=64, patch_size=8, pos_embed="sincos_moco")
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    assert "pos_embed" not in params                      # fixed, not trained
    params = jax.tree.map(jnp.zeros_like, params)         # zero patch projection and cls token
    params["encoder"]["norm"]["scale"] = jnp.ones(32)
    tokens = model.apply({"params": params}, x)["tokens"]
    want = get_2d_sincos_pos_embed(32, 4, cls_token=True, layout="moco_v3")
    # depth 0: tokens = final LayerNorm(position table) with unit scale, zero bias
    norm = (want - want.mean(-1, keepdims=True)) / np.sqrt(want.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(tokens[0, 1:], norm[1:], atol=1e-4)


# -- the objective inside the trainer -----------------------------------------------------------

def _moco_config(tiny_config, **kw):
    base = {"objective.dim": 16, "objective.mlp_dim": 32}
    base.update(kw)
    return tiny_config("moco", **base)


def _fixed_batch(b=16, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {"global_crops": rng.normal(size=(b, 2, size, size, 3)).astype(np.float32)}


def _run(config, batch, devices, steps=1):
    """Trainer steps on ``batch``: (initial state, [state after each step], [metrics])."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, devices)
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    first = jax.device_get(state)
    step_fn = make_train_step(objective, tx, schedule, rules, config.get("grad_accum_steps", 1))
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    states, metrics = [], []
    with mesh_context(mesh):
        for _ in range(steps):
            state, m = jitted(state, pipeline.global_batch(batch, mesh))
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
    return first, states, metrics, shardings


def _close(a, b, rtol=1e-5, atol=1e-6, scale_atol=0.0):
    """Leaf by leaf; ``scale_atol`` adds that fraction of the leaf's largest |value| to atol."""
    jax.tree_util.tree_map_with_path(lambda p, x, y: np.testing.assert_allclose(
        x, y, rtol=rtol, atol=max(atol, scale_atol * float(np.abs(y).max(initial=0))),
        err_msg=jax.tree_util.keystr(p)), a, b)


def test_sharded_step_with_queue_equals_one_device(tiny_config):
    """8 devices (data 2 x fsdp 4) == 1 device: loss, params, momentum encoder, queue; the
    queue is split along its first axis over the data axes. SGD: Adam would turn the float
    noise of the gradients that are 0 in exact arithmetic (key biases, the final norm's bias:
    tests/reference/test_moco_trajectory.py) into full steps."""
    kw = {"objective.queue_size": 64, "total_steps": 8, "optimizer.name": "sgd", "optimizer.lr": 0.05,
          "optimizer.lr_scaling": "none", "optimizer.momentum": 0.9, "optimizer.warmup_steps": 0,
          "optimizer.decay": "constant"}
    c8 = _moco_config(tiny_config, mesh={"data": 2, "fsdp": 4, "tensor": 1}, **kw)
    batch = _fixed_batch()
    _, s8, m8, sh8 = _run(c8, batch, jax.devices()[:8], steps=3)
    c1 = _moco_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, **kw)
    _, s1, m1, _ = _run(c1, batch, ONE_DEVICE, steps=3)
    assert tuple(sh8.extra["queue"].spec)[0] == ("data", "fsdp")
    for a, b in zip(m8, m1):
        for k in ("loss", "contrastive_acc", "q_std", "momentum"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
    _close(s8[-1].params, s1[-1].params, rtol=1e-4, atol=1e-6, scale_atol=1e-5)
    _close(s8[-1].extra, s1[-1].extra, rtol=1e-4, atol=1e-6, scale_atol=1e-5)
    assert int(s1[-1].extra["queue_ptr"]) == (3 * 2 * 16) % 64


def test_momentum_update_before_the_keys_and_queue_contents(tiny_config):
    """Step t: momentum_t+1 = m_t * momentum_t + (1 - m_t) * params_t (the params BEFORE step
    t's update, as builder.py's forward); the queue gets [k2; k1] of that momentum encoder."""
    c = _moco_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, total_steps=8,
                     **{"objective.queue_size": 64, "objective.momentum": 0.8})
    batch = _fixed_batch()
    first, (s1, s2), _, _ = _run(c, batch, ONE_DEVICE, steps=2)
    obj = make_objective(c)
    np.testing.assert_array_equal(jax.tree.leaves(first.extra["momentum"])[0],
                                  jax.tree.leaves(first.params)[0])   # starts as a copy
    m1, om1 = (float(x) for x in moco_lib.momentum_schedule(1, 0.8, 8))
    want = jax.tree.map(lambda t, s: t * m1 + s * om1, s1.extra["momentum"], obj._encoders(s1.params))
    _close(s2.extra["momentum"], want, rtol=1e-6, atol=1e-7)
    # The queue after step 1: rows 0..31 = normalised keys of view 2 then view 1, the rest untouched.
    mom = s1.extra["momentum"]
    k = obj._project(mom["projector"], obj._features(mom["backbone"], jnp.asarray(batch["global_crops"]), False)[0])
    keys = np.concatenate([moco_lib.l2_normalize(k[1]), moco_lib.l2_normalize(k[0])])
    np.testing.assert_allclose(s1.extra["queue"][:32], keys, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(s1.extra["queue"][32:], first.extra["queue"][32:])
    np.testing.assert_allclose(np.linalg.norm(first.extra["queue"], axis=1), 1.0, rtol=1e-5)
    assert int(s1.extra["queue_ptr"]) == 32 and int(s2.extra["queue_ptr"]) == 0


def test_moco_v2_style_asymmetric_queue(tiny_config):
    """symmetric=False, no predictor, no 2T scale (MoCo v2's loss on the ViT): one term
    ctr(q1, k2) against the queue, and only view 2's keys are enqueued."""
    c = _moco_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, total_steps=8,
                     **{"objective.queue_size": 48, "objective.symmetric": False,
                        "objective.predictor_layers": 0, "objective.scale_2t": False})
    batch = _fixed_batch()
    first, (s1,), (m1,), _ = _run(c, batch, ONE_DEVICE)
    obj = make_objective(c)
    assert "predictor" not in first.params and int(s1.extra["queue_ptr"]) == 16
    mom = s1.extra["momentum"]
    views = jnp.asarray(batch["global_crops"])
    k2 = obj._project(mom["projector"], obj._features(mom["backbone"], views[:, 1:], False)[0])[0]
    np.testing.assert_allclose(s1.extra["queue"][:16], moco_lib.l2_normalize(k2), rtol=1e-4, atol=1e-5)
    # The loss of step 0 is v2's: q of view 1 (params before the step) against k2 and the old queue.
    q1 = obj._project(first.params["projector"], obj._features(first.params["backbone"], views[:, :1], False)[0])[0]
    want, _ = np_queue_loss(np.asarray(q1, np.float64), np.asarray(k2, np.float64),
                            np.asarray(first.extra["queue"], np.float64).T, c.objective.temperature)
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)


def test_grad_accumulation_is_exact(tiny_config):
    """grad_accum_steps=2 == 1: the heads' BatchNorm and the loss see the whole batch."""
    kw = dict(mesh={"data": 1, "fsdp": 1, "tensor": 1}, total_steps=8, **{"objective.queue_size": 64})
    batch = _fixed_batch()
    _, (a,), ma, _ = _run(_moco_config(tiny_config, grad_accum_steps=2, **kw), batch, ONE_DEVICE)
    _, (b,), mb, _ = _run(_moco_config(tiny_config, **kw), batch, ONE_DEVICE)
    np.testing.assert_allclose(ma[0]["loss"], mb[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(ma[0]["grad_norm"], mb[0]["grad_norm"], rtol=1e-5)
    _close(a.params, b.params, rtol=1e-5, atol=1e-6)
    _close(a.extra, b.extra, rtol=1e-5, atol=1e-6)


def test_frozen_patch_projection(tiny_config):
    """--stop-grad-conv1 (optimizer.frozen): the patch projection stays bit-identical (no step,
    no decay) and keeps no Adam state, while the rest trains."""
    c = _moco_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, total_steps=8)
    first, (_, s2), _, _ = _run(c, _fixed_batch(), ONE_DEVICE, steps=2)   # step 0 has lr 0
    pe0, pe2 = first.params["backbone"]["patch_embed"], s2.params["backbone"]["patch_embed"]
    jax.tree.map(np.testing.assert_array_equal, pe0, pe2)
    assert not np.allclose(first.params["backbone"]["encoder"]["block_0"]["norm1"]["bias"],
                           s2.params["backbone"]["encoder"]["block_0"]["norm1"]["bias"])
    slots = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(s2.opt_state)[0]]
    frozen = [x for p, x in slots if "patch_embed" in p]
    assert frozen and all(np.ndim(x) == 0 for x in frozen)
    assert any(np.ndim(x) > 0 for p, x in slots if "block_0" in p)


@pytest.mark.parametrize("overrides, match", [
    ({"objective.queue_size": 100}, r"queue_size=100 is not a multiple of the 32 keys"),
    ({"objective.queue_size": 48, "objective.symmetric": False}, None),
    ({"objective.queue_size": 40, "objective.symmetric": False}, r"multiple of the 16 keys"),
    ({"objective.temperature": 0.0}, r"temperature=0.0 must be > 0"),
    ({"objective.momentum": 1.5}, r"momentum=1.5 must be in \[0, 1\]"),
    ({"objective.predictor_last_bn": "bn"}, r"predictor_last_bn='bn'"),
    ({"objective.projector_layers": 0}, r"projector_layers=0 must be >= 1"),
    ({"objective.param_init": "torch"}, r"param_init='torch'"),
    ({"evals": {"images": {"type": "images", "split": "validation"}}}, r"evals.images: MoCo's pictures"),
])
def test_config_errors_are_one_line(tiny_config, overrides, match):
    c = _moco_config(tiny_config, **overrides)
    if match is None:
        objective, mesh, _ = setup.build(c)
        validate.check(c, objective, mesh, evals=True)
        return
    with pytest.raises(ConfigError, match=match) as info:
        objective, mesh, _ = setup.build(c)
        validate.check(c, objective, mesh, evals=True)
    assert "\n" not in str(info.value)


def test_features_visualize_and_health(tiny_config):
    c = _moco_config(tiny_config)
    obj = make_objective(c)
    batch = {"global_crops": jnp.asarray(_fixed_batch(b=8, size=32)["global_crops"])}
    params, extra = jax.tree.map(lambda x: x, obj.init(jax.random.PRNGKey(0), batch))
    from flax import linen as nn
    params, extra = nn.meta.unbox(params), nn.meta.unbox(extra)
    feats = obj.features(params, extra, batch["global_crops"][:, 0])
    assert feats.shape == (8, c.model.width)
    pics = obj.visualize(params, extra, batch, jax.random.PRNGKey(0))
    assert pics["views"].dtype == np.uint8 and pics["views"].shape == (3 * 32 + 4 * 2, 8 * 32 + 9 * 2, 3)
    assert obj.health({"train/q_std": 0.9}) is None
    assert "collapse" in obj.health({"train/q_std": 0.01})


@pytest.mark.parametrize("preset, width", [("vit_s16_imagenet", 384), ("vit_b16_imagenet", 768)])
def test_paper_presets_carry_the_reference_hyper_parameters(preset, width):
    """CONFIG.md's ViT commands: -b 4096 --optimizer=adamw --lr=1.5e-4 --weight-decay=.1
    --epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2 (moco-m 0.99,
    dim 256, mlp-dim 4096 by default)."""
    from fmjax.testing import load_config
    c = load_config("moco", preset)
    steps_per_epoch = 1281167 // 4096
    assert c.batch_size == 4096 and c.total_steps == 300 * steps_per_epoch
    assert c.optimizer.warmup_steps == 40 * steps_per_epoch
    assert opt_lib.peak_learning_rate(c.optimizer, c.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
    assert (c.optimizer.name, c.optimizer.weight_decay, c.optimizer.min_lr) == ("adamw", 0.1, 0.0)
    assert c.optimizer.decay_all and c.optimizer.frozen == ("backbone/patch_embed/.*",)
    o = c.objective
    assert (o.temperature, o.momentum, o.momentum_cos, o.dim, o.mlp_dim) == (0.2, 0.99, True, 256, 4096)
    assert c.model.pos_embed == "sincos_moco" and c.model.pool == "cls"
    obj = make_objective(c)
    assert obj.backbone.width == width and obj.patch_size == 16


def test_resnet50_preset_is_config_md_100_epochs():
    """CONFIG.md's ResNet-50 100-epoch command = main_moco.py's defaults (LARS, lr 0.6 x B/256,
    wd 1e-6, 10 warm-up epochs, T 1.0, m 0.99, dim 256, mlp-dim 4096) + --moco-m-cos
    --crop-min=.2; MoCo_ResNet's heads (projector 2 layers with the last BN, predictor 2
    without) on torchvision's ResNet-50 with zero_init_residual."""
    from fmjax.testing import load_config
    c = load_config("moco", "resnet50_imagenet")
    spe = 1281167 // 4096
    assert (c.batch_size, c.total_steps, c.optimizer.warmup_steps) == (4096, 100 * spe, 10 * spe)
    assert (c.optimizer.name, c.optimizer.weight_decay, c.optimizer.momentum) == ("lars", 1e-6, 0.9)
    assert opt_lib.peak_learning_rate(c.optimizer, 4096) == pytest.approx(9.6)
    assert not c.optimizer.get("frozen") and not c.optimizer.get("lars_lr_in_momentum")
    o = c.objective
    assert (o.temperature, o.momentum, o.momentum_cos, o.projector_layers, o.predictor_last_bn) == \
        (1.0, 0.99, True, 2, "none")
    assert "scale=(0.2, 1.0)" in c.data.pp_train
    assert (c.model.name, c.model.variant, c.model.zero_init_residual) == ("resnet", "50", True)
    obj = make_objective(c)
    assert obj.state_keys == ("batch_stats",) and obj.backbone.width == 2048
    obj.check(c)
    c.grad_accum_steps = 2
    with pytest.raises(ConfigError, match="BatchNorm backbone"):
        obj.check(c)


def test_resnet_backbone_per_view_statistics_and_sharding(tiny_config):
    """A BatchNorm backbone: the base and momentum encoders each run view 1 then view 2 in
    training mode and keep their own running statistics (the momentum update leaves them
    alone); 8 simulated devices step as one (statistics over the global batch: SyncBN)."""
    resnet = dict(name="resnet", depths=(1, 1), dims=(8, 16), stem_width=8, stem="cifar", block="basic")
    batch = _fixed_batch()
    runs = []
    for mesh, devices in (({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8]),
                          ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])):
        c = _moco_config(tiny_config, mesh=mesh, total_steps=8)
        c.model = dict(resnet)
        c.optimizer.frozen = ()   # the ViT presets' frozen patch projection
        runs.append(_run(c, batch, devices, steps=2))
    (_, s8, m8, _), (first, s1, m1, _) = runs
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    _close((s8[-1].params, s8[-1].extra), (s1[-1].params, s1[-1].extra), rtol=1e-4, atol=1e-6)
    obj = make_objective(c)
    views = jnp.asarray(batch["global_crops"])
    state = {"batch_stats": first.extra["batch_stats"]}
    m_state = {"batch_stats": first.extra["momentum_batch_stats"]}
    m, om = (float(x) for x in moco_lib.momentum_schedule(0, c.objective.momentum, c.total_steps))
    key_backbone = jax.tree.map(lambda t, s: t * m + s * om, first.extra["momentum"]["backbone"],
                                first.params["backbone"])
    for i in range(2):
        _, state = obj.backbone.apply({"params": first.params["backbone"], **state}, views[:, i],
                                      train=True, mutable=["batch_stats"])
        _, m_state = obj.backbone.apply({"params": key_backbone, **m_state}, views[:, i],
                                        train=True, mutable=["batch_stats"])
    _close(s1[0].extra["batch_stats"], state["batch_stats"], rtol=1e-5, atol=1e-6)
    _close(s1[0].extra["momentum_batch_stats"], m_state["batch_stats"], rtol=1e-5, atol=1e-6)


# -- resume ------------------------------------------------------------------------------------

def _stop_after(n):
    return testing.stop_after(n)


def _saved_state(workdir, step):
    import orbax.checkpoint as ocp
    return jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_interrupted_and_resumed_equals_uninterrupted_with_queue(tiny_config, tmp_path, monkeypatch):
    """N steps, stop, resume to 2N == 2N straight: params, optimizer state, momentum encoder,
    queue and its pointer (the queue wraps around within the run)."""
    n = 3
    config = _moco_config(tiny_config, total_steps=2 * n, checkpoint_every=4,
                          **{"objective.queue_size": 64})
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", _stop_after(n))
        assert loop.train_and_evaluate(config, resumed, devices=ONE_DEVICE)["step"] == n
    loop.train_and_evaluate(config, resumed, devices=ONE_DEVICE)
    loop.train_and_evaluate(config, straight, devices=ONE_DEVICE)
    lr, ls = _losses(resumed), _losses(straight)
    assert sorted(lr) == sorted(ls) == list(range(1, 2 * n + 1))
    for step in lr:
        np.testing.assert_allclose(lr[step], ls[step], rtol=1e-6, err_msg=f"loss at step {step}")
    a, b = _saved_state(resumed, 2 * n), _saved_state(straight, 2 * n)
    assert int(a["extra"]["queue_ptr"]) == (2 * n * 2 * 16) % 64 == 0
    _close(a, b, rtol=0, atol=1e-7)


# -- learning ------------------------------------------------------------------------------------

@pytest.mark.optimized
@pytest.mark.slow
def test_default_preset_loss_falls_and_writes_views(default_config, tmp_path):
    """The default preset's first 150 of 600 steps (same schedule): the loss falls well below
    its start and the views grid is written. (The kNN gate is the cpu preset's: see the
    configs/moco.py docstring.)"""
    c = default_config("moco")
    c.log_every, c.checkpoint_every = 10, 1000
    c.evals = dict(images=c.evals.images)
    c.eval_every = 1000                          # the pictures at step 0 only
    with pytest.MonkeyPatch.context() as m:      # stop after 200 steps, as a preemption would
        m.setattr(loop, "_Preemption", _stop_after(150))
        assert loop.train_and_evaluate(c, str(tmp_path), devices=ONE_DEVICE)["step"] == 150
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    print("MoCo default losses:", {k: round(v, 3) for k, v in losses.items()})
    start = np.mean([losses[s] for s in (10, 20)])
    end = np.mean([losses[s] for s in range(110, 151, 10)])
    assert end < start - 0.2, (start, end)      # measured 3.11 -> 2.76 (mean of steps 10-20 -> 110-150)
    assert any(n.startswith("images_views") for n in os.listdir(os.path.join(tmp_path, "images")))
