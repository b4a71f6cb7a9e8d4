"""TrainState and its sharded creation.

State is never materialised unsharded: ``jax.eval_shape`` gives the abstract
state, logical axis names give partition specs, and ``jax.jit(init,
out_shardings=...)`` creates each shard where it lives.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.parallel import rules as rules_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of updates applied
    params: Any              # trained params (f32)
    opt_state: Any
    extra: Any               # objective state: EMA teacher, centers, queues ...
    rng: jax.Array           # raw uint32[2] key; per-step keys are fold_in(rng, step)


def mesh_context(mesh: Mesh):
    """Makes ``mesh`` the ambient mesh so logical activation constraints apply."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return mesh if hasattr(mesh, "__enter__") else contextlib.nullcontext()


def _model_init_fn(objective, batch_spec):
    """``rng -> objective.init(rng, zeros of batch_spec)`` (boxed params and extra), ONE function
    object per (objective, batch spec): jax keys its trace cache on the function, so every
    ``eval_shape`` and ``jit`` of it below shares a single trace of the model's init (before,
    three function objects traced it three times per state; a whole model's init is the
    costliest trace at start-up). Kept on the objective (a reference cycle the collector frees)."""
    key = (jax.tree.structure(batch_spec),
           tuple((tuple(s.shape), str(jax.dtypes.canonicalize_dtype(s.dtype))) for s in jax.tree.leaves(batch_spec)))
    fns = objective.__dict__.setdefault("_fmjax_model_init_fns", {})
    if key not in fns:
        def model_init(rng):
            batch = jax.tree.map(lambda s: jnp.zeros(s.shape, jax.dtypes.canonicalize_dtype(s.dtype)), batch_spec)
            return objective.init(rng, batch)
        fns[key] = model_init
    return fns[key]


def _unboxed_init(objective, batch_spec, rng):
    """(params, extra, state rng) inside a trace: the shared model init (a cached jit call)."""
    init_rng, state_rng = jax.random.split(rng)
    params, extra = jax.jit(_model_init_fn(objective, batch_spec))(init_rng)
    return nn.meta.unbox(params), nn.meta.unbox(extra), state_rng


def _init_fn(objective, tx, batch_spec):
    def init(rng):
        params, extra, state_rng = _unboxed_init(objective, batch_spec, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), extra=extra, rng=state_rng)
    return init


def state_shardings(objective, tx, batch_spec, mesh: Mesh, rules, seed: int = 0):
    """Returns (abstract TrainState, TrainState of NamedShardings)."""
    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(rules):
        boxed_params, boxed_extra = jax.eval_shape(_model_init_fn(objective, batch_spec), rng)
        abstract = jax.eval_shape(_init_fn(objective, tx, batch_spec), rng)
    replicated = NamedSharding(mesh, P())
    param_sh = rules_lib.param_shardings(boxed_params, mesh, rules)
    extra_sh = rules_lib.param_shardings(boxed_extra, mesh, rules)
    opt_sh = optax.tree_map_params(  # per-param slots shard like their param (scalars: replicated)
        tx, lambda slot, sh: replicated if getattr(slot, "ndim", 1) == 0 else sh, abstract.opt_state, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                           extra=extra_sh, rng=replicated)
    return abstract, shardings, boxed_params


def create_state(objective, tx, batch_spec, mesh: Mesh, rules, seed: int, shardings=None,
                 load_params=None):
    """Initialises the TrainState directly into its shardings (computed if not given).

    ``load_params(params, param_shardings) -> params`` (``config.model_init``): applied to the
    sharded fresh params after ``objective.init`` and before ``tx.init``, so the optimizer
    state is built for the loaded params; ``objective.after_model_init`` then updates the
    objective state (e.g. DINO's teacher starts as the loaded student). The fresh init of the
    params it leaves alone equals the one without it.
    """
    if shardings is None:
        _, shardings, _ = state_shardings(objective, tx, batch_spec, mesh, rules, seed)
    # No ambient mesh here: flax's DenseGeneral initialises kernels flat and unboxing them
    # under a mesh would constrain a 2-D value with 3-D names. out_shardings places shards.
    if load_params is None:
        init = _init_fn(objective, tx, batch_spec)
        with nn.logical_axis_rules(rules):
            state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
        return state, shardings

    def finish(params, extra, state_rng):
        hook = getattr(objective, "after_model_init", None)
        extra = hook(params, extra) if hook is not None else extra
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), extra=extra, rng=state_rng)

    with nn.logical_axis_rules(rules):
        params, extra, state_rng = jax.jit(functools.partial(_unboxed_init, objective, batch_spec), out_shardings=(
            shardings.params, shardings.extra, shardings.rng))(jax.random.PRNGKey(seed))
    params = load_params(params, shardings.params)
    with nn.logical_axis_rules(rules):
        state = jax.jit(finish, out_shardings=shardings)(params, extra, state_rng)
    return state, shardings
