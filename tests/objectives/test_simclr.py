"""SimCLR: NT-Xent and its gradients against a NumPy transcription of google-research/simclr's
``add_contrastive_loss`` and metrics; the projection head against SimCLR's ProjectionHead; the
sharded step (8 simulated devices) against 1 device; exact resume; the config checks; and a
shortened learning run (slow).

Reference: google-research/simclr tf2/objective.py, tf2/metrics.py, tf2/model.py at commit
383d4143fd8cf7879ae10f1046a9baeb753ff438.
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import pipeline, transforms
from fmjax.errors import ConfigError
from fmjax.objectives import simclr
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.testing import train_in_fresh_process
from fmjax.train import loop
from fmjax.train import optimizer as opt_lib
from fmjax.train import validate
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step

LARGE_NUM = 1e9


# -- the reference, transcribed in NumPy (float64) ------------------------------------------------

def _l2_normalize(x, eps=1e-12):
    return x / np.sqrt(np.maximum((x ** 2).sum(-1, keepdims=True), eps))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_add_contrastive_loss(hidden, hidden_norm=True, temperature=1.0):
    """objective.py add_contrastive_loss with strategy None: ``hidden`` [2B, D], the first
    view's rows first. Returns (loss, logits_ab, labels)."""
    if hidden_norm:
        hidden = _l2_normalize(hidden)
    hidden1, hidden2 = np.split(hidden, 2, 0)
    batch_size = hidden1.shape[0]
    labels = np.eye(batch_size, batch_size * 2)
    masks = np.eye(batch_size)
    logits_aa = hidden1 @ hidden1.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2.T / temperature
    logits_ba = hidden2 @ hidden1.T / temperature

    def xent(labels, logits):  # tf.nn.softmax_cross_entropy_with_logits
        logits = logits - logits.max(-1, keepdims=True)
        return -(labels * (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))).sum(-1)
    loss_a = xent(labels, np.concatenate([logits_ab, logits_aa], 1))
    loss_b = xent(labels, np.concatenate([logits_ba, logits_bb], 1))
    return np.mean(loss_a + loss_b), logits_ab, labels


def np_contrastive_grad(hidden, hidden_norm, temperature):
    """d loss / d hidden of ``np_add_contrastive_loss``, by hand (backprop through the softmax
    cross-entropies, the four similarity products and the L2 normalisation)."""
    n = _l2_normalize(hidden) if hidden_norm else hidden
    n1, n2 = np.split(n, 2, 0)
    b = n1.shape[0]
    masks = np.eye(b)
    la = np.concatenate([n1 @ n2.T, n1 @ n1.T - masks * LARGE_NUM * temperature], 1) / temperature
    lb = np.concatenate([n2 @ n1.T, n2 @ n2.T - masks * LARGE_NUM * temperature], 1) / temperature
    onehot = np.eye(b, 2 * b)
    ga, gb = (_softmax(la) - onehot) / b, (_softmax(lb) - onehot) / b
    dab, daa, dba, dbb = ga[:, :b], ga[:, b:], gb[:, :b], gb[:, b:]
    dn1 = (dab @ n2 + (daa + daa.T) @ n1 + dba.T @ n2) / temperature
    dn2 = (dab.T @ n1 + dba @ n1 + (dbb + dbb.T) @ n2) / temperature
    dn = np.concatenate([dn1, dn2], 0)
    if not hidden_norm:
        return dn
    r = np.sqrt((hidden ** 2).sum(-1, keepdims=True))
    return (dn - n * (n * dn).sum(-1, keepdims=True)) / r


def np_pretrain_metrics(logits_con, labels_con):
    """metrics.py update_pretrain_metrics_train: contrast_acc and contrast_entropy."""
    acc = np.mean(np.argmax(labels_con, 1) == np.argmax(logits_con, 1))
    prob = _softmax(logits_con)
    return acc, -np.mean(np.sum(prob * np.log(prob + 1e-8), -1))


def _hidden(b=12, d=16, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    h1 = rng.normal(size=(b, d)) * scale
    h2 = h1 + 1.5 * rng.normal(size=(b, d)) * scale       # positives correlated: acc well above chance
    return h1, h2


@pytest.mark.parametrize("hidden_norm,temperature", [(True, 0.1), (True, 0.5), (False, 1.0)])
def test_nt_xent_matches_add_contrastive_loss(hidden_norm, temperature):
    h1, h2 = _hidden(scale=1.0 if hidden_norm else 0.3)
    loss, logits_ab, mon = simclr.nt_xent(jnp.asarray(h1, jnp.float32), jnp.asarray(h2, jnp.float32),
                                          temperature, hidden_norm)
    ref, ref_ab, labels = np_add_contrastive_loss(np.concatenate([h1, h2]), hidden_norm, temperature)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_ab), ref_ab, rtol=1e-4, atol=1e-5)
    acc, ent = np_pretrain_metrics(ref_ab, labels)
    assert 0.3 < acc < 1.0        # neither trivial nor hopeless: the argmax matters
    np.testing.assert_allclose(float(mon["contrast_acc"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(mon["contrast_entropy"]), ent, rtol=1e-4)
    n1, n2 = _l2_normalize(h1), _l2_normalize(h2)
    np.testing.assert_allclose(float(mon["pos_cosine"]), np.mean((n1 * n2).sum(-1)), rtol=1e-5)


@pytest.mark.parametrize("hidden_norm,temperature", [(True, 0.1), (False, 1.0)])
def test_nt_xent_gradients_match_reference(hidden_norm, temperature):
    h1, h2 = _hidden(scale=1.0 if hidden_norm else 0.3, seed=3)
    hidden = np.concatenate([h1, h2])
    grad = jax.grad(lambda a, b: simclr.nt_xent(a, b, temperature, hidden_norm)[0], argnums=(0, 1))(
        jnp.asarray(h1, jnp.float32), jnp.asarray(h2, jnp.float32))
    ref = np_contrastive_grad(hidden, hidden_norm, temperature)
    got = np.concatenate([np.asarray(g) for g in grad])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # The hand-written reference gradient is itself the loss's derivative (central differences).
    eps, rng = 1e-6, np.random.default_rng(0)
    for _ in range(5):
        i, j = rng.integers(hidden.shape[0]), rng.integers(hidden.shape[1])
        plus, minus = hidden.copy(), hidden.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (np_add_contrastive_loss(plus, hidden_norm, temperature)[0]
              - np_add_contrastive_loss(minus, hidden_norm, temperature)[0]) / (2 * eps)
        np.testing.assert_allclose(ref[i, j], fd, rtol=1e-5, atol=1e-8)


def test_self_similarity_is_masked():
    """Identical views: without the LARGE_NUM mask each row's best logit would be itself
    (logits_aa's diagonal, 1 / T) and the loss would not be 2 * log(2B - 1)."""
    b = 8
    h = np.zeros((b, b))
    h[np.arange(b), np.arange(b)] = 1.0         # orthonormal rows; positives identical
    loss, _, mon = simclr.nt_xent(jnp.asarray(h), jnp.asarray(h), 0.5)
    # Row i: positive logit 2, 2B - 2 others at 0, the masked self-similarity ~ -1e9.
    want = 2 * (np.log(np.exp(2.0) + 2 * b - 2) - 2.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(mon["contrast_acc"]) == 1.0


# -- the projection head --------------------------------------------------------------------------

def test_projection_head_is_simclrs(tiny_config):
    """model.py ProjectionHead ('nonlinear', num_proj_layers L): hidden LinearLayers Dense
    without bias (use_bias and not use_bn) -> BN(center, scale) -> relu; the last Dense ->
    BN(scale, no center); hidden width = input width; kernels ~ N(0, 0.01^2). The BatchNorm
    normalises the two views together (one concatenated batch of 2B), in training mode."""
    for layers in (2, 3):
        c = tiny_config("simclr")
        c.objective.head_layers = layers
        obj = make_objective(c)
        batch = {"global_crops": np.random.default_rng(0).normal(size=(6, 2, 16, 16, 3)).astype(np.float32)}
        params, extra = flax.linen.meta.unbox(obj.init(jax.random.PRNGKey(0), batch))
        head = params["head"]
        width = c.model.width
        assert sorted(head) == sorted([f"fc_{i}" for i in range(layers)]
                                      + [f"bn_{i}_scale" for i in range(layers)]
                                      + [f"bn_{i}_bias" for i in range(layers - 1)])
        assert all(set(head[f"fc_{i}"]) == {"kernel"} for i in range(layers))
        assert head["fc_0"]["kernel"].shape == (width, width)
        assert head[f"fc_{layers - 1}"]["kernel"].shape == (width, 128)
        assert 0.007 < float(np.std(head["fc_0"]["kernel"])) < 0.013
        # The forward, transcribed (BN over all 2B rows of both views, biased variance, eps 1e-5).
        rng = np.random.default_rng(1)
        head = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), head)
        params = dict(params, head=head)
        feats, z, _ = obj.project(params, jnp.asarray(batch["global_crops"]))
        x = np.asarray(feats, np.float64).reshape(12, -1)

        def bn(x, i, center):
            y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * head[f"bn_{i}_scale"]
            return y + head[f"bn_{i}_bias"] if center else y
        for i in range(layers - 1):
            x = np.maximum(bn(x @ head[f"fc_{i}"]["kernel"], i, True), 0)
        x = bn(x @ head[f"fc_{layers - 1}"]["kernel"], layers - 1, False)
        np.testing.assert_allclose(np.asarray(z).reshape(12, -1), x, rtol=1e-4, atol=1e-5)


# -- the objective inside the trainer ---------------------------------------------------------------

def _fixed_batch(b=16, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {"global_crops": rng.normal(size=(b, 2, size, size, 3)).astype(np.float32)}


def _run(config, batch, devices, steps=1):
    """Trainer steps on ``batch``: ([state after each step], [metrics])."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, devices)
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    step_fn = make_train_step(objective, tx, schedule, rules)
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    states, metrics = [], []
    with mesh_context(mesh):
        for _ in range(steps):
            state, m = jitted(state, pipeline.global_batch(batch, mesh))
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
    return states, metrics


def test_sharded_step_equals_one_device(tiny_config):
    """8 simulated devices (data 2 x fsdp 4): the NT-Xent over the GLOBAL batch (every
    device's negatives) and the head's BatchNorm over the global batch, as on one device."""
    batch = _fixed_batch()
    c8 = tiny_config("simclr", mesh={"data": 2, "fsdp": 4, "tensor": 1})
    s8, m8 = _run(c8, batch, jax.devices()[:8], steps=3)
    c1 = tiny_config("simclr", mesh={"data": 1, "fsdp": 1, "tensor": 1})
    s1, m1 = _run(c1, batch, jax.devices()[:1], steps=3)
    for a, b in zip(m8, m1):
        for k in ("loss", "contrast_acc", "contrast_entropy", "pos_cosine", "embedding_std", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s8[-1].params, s1[-1].params)
    # A per-device loss (the local batch's negatives and BN statistics only) is different:
    obj = make_objective(c1)
    params = s1[0].params
    crops = jnp.asarray(batch["global_crops"])
    full = float(obj.loss(params, {}, {"global_crops": crops}, jax.random.PRNGKey(0), 0)[0])
    halves = np.mean([float(obj.loss(params, {}, {"global_crops": crops[i:i + 8]}, jax.random.PRNGKey(0), 0)[0])
                      for i in (0, 8)])
    assert abs(full - halves) > 1e-3


def test_grad_accumulation_is_refused(tiny_config):
    c = tiny_config("simclr", grad_accum_steps=2)
    obj = make_objective(c)
    with pytest.raises(ConfigError, match="couples the examples"):
        validate.check(c, obj, make_mesh(c.mesh, jax.devices()[:1]), evals=False)


@pytest.mark.parametrize("key,value,match", [
    ("objective.temperature", 0.0, "temperature=0.0 must be > 0"),
    ("objective.head_layers", 0, "head_layers=0 must be >= 1"),
    ("objective.out_dim", 0, "out_dim=0 must be >= 1"),
    ("objective.hidden_dim", -1, "hidden_dim=-1 must be >= 0"),
    ("objective.head_init", "kaiming", "head_init='kaiming'"),
])
def test_bad_values_are_one_line_config_errors(tiny_config, key, value, match):
    c = tiny_config("simclr", **{key: value})
    obj = make_objective(c)
    with pytest.raises(ConfigError, match=match) as e:
        validate.check(c, obj, make_mesh(c.mesh, jax.devices()[:1]), evals=False)
    assert "\n" not in str(e.value)


def test_presets(default_config):
    from fmjax.testing import load_config
    for preset in ("default", "cpu"):
        c = default_config("simclr", preset)
        obj = make_objective(c)
        validate.check(c, obj, make_mesh(c.mesh, jax.devices()[:1]))
        assert c.optimizer.name == "lars" and c.optimizer.lars_lr_in_momentum and c.optimizer.lars_exclude == ()
        assert "two_views(32, recipe='simclr'" in c.data.pp_train
        assert c.evals.images.pp == c.data.pp_train and c.evals.images.split == "train"
    assert "silhouette" in default_config("simclr", "cpu").data.pp_eval
    c = load_config("simclr", "vit_b16_imagenet")
    assert (c.batch_size, c.model.variant, c.model.pos_embed, c.objective.temperature) == (4096, "B/16", "sincos", 0.1)
    assert c.optimizer.name == "adamw" and c.optimizer.frozen == ("backbone/patch_embed/.*",)
    steps_per_epoch = 1281167 // 4096
    assert c.total_steps == 300 * steps_per_epoch and c.optimizer.warmup_steps == 40 * steps_per_epoch
    assert opt_lib.peak_learning_rate(c.optimizer, 4096) == pytest.approx(1.5e-4 * 16)
    obj = make_objective(c)
    assert obj.head(768).hidden_dim == 768 and obj.head(768).num_layers == 3
    c = load_config("simclr", "resnet50_imagenet")   # SimCLR v1's own: ResNet-50 (1x), 1000 epochs
    assert (c.batch_size, c.model.name, c.model.variant, c.model.zero_init_residual) == (4096, "resnet", "50", True)
    assert c.total_steps == 1000 * steps_per_epoch and c.optimizer.warmup_steps == 10 * steps_per_epoch
    assert opt_lib.peak_learning_rate(c.optimizer, 4096) == pytest.approx(4.8)
    assert (c.optimizer.name, c.optimizer.weight_decay, c.optimizer.lars_lr_in_momentum) == ("lars", 1e-6, True)
    obj = make_objective(c)
    assert obj.head(2048).hidden_dim == 2048 and obj.head(2048).num_layers == 2 and obj.state_keys == ("batch_stats",)
    with pytest.raises(ValueError, match="valid: default, cpu, vit_b16_imagenet, resnet50_imagenet"):
        load_config("simclr", "resnet101")


def test_resnet_backbone_carries_its_batch_norm_statistics(tiny_config):
    """A BatchNorm backbone: init puts its running statistics in extra['batch_stats'], the
    training loss returns them updated (batch statistics over both views), features and
    pictures read them (inference mode), and the jitted trainer step threads them."""
    c = tiny_config("simclr")
    c.model = dict(name="resnet", depths=(1, 1), dims=(8, 16), stem_width=8, stem="cifar", block="basic")
    obj = make_objective(c)
    batch = {k: jnp.asarray(v) for k, v in _fixed_batch(b=6, size=16).items()}
    params, extra = flax.linen.meta.unbox(obj.init(jax.random.PRNGKey(0), batch))
    assert set(extra) == {"batch_stats"}
    loss, (_, new) = obj.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
    assert np.isfinite(float(loss))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(extra))]
    assert jax.tree.structure(new) == jax.tree.structure(extra) and min(moved) > 0
    images = batch["global_crops"][:, 0]
    f_old, f_new = obj.features(params, extra, images), obj.features(params, new, images)
    assert f_old.shape == (6, 16) and not np.allclose(np.asarray(f_old), np.asarray(f_new))
    # inference features do not depend on the rest of the batch (running statistics)
    np.testing.assert_allclose(np.asarray(obj.features(params, new, images[:2])), np.asarray(f_new[:2]),
                               rtol=1e-5, atol=1e-6)
    assert "views" in obj.visualize(params, new, batch, jax.random.PRNGKey(0))


def test_resnet_sharded_step_equals_one_device_global_batch_norm(tiny_config):
    """The backbone's BatchNorm over the GLOBAL batch under the sharded step (SimCLR's
    cross-replica global_bn): 8 simulated devices give one device's losses, params and running
    statistics, which the trainer carries from step to step."""
    batch = _fixed_batch()
    resnet = dict(name="resnet", depths=(1, 1), dims=(8, 16), stem_width=8, stem="cifar", block="basic")
    runs = []
    for mesh, devices in (({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8]),
                          ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])):
        c = tiny_config("simclr", mesh=mesh)
        c.model = dict(resnet)
        runs.append(_run(c, batch, devices, steps=3))
    (s8, m8), (s1, m1) = runs
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 (s8[-1].params, s8[-1].extra), (s1[-1].params, s1[-1].extra))
    first, last = (jax.tree.leaves(s1[i].extra["batch_stats"]) for i in (0, -1))
    assert all(not np.allclose(a, b) for a, b in zip(first, last))   # updated at every step


def test_reference_lr_scalings():
    """WarmUpAndCosineDecay's scaled_lr: 0.3 x 4096 / 256 = 0.075 x sqrt(4096) = 4.8."""
    assert opt_lib.peak_learning_rate(dict(lr_scaling="linear", blr=0.3), 4096) == pytest.approx(4.8)
    assert opt_lib.peak_learning_rate(dict(lr_scaling="sqrt", blr=0.075), 4096) == pytest.approx(4.8)


def test_two_views_and_visualize(tiny_config):
    op = transforms.parse("two_views(32, recipe='simclr', scale=(0.2, 1.0))")
    ex = {"image": np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)}
    out = op(ex, np.random.default_rng(1))
    assert out["global_crops"].shape == (2, 32, 32, 3) and out["global_crops"].dtype == np.float32
    assert not np.allclose(out["global_crops"][0], out["global_crops"][1])
    c = tiny_config("simclr")
    obj = make_objective(c)
    batch = _fixed_batch(b=10, size=16)
    params, extra = flax.linen.meta.unbox(obj.init(jax.random.PRNGKey(0), batch))
    pics = obj.visualize(params, extra, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(0))
    views = pics["views"]
    assert views.dtype == np.uint8 and views.ndim == 3 and views.shape[-1] == 3
    assert views.shape[0] == 3 * 16 * obj_scale(16) + 4 * 2            # 3 rows: view 1, view 2, the pick
    pics = obj.visualize(params, extra, {"image": jnp.asarray(batch["global_crops"][:, 0])}, jax.random.PRNGKey(0))
    assert pics["neighbours"].shape[0] == 4 * 16 * obj_scale(16) + 5 * 2


def obj_scale(size):
    """The visualize pictures' nearest-neighbour upscaling of small views."""
    return simclr.display_scale(size)


# -- resume ----------------------------------------------------------------------------------------

def _metric_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def test_interrupted_and_resumed_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    """N steps, stop (the loop's preemption path), resume to 2N == 2N uninterrupted: losses,
    monitors, params and LARS momentum (as tests/train/test_resume.py does for MAE and DINO)."""
    import orbax.checkpoint as ocp
    n = 3
    config = tiny_config("simclr", total_steps=2 * n, checkpoint_every=4)

    class StopAfter(loop._Preemption):
        calls = 0

        def sync(self, step=None):
            StopAfter.calls += 1
            return StopAfter.calls >= n

    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", StopAfter)
        assert loop.train_and_evaluate(config, resumed)["step"] == n
    assert loop.train_and_evaluate(config, resumed)["step"] == 2 * n
    assert loop.train_and_evaluate(config, straight)["step"] == 2 * n
    rows_r, rows_s = _metric_rows(resumed), _metric_rows(straight)
    assert sorted(rows_r) == sorted(rows_s) == list(range(1, 2 * n + 1))
    for step in rows_s:
        for key in ("train/loss", "train/contrast_acc", "train/contrast_entropy", "train/grad_norm"):
            np.testing.assert_allclose(rows_r[step][key], rows_s[step][key], rtol=1e-6, err_msg=f"{key} @ {step}")
    restore = lambda wd: jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(wd, "checkpoints", str(2 * n), "state")))
    a, b = restore(resumed), restore(straight)
    assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7)


# -- learning (shortened default) -------------------------------------------------------------------

@pytest.mark.optimized
@pytest.mark.slow
def test_default_learns(default_config, tmp_path):
    """A shortened default run on one device: the NT-Xent loss falls well below its start and
    the contrastive accuracy rises far above chance (1 / B); the views pictures are written."""
    c = default_config("simclr")
    steps = 100
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 25, steps, steps
    c.optimizer.warmup_steps = 10
    c.evals = dict(images=c.evals.images)
    train_in_fresh_process(c, str(tmp_path))   # one device, a fresh process: 11-16% faster
    rows = [r for r in _metric_rows(str(tmp_path)).values()]
    first, last = rows[0], rows[-1]
    print(f"SimCLR loss {first['train/loss']:.3f} -> {last['train/loss']:.3f}, contrast_acc "
          f"{first['train/contrast_acc']:.3f} -> {last['train/contrast_acc']:.3f}")
    # One logged loss is one step's batch and noisy (step 75 -> 100 measured 10.69 -> 11.04 on
    # one host, 12.10 -> 10.82 at 100 on another): the mean of the last two logged values must
    # sit 0.8 below the first (an untrained or collapsed encoder stays at ~12.1).
    late = (rows[-1]["train/loss"] + rows[-2]["train/loss"]) / 2
    assert late < first["train/loss"] - 0.8, (first["train/loss"], late)
    # One step's accuracy is noisy (0.070 and 0.094 seen at step 150, 0.070 at 100); five
    # times chance is far from what a collapsed or untrained encoder gives.
    assert last["train/contrast_acc"] > 5.0 / c.batch_size
    assert any(n.startswith("images_views") for n in os.listdir(os.path.join(tmp_path, "images")))
