"""fmjax's side of the trajectory tests: the trainer's own objective, optimizer, state and
jitted step (as fmjax/train/loop.py builds them) on a 1-device mesh, started from given
params (test code)."""
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import pipeline
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step


def run_steps(config, params0, batches, extra0=None, record=("loss", "lr")):
    """One jitted train step per ``(images, labels)`` of ``batches`` from ``params0`` (and
    ``extra0`` when given). Returns ({metric: per-step array} for ``record``, final params,
    final extra, objective)."""
    objective = make_objective(config)
    objective.check(config)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {"image": jax.ShapeDtypeStruct(batches[0][0].shape, jnp.float32),
            "label": jax.ShapeDtypeStruct(batches[0][1].shape, jnp.int32)}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    assert jax.tree.structure(jax.device_get(state.params)) == jax.tree.structure(params0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params0)):
        assert a.shape == np.shape(b) and a.dtype == np.asarray(b).dtype
    state = state.replace(params=jax.device_put(params0, shardings.params))
    if extra0 is not None:
        state = state.replace(extra=jax.device_put(extra0, shardings.extra))
    step_fn = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps,
                              nonfinite=config.nonfinite)
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    out = {k: [] for k in record}
    with mesh_context(mesh):
        for images, labels in batches:
            state, metrics = jitted(state, pipeline.global_batch({"image": images, "label": labels}, mesh))
            metrics = jax.device_get(metrics)
            assert float(metrics["finite"]) == 1.0
            for k in record:
                out[k].append(float(metrics[k]))
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
