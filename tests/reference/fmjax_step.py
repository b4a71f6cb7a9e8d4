"""fmjax's side of the trajectory tests: the trainer's own objective, optimizer, state and
jitted step (as fmjax/train/loop.py builds them) on a 1-device mesh, started from given
params (test code)."""
import jax
import numpy as np

from fmjax.data import pipeline
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step, per_example_clip_norm


def run_steps(config, params0, batches, extra0=None, record=("loss", "lr"), per_step=None,
              check=True):
    """One jitted train step per batch of ``batches`` from ``params0`` (and ``extra0`` when
    given). A batch is ``(images, labels)`` (float32 NHWC images, int32 labels) or a dict of
    arrays keyed as the objective reads them (their own dtypes). ``per_step(state)`` -> dict
    records more per-step values (e.g. a parameter) under its keys. ``check=False`` skips the
    objective's config check (for tests whose batches do not come from ``config.data``).
    Returns ({metric: per-step array} for ``record`` and ``per_step``'s keys, final params,
    final extra, objective)."""
    batches = [b if isinstance(b, dict) else
               {"image": np.asarray(b[0], np.float32), "label": np.asarray(b[1], np.int32)}
               for b in batches]
    objective = make_objective(config)
    if check:
        objective.check(config)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batches[0].items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    assert jax.tree.structure(jax.device_get(state.params)) == jax.tree.structure(params0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params0)):
        wider = jax.config.jax_enable_x64 and np.asarray(b).dtype == np.float64  # a float64 run
        assert a.shape == np.shape(b) and (a.dtype == np.asarray(b).dtype or wider), (a.shape, a.dtype)
    params0 = jax.device_put(params0, shardings.params)
    state = state.replace(params=params0,
                          opt_state=jax.device_put(tx.init(params0), shardings.opt_state))
    if extra0 is not None:
        state = state.replace(extra=jax.device_put(extra0, shardings.extra))
    step_fn = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps,
                              nonfinite=config.nonfinite,
                              per_example_clip=per_example_clip_norm(config.optimizer))
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    out = {k: [] for k in record}
    with mesh_context(mesh):
        for batch in batches:
            state, metrics = jitted(state, pipeline.global_batch(batch, mesh))
            metrics = jax.device_get(metrics)
            assert float(metrics["finite"]) == 1.0
            for k in record:
                out[k].append(float(metrics[k]))
            for k, v in (per_step(state) if per_step else {}).items():
                out.setdefault(k, []).append(float(v))
    assert int(state.step) == len(batches)
    return ({k: np.array(v) for k, v in out.items()}, jax.device_get(state.params),
            jax.device_get(state.extra), objective)


def random_batches(n, batch, size, classes, seed=0):
    """``n`` pre-augmented batches (NHWC float32 random-normal images, int32 labels)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, size, size, 3)).astype(np.float32),
             rng.integers(0, classes, batch).astype(np.int32)) for _ in range(n)]


def flat(tree):
    """keystr -> numpy array for every leaf."""
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def rel_err(a, b, rtol, atol):
    """max |a - b| / (atol / rtol + |b|): <= rtol passes assert_allclose(rtol, atol)."""
    return float(np.max(np.abs(a - b) / (atol / rtol + np.abs(b))))


def param_error(params, final, rtol, atol, skip=None):
    """(the largest ``rel_err`` over every param but those whose keystr ``skip`` (a compiled
    regex) matches, flat ``params``, flat ``final``); both trees must hold the same keys."""
    got, want = flat(params), flat(final)
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k], rtol, atol) for k in want if not (skip and skip.search(k))), got, want
