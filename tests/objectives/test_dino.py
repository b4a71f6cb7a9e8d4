"""DINO: loss, centering, EMA and schedules against an independent NumPy transcription of the
reference (facebookresearch/dino ``DINOLoss``, ``cosine_scheduler``, ``clip_gradients``), the
sharded loss/center against 1 device, and the last-layer freeze as an optimizer skip.
"""
import jax
import numpy as np
import optax
import pytest

from fmjax.data import transforms
from fmjax.objectives import dino
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step
from fmjax.parallel.mesh import batch_sharding
from fmjax.data import pipeline


# -- the reference, transcribed in NumPy (crop-major chunks, as DINOLoss.forward) -------------

def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp, center_momentum):
    """``student_output`` [ncrops * B, K] and ``teacher_output`` [2 * B, K], crop-major."""
    student_out = np.split(student_output / student_temp, ncrops)
    teacher_out = np.split(_np_softmax((teacher_output - center) / temp), 2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = np.sum(-q * _np_log_softmax(student_out[v]), axis=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = np.sum(teacher_output, axis=0, keepdims=True) / len(teacher_output)
    return total_loss, center * center_momentum + batch_center * (1 - center_momentum)


def np_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def _outputs(b=8, v=6, k=32, seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(b, v, k)).astype(np.float32) * 3
    teacher = rng.normal(size=(b, 2, k)).astype(np.float32) * 3
    center = rng.normal(size=(1, k)).astype(np.float32) * 0.5
    return student, teacher, center


def _crop_major(x):  # [B, V, K] -> [V * B, K]
    return np.transpose(x, (1, 0, 2)).reshape(-1, x.shape[-1])


@pytest.mark.parametrize("views", [2, 6])
def test_loss_and_center_match_reference(views):
    student, teacher, center = _outputs(v=views)
    loss, new_center, mon = dino.dino_loss(student, teacher, center, 0.1, 0.05, 0.9)
    ref_loss, ref_center = np_dino_loss(_crop_major(student), _crop_major(teacher), center,
                                        views, 0.1, 0.05, 0.9)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_center), ref_center, rtol=1e-5, atol=1e-6)
    # Monitors: entropy of the centred, sharpened teacher; KL = cross-entropy - entropy >= 0.
    logits = (teacher - center) / 0.05
    ent = -(_np_softmax(logits) * _np_log_softmax(logits)).sum(-1).mean()
    np.testing.assert_allclose(float(mon["teacher_entropy"]), ent, rtol=1e-4)
    np.testing.assert_allclose(float(mon["kl"]), ref_loss - ent, rtol=1e-4, atol=1e-5)
    assert float(mon["kl"]) > 0


def test_same_view_pairs_are_skipped():
    """With 2 views the loss is (CE(t0, s1) + CE(t1, s0)) / 2: no term pairs a view with itself."""
    student, teacher, center = _outputs(v=2)
    loss = float(dino.dino_loss(student, teacher, center, 0.1, 0.05, 0.9)[0])
    t = _np_softmax((teacher - center) / 0.05)
    s = _np_log_softmax(student / 0.1)
    ce = lambda i, v: -(t[:, i] * s[:, v]).sum(-1).mean()
    np.testing.assert_allclose(loss, (ce(0, 1) + ce(1, 0)) / 2, rtol=1e-5)
    assert abs(loss - (ce(0, 0) + ce(1, 1)) / 2) > 1e-2


def test_schedules_match_reference():
    total, warm = 50, 12
    steps = np.arange(total)
    mom = np.asarray(jax.vmap(lambda s: dino.ema_momentum(s, 0.996, total))(steps))
    np.testing.assert_allclose(mom, np_cosine_scheduler(0.996, 1.0, total, 1), rtol=0, atol=1e-6)
    temp = np.asarray(jax.vmap(lambda s: dino.teacher_temperature(s, 0.04, 0.07, warm))(steps))
    ref = np.concatenate((np.linspace(0.04, 0.07, warm), np.ones(total - warm) * 0.07))
    np.testing.assert_allclose(temp, ref, atol=1e-7)
    wd = opt_lib.make_wd_schedule(dict(weight_decay=0.04, weight_decay_end=0.4), total)
    np.testing.assert_allclose(np.asarray(jax.vmap(wd)(steps)), np_cosine_scheduler(0.04, 0.4, total, 1),
                               atol=1e-7)


@pytest.mark.parametrize("warm_epochs", [0, 1, 2, 5])
@pytest.mark.parametrize("every", [1, 3])
def test_teacher_temperature_matches_reference_schedule(warm_epochs, every):
    """DINOLoss.teacher_temp_schedule, indexed by epoch = step // every: a one-epoch warm-up
    gives the START temperature in epoch 0 (np.linspace(a, b, 1) == [a]), none gives the final."""
    epochs = 8
    ref = np.concatenate((np.linspace(0.04, 0.07, warm_epochs), np.ones(epochs - warm_epochs) * 0.07))
    steps = np.arange(epochs * every)
    temp = np.asarray(jax.vmap(lambda s: dino.teacher_temperature(s, 0.04, 0.07, warm_epochs * every, every))(steps))
    np.testing.assert_allclose(temp, ref[steps // every], rtol=0, atol=1e-7)


def test_teacher_temp_every_must_divide_the_warmup(tiny_config):
    c = _dino_config(tiny_config)
    c.objective.update(dict(warmup_teacher_temp_steps=10, teacher_temp_every=3))
    with pytest.raises(ValueError, match="teacher_temp_every=3"):
        make_objective(c)


def test_per_param_clipping_matches_reference():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(5, 4)).astype(np.float32) * 3, "b": rng.normal(size=(3,)).astype(np.float32) * 0.1}
    out, _ = opt_lib.clip_by_param_norm(1.5).update(grads, optax.EmptyState())
    for k, g in grads.items():  # clip_gradients: per tensor, coef = clip / (norm + 1e-6) when < 1
        norm = np.linalg.norm(g)
        coef = 1.5 / (norm + 1e-6)
        np.testing.assert_allclose(np.asarray(out[k]), g * coef if coef < 1 else g, rtol=1e-6)


def test_multi_crop_views_and_determinism():
    op = transforms.parse("multi_crop(32, 16, 3)")
    ex = {"image": np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)}
    a, b = op(ex, np.random.default_rng(1)), op(ex, np.random.default_rng(1))
    assert a["global_crops"].shape == (2, 32, 32, 3) and a["local_crops"].shape == (3, 16, 16, 3)
    assert a["global_crops"].dtype == np.float32
    np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
    np.testing.assert_array_equal(a["local_crops"], b["local_crops"])
    assert not np.allclose(a["global_crops"][0], a["global_crops"][1])   # two different views
    c = op(ex, np.random.default_rng(2))
    assert not np.allclose(a["local_crops"], c["local_crops"])



def test_multi_crop_rot90():
    """rot90=True turns each view by k * 90 degrees: a bright block in the top-left corner
    shows up in the bottom half of some global views; without it (flips only) never."""
    img = np.full((40, 40, 3), 100, np.uint8)
    img[:10, :10] = 255

    def bottom_half_seen(spec):
        op = transforms.parse(spec)
        seen = []
        for seed in range(40):
            v = op({"image": img}, np.random.default_rng(seed))["global_crops"][0]
            dev = np.abs(v - np.median(v, axis=(0, 1))).mean(-1)
            seen.append(np.unravel_index(np.argmax(dev), dev.shape)[0] >= 16)
        return any(seen)

    common = "multi_crop(32, 16, 1, global_scale=(1.0, 1.0)"
    assert not bottom_half_seen(common + ")")
    assert bottom_half_seen(common + ", rot90=True)")
    with pytest.raises(ValueError, match="rot90=True needs square crops"):
        transforms.parse("multi_crop((32, 24), 16, 1, rot90=True)")

# -- the objective inside the trainer ----------------------------------------------------------

def _dino_config(tiny_config, **kw):
    return tiny_config("dino", **kw)


def _fixed_batch(objective, b=16, seed=0):
    rng = np.random.default_rng(seed)
    out = {"global_crops": rng.normal(size=(b, 2, 16, 16, 3)).astype(np.float32)}
    if "local_crops" in objective.batch_keys:
        out["local_crops"] = rng.normal(size=(b, objective.num_local, 8, 8, 3)).astype(np.float32)
    return out


def _run(config, batch, devices, steps=1):
    """Trainer steps on ``batch``: (initial state, [state after each step], [metrics])."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, devices)
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    first = jax.device_get(state)
    step_fn = make_train_step(objective, tx, schedule, rules)
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    states, metrics = [], []
    with mesh_context(mesh):
        for _ in range(steps):
            state, m = jitted(state, pipeline.global_batch(batch, mesh))
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
    return first, states, metrics


def test_sharded_loss_and_center_equal_one_device(tiny_config):
    c = _dino_config(tiny_config, mesh={"data": 2, "fsdp": 4, "tensor": 1})
    batch = _fixed_batch(make_objective(c))
    _, (_, s8), m8 = _run(c, batch, jax.devices()[:8], steps=2)
    c1 = _dino_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    _, (_, s1), m1 = _run(c1, batch, jax.devices()[:1], steps=2)
    for a, b in zip(m8, m1):
        for k in ("loss", "teacher_entropy", "kl"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
    np.testing.assert_allclose(s8.extra["center"], s1.extra["center"], rtol=1e-5, atol=1e-7)
    assert np.abs(s1.extra["center"]).max() > 0           # the center really moved


def test_ema_teacher_and_last_layer_freeze(tiny_config):
    c = _dino_config(tiny_config, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    c.objective.freeze_last_layer_steps = 2
    c.objective.momentum_teacher = 0.9
    c.optimizer.update(dict(lr_scaling="none", lr=1e-2, warmup_steps=0, weight_decay=0.1,
                            weight_decay_end=0.1))
    batch = _fixed_batch(make_objective(c))
    first, (after1, _, after3), _ = _run(c, batch, jax.devices()[:1], steps=3)
    # EMA: teacher_1 = m_0 * teacher_0 + (1 - m_0) * student_1, with m_0 from the cosine schedule.
    m0 = np_cosine_scheduler(0.9, 1.0, c.total_steps, 1)[0]
    expect = jax.tree.map(lambda t, s: m0 * t + (1 - m0) * s, first.extra["teacher"], after1.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), after1.extra["teacher"], expect)
    # Frozen last layer: unchanged (no weight decay either) and its Adam moments untouched.
    np.testing.assert_array_equal(after1.params["head"]["last_layer_v"], first.params["head"]["last_layer_v"])
    adam_types = (optax.ScaleByAdamState, opt_lib.PerParamAdamState)
    adam = [s for s in jax.tree.leaves(after1.opt_state, is_leaf=lambda x: isinstance(x, adam_types))
            if isinstance(s, adam_types)][0]
    mu = adam.mu
    assert np.all(mu["head"]["last_layer_v"] == 0)
    if isinstance(adam, opt_lib.PerParamAdamState):  # the preset's adam_count='per_param'
        assert adam.count["head"]["last_layer_v"] == 0 and adam.count["head"]["mlp_0"]["kernel"] == 1
    assert np.any(mu["head"]["mlp_0"]["kernel"] != 0)
    assert not np.allclose(after1.params["head"]["mlp_0"]["kernel"], first.params["head"]["mlp_0"]["kernel"])
    # After the freeze it trains.
    assert not np.allclose(after3.params["head"]["last_layer_v"], first.params["head"]["last_layer_v"])


def test_collapse_warnings(tiny_config):
    obj = make_objective(_dino_config(tiny_config))
    ln_k = np.log(obj.head.out_dim)
    assert obj.health({"train/teacher_entropy": 0.5 * ln_k, "train/kl": 1.0}) is None
    assert "near 0" in obj.health({"train/teacher_entropy": 0.001, "train/kl": 0.001})
    assert "ln(out_dim)" in obj.health({"train/teacher_entropy": 0.999 * ln_k, "train/kl": 0.01})


def test_head_with_batch_norm_matches_reference_use_bn():
    """objective.use_bn_in_head: dino's vision_transformer.py DINOHead(use_bn=True) in
    training mode (Linear -> BatchNorm1d -> GELU per hidden layer, then the bottleneck), here
    transcribed in torch with the same weights."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    from fmjax.models.dino_head import DINOHead

    head = DINOHead(out_dim=16, hidden_dim=12, bottleneck_dim=8, num_layers=3, use_bn=True)
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    import flax
    params = flax.linen.meta.unbox(head.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    out = np.asarray(head.apply({"params": params}, jnp.asarray(x)))

    t = torch.tensor(x)
    for i in range(3):
        lin = torch.nn.Linear(*params[f"mlp_{i}"]["kernel"].shape)
        lin.weight.data = torch.tensor(params[f"mlp_{i}"]["kernel"].T.copy())
        lin.bias.data = torch.tensor(params[f"mlp_{i}"]["bias"])
        t = lin(t)
        if i < 2:
            bn = torch.nn.BatchNorm1d(t.shape[1]).train()
            bn.weight.data = torch.tensor(params[f"bn_{i}_scale"])
            bn.bias.data = torch.tensor(params[f"bn_{i}_bias"])
            t = torch.nn.functional.gelu(bn(t))
    t = torch.nn.functional.normalize(t, dim=-1, p=2)
    v = torch.tensor(params["last_layer_v"])
    ref = (t @ (v / v.norm(dim=0, keepdim=True))).detach().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
