"""The supervised objective's EMA of the weights (timm ModelEmaV2 / DeiT ``--model-ema``).

The update against a hand computation over a few steps; off (``ema_decay=0``) the objective
state is ``{}`` and every hook leaves it alone, as before the option existed; on, eval reports
both the params' and the EMA's accuracy and ``predict`` / ``features`` use the EMA. Through
the real loop (tiny runs): the checkpoint holds ``extra['ema']`` (differs from the params), and
a run initialised from that checkpoint by ``model_init`` starts its EMA at the LOADED params
(``after_model_init``): after one step its EMA is ``p0 + (1 - d)(p1 - p0)`` exactly as computed
from the source checkpoint's params p0 and the run's own p1.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.objectives import supervised
from fmjax.testing import load_config
from fmjax.train import loop
from fmjax.train import model_init as mi_lib
from fmjax.train import restore

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _objective(**objective):
    c = load_config("finetune")
    c.model.update(TINY)
    c.objective.update(objective)
    return supervised.make(c)


def _batch(obj, n=8):
    images = jax.random.normal(jax.random.PRNGKey(1), (n, 32, 32, 3))
    return {"image": images, "label": jnp.arange(n) % obj.num_classes}


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_ema_update_matches_a_hand_computation():
    d = 0.9
    obj = _objective(ema_decay=d)
    params, extra = obj.init(jax.random.PRNGKey(0), _batch(obj))
    assert set(extra) == {"ema"}
    for a, b in zip(jax.tree.leaves(extra["ema"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # starts as the init params
    hand = _leaves(params)
    update = jax.jit(obj.after_update)
    for step in range(4):
        params = jax.tree.map(lambda p, s=step: p + 0.1 * (s + 1) * jax.random.normal(
            jax.random.PRNGKey(10 + s), p.shape), params)
        extra = update(params, extra, step)
        hand = [d * e + (1 - d) * p for e, p in zip(hand, _leaves(params))]   # ModelEmaV2.update
        for got, want in zip(_leaves(extra["ema"]), hand):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ema_update_has_no_drift_at_deit_decay():
    """ema + (1 - d)(p - ema) keeps a constant ema = p exactly; float32 d * e + (1 - d) * p
    would not (float32(0.99996) + float32(4e-5) != 1)."""
    p = {"w": jnp.full((4,), 1.2345678, jnp.float32)}
    e = supervised.ema_update(p, p, 0.99996)
    np.testing.assert_array_equal(np.asarray(e["w"]), np.asarray(p["w"]))


def test_ema_off_leaves_extra_alone():
    obj = _objective()
    params, extra = obj.init(jax.random.PRNGKey(0), _batch(obj))
    assert extra == {}
    assert obj.after_update(params, extra, 0) is extra
    assert obj.after_model_init(params, extra) is extra
    metrics = obj.eval_metrics(params, extra, _batch(obj), None)
    assert set(metrics) == {"accuracy", "top5"}


def test_ema_on_eval_reports_both_and_predicts_with_the_ema():
    obj = _objective(ema_decay=0.5)
    batch = _batch(obj)
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    ema = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    extra = obj.after_model_init(ema, extra)          # the hook: the EMA is these params
    assert extra["ema"] is ema
    metrics = obj.eval_metrics(params, extra, batch, None)
    assert set(metrics) == {"accuracy", "top5", "ema_accuracy", "ema_top5"}
    logits = obj.model.apply({"params": ema}, batch["image"])["logits"]
    np.testing.assert_array_equal(np.asarray(obj.predict(params, extra, batch["image"])), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(metrics["ema_accuracy"]),
                                  np.asarray(logits.argmax(-1) == batch["label"], np.float32))
    feats = obj.model.apply({"params": ema}, batch["image"])["pre_logits"]
    np.testing.assert_array_equal(np.asarray(obj.features(params, extra, batch["image"])), np.asarray(feats))


# -- through the real loop --------------------------------------------------------------------------

def _tiny(shapes_data_dir, steps, **objective):
    c = load_config("finetune")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = steps, 16, steps
    c.log_every, c.eval_every, c.eval_at_start = 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(TINY)
    c.objective.update(objective)
    c.evals = {}
    return c


def _state(workdir):
    _, _, _, _, state, step = restore.load_checkpoint(workdir)
    return state, step


@pytest.fixture(scope="module")
def ema_run(shapes_data_dir, tmp_path_factory):
    """2 steps with EMA 0.9 and mixup + CutMix on, final eval on 32 validation examples."""
    c = _tiny(shapes_data_dir, 2, ema_decay=0.9, mixup_alpha=0.8, cutmix_alpha=1.0)
    c.evals = dict(val=dict(type="metrics", split="validation", examples=32))
    c.eval_every = 2
    wd = str(tmp_path_factory.mktemp("ema") / "run")
    final = loop.train_and_evaluate(c, wd)
    return wd, final


def test_checkpoint_keeps_the_ema(ema_run):
    wd, final = ema_run
    assert {"val_accuracy", "val_ema_accuracy", "val_top5", "val_ema_top5"} <= {k.split("/")[-1] for k in final}, final
    assert any("mix_lam" in k for k in final), final
    state, step = _state(wd)
    assert step == 2 and set(state.extra) == {"ema"}
    assert jax.tree.structure(state.extra["ema"]) == jax.tree.structure(state.params)
    ema, params = mi_lib.flatten(jax.tree.map(np.asarray, state.extra["ema"])), \
        mi_lib.flatten(jax.tree.map(np.asarray, state.params))
    assert all(np.isfinite(v).all() for v in ema.values())
    assert any(not np.array_equal(ema[k], params[k]) for k in params)


def test_model_init_starts_the_ema_at_the_loaded_params(ema_run, shapes_data_dir, tmp_path):
    src, _ = ema_run
    d = 0.9
    c = _tiny(shapes_data_dir, 1, ema_decay=d)
    c.model_init.workdir = src
    c.model_init.mapping = {"params": ""}
    c.model_init.dont_load = ()
    wd = str(tmp_path / "ft")
    loop.train_and_evaluate(c, wd)
    p0 = mi_lib.flatten(jax.tree.map(np.asarray, _state(src)[0].params))
    state, step = _state(wd)
    assert step == 1
    p1 = mi_lib.flatten(jax.tree.map(np.asarray, state.params))
    ema = mi_lib.flatten(jax.tree.map(np.asarray, state.extra["ema"]))
    assert set(ema) == set(p0) == set(p1)
    for k in p0:
        want = p0[k].astype(np.float64) + (1 - d) * (p1[k].astype(np.float64) - p0[k])
        np.testing.assert_allclose(ema[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_ema_off_run_has_no_objective_state(shapes_data_dir, tmp_path):
    wd = str(tmp_path / "off")
    loop.train_and_evaluate(_tiny(shapes_data_dir, 1), wd)
    state, _ = _state(wd)
    assert state.extra == {}
