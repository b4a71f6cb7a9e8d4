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
