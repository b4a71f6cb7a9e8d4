"""Knowledge distillation (fmjax/objectives/distill.py): the loss against a numpy transcription
of DeiT's DistillationLoss, a run from a teacher workdir that keeps the teacher frozen and
resumes exactly, the student under LoRA with a plain teacher, and one-line errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax.errors import ConfigError
from fmjax.objectives.base import make_objective
from fmjax.train import loop


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def deit_distillation_loss(s, t, labels_onehot, kd, alpha, tau):
    """facebookresearch/deit losses.py DistillationLoss.forward (class head only), in numpy:
    base = SoftTargetCrossEntropy / CE; soft: F.kl_div(log_softmax(s/T), log_softmax(t/T),
    reduction='sum', log_target=True) * T * T / s.numel(); hard: F.cross_entropy(s, t.argmax(1))."""
    base = -(labels_onehot * _np_log_softmax(s)).sum(-1).mean()
    if kd == "soft":
        ls, lt = _np_log_softmax(s / tau), _np_log_softmax(t / tau)
        d = (np.exp(lt) * (lt - ls)).sum() * tau * tau / s.size
    else:
        d = -_np_log_softmax(s)[np.arange(len(s)), t.argmax(1)].mean()
    return base * (1 - alpha) + d * alpha


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, shapes_data_dir):
    """A tiny supervised run: the teacher workdir."""
    from fmjax.testing import load_config
    c = load_config("supervised")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 4, 16, 2, 0, 4
    c.eval_at_start = False
    c.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    wd = str(tmp_path_factory.mktemp("teacher"))
    loop.train_and_evaluate(c, wd, devices=jax.devices()[:1])
    return wd


def _student(tiny_config, teacher_dir, **kw):
    c = tiny_config("distill", **kw)
    c.objective.teacher.workdir = teacher_dir
    return c


@pytest.mark.parametrize("kd, alpha, tau", [("soft", 0.5, 3.0), ("soft", 0.9, 1.0), ("hard", 0.5, 1.0)])
def test_loss_matches_deit(kd, alpha, tau, tiny_config, teacher_dir):
    c = _student(tiny_config, teacher_dir)
    c.objective.update(dict(kd=kd, alpha=alpha, temperature=tau))
    obj = make_objective(c)
    rng = jax.random.PRNGKey(0)
    images = jax.random.normal(rng, (8, 32, 32, 3))
    labels = jnp.arange(8) % obj.num_classes
    params, extra = obj.init(rng, {"image": images, "label": labels})
    # A non-trivial student head (the ViT head starts at zero).
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(7), v.shape)
        if "head" in jax.tree_util.keystr(p) else v, params)
    extra["teacher"] = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(8), v.shape)
        if "head" in jax.tree_util.keystr(p) else v, extra["teacher"])
    loss, (metrics, _) = obj.loss(params, extra, {"image": images, "label": labels}, rng, 0)
    s = np.asarray(obj.model.apply({"params": params}, images, train=True,
                                   rngs={"dropout": rng})["logits"], np.float64)
    t = np.asarray(obj.teacher_model.apply({"params": extra["teacher"]}, images)["logits"], np.float64)
    onehot = np.eye(obj.num_classes)[np.asarray(labels)]
    smooth = c.objective.label_smoothing
    onehot = onehot * (1 - smooth) + smooth / obj.num_classes
    ref = deit_distillation_loss(s, t, onehot, kd, alpha, tau)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert 0 <= float(metrics["agreement"]) <= 1


@pytest.mark.slow
def test_trains_with_a_frozen_teacher_and_resumes_exactly(tiny_config, teacher_dir, tmp_path, monkeypatch):
    c = _student(tiny_config, teacher_dir, total_steps=4, checkpoint_every=2)
    c.keep_checkpoints = 5
    wd, straight = str(tmp_path / "kd"), str(tmp_path / "straight")

    class StopAfter(loop._Preemption):
        calls = 0

        def sync(self, step=None):
            StopAfter.calls += 1
            return StopAfter.calls >= 2
    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", StopAfter)
        assert loop.train_and_evaluate(c, wd, devices=jax.devices()[:1])["step"] == 2
    assert loop.train_and_evaluate(c, wd, devices=jax.devices()[:1])["step"] == 4
    assert loop.train_and_evaluate(c, straight, devices=jax.devices()[:1])["step"] == 4
    restore = lambda d, s: jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(d, "checkpoints", str(s), "state")))
    a, b = restore(wd, 4), restore(straight, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7)
    teacher = jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(teacher_dir, "checkpoints", "4", "state")))["params"]
    for x, y in zip(jax.tree.leaves(a["extra"]["teacher"]), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_student_runs_with_a_plain_teacher(tiny_config, teacher_dir, tmp_path):
    """The adapter's hooks are suspended around the teacher (it has no LoRA params)."""
    c = _student(tiny_config, teacher_dir, total_steps=2)
    c.adapter.update(dict(name="lora", rank=2, train=("head/.*",)))
    assert loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])["step"] == 2


def test_baseline_needs_no_teacher_and_errors_are_one_line(tiny_config, teacher_dir, tmp_path):
    c = tiny_config("distill")
    c.objective.kd = "none"
    obj = make_objective(c)
    assert obj.teacher_model is None
    c.objective.kd = "soft"
    with pytest.raises(ConfigError, match="needs a teacher: train a classifier first .* --config.objective.teacher.workdir=DIR"):
        make_objective(c)
    c.objective.teacher.workdir = str(tmp_path)
    with pytest.raises(ConfigError, match="has no config.json"):
        make_objective(c)
    c = _student(tiny_config, teacher_dir)
    c.model.num_classes = 3
    with pytest.raises(ConfigError, match="the student 3; distillation needs the same label space"):
        make_objective(c)
    c = _student(tiny_config, teacher_dir)
    c.objective.feature_weight = 1.0
    c.model.width = 48
    with pytest.raises(ConfigError, match="student width 48 != teacher width 32"):
        make_objective(c)


def test_deit_student_splits_the_heads(tiny_config, teacher_dir):
    """With DeiT's distillation token the labels train the class head and the teacher the
    distillation head (DeiT's DistillationLoss on (outputs, outputs_kd))."""
    c = _student(tiny_config, teacher_dir)
    c.model.update(dict(distill_token=True, pool="cls"))
    c.objective.update(dict(kd="hard", alpha=0.5))
    obj = make_objective(c)
    rng = jax.random.PRNGKey(0)
    images = jax.random.normal(rng, (8, 32, 32, 3))
    labels = jnp.arange(8) % obj.num_classes
    params, extra = obj.init(rng, {"image": images, "label": labels})
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(7), v.shape)
        if "head" in jax.tree_util.keystr(p) else v, params)
    assert "head_dist" in params and "dist_token" in params
    loss, _ = obj.loss(params, extra, {"image": images, "label": labels}, rng, 0)
    out = obj.model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    t = obj.teacher_model.apply({"params": extra["teacher"]}, images)["logits"]
    s_cls, s_dist = np.asarray(out["cls_logits"], np.float64), np.asarray(out["dist_logits"], np.float64)
    smooth = c.objective.label_smoothing
    onehot = np.eye(obj.num_classes)[np.asarray(labels)] * (1 - smooth) + smooth / obj.num_classes
    base = -(onehot * _np_log_softmax(s_cls)).sum(-1).mean()
    kd = -_np_log_softmax(s_dist)[np.arange(8), np.asarray(t).argmax(1)].mean()
    np.testing.assert_allclose(float(loss), 0.5 * base + 0.5 * kd, rtol=1e-5)


# -- Stored sparse teacher logits (TinyViT's fast distillation) -------------------------------

def _replay_config(c, store):
    """``c`` with the teacher replaced by the store: the op before keep(), its keys kept."""
    from fmjax.data.registry import split_pp
    from fmjax.data.stored_logits import with_op
    r = c.copy_and_resolve_references()
    r.objective.teacher.workdir = None
    r.objective.teacher.logits = store
    ops = [s.strip() for s in split_pp(r.data.pp_train)]
    assert ops[-1] == "keep('image', 'label')", ops
    r.data.pp_train = with_op(r.data.pp_train, store)
    assert r.data.pp_train == "|".join(ops[:-1] + [
        f"teacher_topk('{store}')", "keep('image', 'label', 'teacher_probs', 'teacher_index')"])
    return r


@pytest.fixture(scope="module")
def stored(tmp_path_factory, shapes_data_dir):
    """A soft-KD student config with mixup and CutMix, and its teacher's full (k = 8) float32
    probabilities stored for its 4 steps. The teacher trains 40 steps at a high lr (the 4-step
    ``teacher_dir`` is nearly uniform: its KL to a fresh student is ~1e-7, all rounding)."""
    from fmjax.objectives import distill
    from fmjax.testing import load_config
    t = load_config("supervised")
    t.data.data_dir = shapes_data_dir
    t.total_steps, t.batch_size, t.log_every, t.eval_every, t.checkpoint_every = 40, 32, 10, 0, 40
    t.eval_at_start, t.optimizer.warmup_steps, t.optimizer.lr = False, 2, 1e-2
    t.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    teacher_dir = str(tmp_path_factory.mktemp("peaked_teacher"))
    loop.train_and_evaluate(t, teacher_dir, devices=jax.devices()[:1])
    c = load_config("distill")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 4, 16, 1, 0, 2
    c.eval_at_start, c.optimizer.warmup_steps = False, 2
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    c.objective.update(dict(kd="soft", temperature=2.0, alpha=0.7, mixup_alpha=0.8, cutmix_alpha=1.0))
    c.objective.teacher.workdir = teacher_dir
    store = str(tmp_path_factory.mktemp("store") / "logits")
    meta = distill.store_topk(c, store, topk=8, dtype="float32", log=lambda m: None)
    assert meta["rows"] == 64 and meta["topk"] == 8 and meta["steps"] == 4
    return c, store


def test_stored_logits_replay_equals_the_live_teacher(stored, tmp_path):
    """k = every class: the replayed run (no teacher loaded) logs the live run's losses, so the
    rows are the batches' exact examples, augmentations and mixup / CutMix draws."""
    from fmjax.testing import train_rows
    c, store = stored
    live, replay = str(tmp_path / "live"), str(tmp_path / "replay")
    loop.train_and_evaluate(c, live, devices=jax.devices()[:1])
    r = _replay_config(c, store)
    obj = make_objective(r)
    assert obj.teacher_model is None and "teacher" not in jax.eval_shape(
        lambda: obj.init(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 32, 32, 3)),
                                                 "label": jnp.zeros((2,), jnp.int32),
                                                 "teacher_probs": jnp.zeros((2, 8)),
                                                 "teacher_index": jnp.zeros((2, 8), jnp.int32)}))[1]
    loop.train_and_evaluate(r, replay, devices=jax.devices()[:1])
    a, b = train_rows(live), train_rows(replay)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        for key in ("train/loss", "train/kd_loss", "train/teacher_accuracy", "train/agreement"):
            np.testing.assert_allclose(b[s][key], a[s][key], rtol=2e-5, err_msg=f"{key} @ {s}")
    assert a[1]["train/kd_loss"] > 1e-3 * a[1]["train/loss"], a[1]


def test_stored_sparse_target_is_topk_plus_the_rest_spread_evenly(stored):
    """The KD term against k stored probabilities: the dense target puts the rest of the mass
    evenly on the other classes (TinyViT), then DeiT's soft KL at T (numpy transcription)."""
    c, store = stored
    obj = make_objective(_replay_config(c, store))
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 8)).astype(np.float32)
    t = rng.normal(size=(6, 8))
    p = np.exp(t / 2.0) / np.exp(t / 2.0).sum(-1, keepdims=True)
    index = np.argsort(-p, -1)[:, :3].astype(np.int32)
    probs = np.take_along_axis(p, index, -1).astype(np.float32)
    batch = dict(teacher_probs=jnp.asarray(probs), teacher_index=jnp.asarray(index),
                 label=jnp.asarray(index[:, 0]))
    loss, (m, _) = obj._stored_loss(jnp.asarray(s), jnp.asarray(s), jnp.zeros(()), batch, {}, {})
    target = np.tile(((1 - probs.sum(-1)) / 5)[:, None], (1, 8))
    np.put_along_axis(target, index, probs, -1)
    kl = (target * (np.log(target) - _np_log_softmax(s / 2.0))).sum() * 4.0 / s.size
    np.testing.assert_allclose(float(m["kd_loss"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * kl, rtol=1e-5)
    assert float(m["teacher_accuracy"]) == 1.0


def test_stored_logits_resume_exactly_and_refuse_other_batches(stored, tmp_path, monkeypatch):
    from fmjax.objectives import distill
    from fmjax.testing import resume_drill
    c, store = stored
    r = _replay_config(c, store)
    resume_drill(r, tmp_path / "drill", monkeypatch, n=2, devices=jax.devices()[:1])
    for key, value, fragment in (("seed", 1, "seed differ"), ("batch_size", 8, "batch_size differ"),
                                 ("total_steps", 5, "cover 4 steps")):
        bad = r.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ConfigError, match=fragment):
            make_objective(bad).check(bad)
    bad = r.copy_and_resolve_references()
    bad.objective.mixup_alpha = 0.2
    with pytest.raises(ConfigError, match="mixing differ"):
        make_objective(bad).check(bad)
    bad = r.copy_and_resolve_references()
    bad.data.pp_train = c.data.pp_train
    with pytest.raises(ConfigError, match="needs teacher_topk") as info:
        make_objective(bad).check(bad)
    assert f'--config.data.pp_train="{r.data.pp_train}"' in str(info.value)  # the fix, to paste
    bad = r.copy_and_resolve_references()
    bad.objective.temperature = 4.0
    with pytest.raises(ConfigError, match="temperature 2.0"):
        make_objective(bad)
    with pytest.raises(ConfigError, match="already holds stored logits"):
        distill.store_topk(c, store, topk=2, log=lambda m: None)
    bad = r.copy_and_resolve_references()
    bad.objective.teacher.logits = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="no meta.json"):
        make_objective(bad)


def test_store_logits_cli_and_a_sparse_replay(stored, tmp_path):
    """launch/store_logits.py: top-2 in float16; a replay with them trains; bad flags are one line."""
    import json
    from fmjax.testing import assert_one_line_error, run_cli
    c, _ = stored
    out = tmp_path / "top2"
    args = ["--config=configs/distill.py", f"--config.objective.teacher.workdir={c.objective.teacher.workdir}",
            f"--config.data.data_dir={c.data.data_dir}", "--config.batch_size=16", "--config.model.width=32",
            "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
            "--config.objective.kd=soft", "--config.objective.temperature=2.0"]
    proc = run_cli("store_logits", *args, f"--out={out}", "--topk=2", "--steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stored top-2 of 8 for 3 steps (48 examples)" in proc.stdout, proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    probs = np.load(out / "probs.npy")
    assert meta["dtype"] == "float16" and probs.shape == (48, 2) and probs.dtype == np.float16
    assert (probs[:, 0] >= probs[:, 1]).all() and (probs.sum(-1) <= 1.001).all()
    assert_one_line_error(run_cli("store_logits", *args, "--topk=2"), "--out is required")
    assert_one_line_error(run_cli("store_logits", "--config=configs/mae.py", f"--out={tmp_path / 'x'}"),
                          "takes a distill config")
    r = _replay_config(c, str(out))
    r.total_steps, r.objective.mixup_alpha, r.objective.cutmix_alpha = 3, 0.0, 0.0  # as stored
    final = loop.train_and_evaluate(r, str(tmp_path / "wd"), devices=jax.devices()[:1])
    assert final["step"] == 3 and np.isfinite(final["train/kd_loss"])
