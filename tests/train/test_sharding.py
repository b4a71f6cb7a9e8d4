"""The sharded train step computes the same thing on any mesh.

One fixed batch stream, one config: 8 simulated devices (data=2, fsdp=4, preset
'fsdp') and 1 device must agree on the loss and on the updated params; and
gradient accumulation over micro-batches must equal one big batch.
"""
import jax
import numpy as np
import pytest

from fmjax.data import pipeline, sources, transforms
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step

RTOL, ATOL = 1e-5, 1e-6


def _config(tiny_config, name, **overrides):
    c = tiny_config(name, **overrides)
    # SGD at a constant lr > 0: every step really moves the params, and the update is
    # linear in the gradient. (Adam would turn float noise in gradients that are exactly
    # zero in theory, e.g. attention key biases, into full-size +-lr updates.)
    c.optimizer.update(dict(name="sgd", lr=0.5, lr_scaling="none", momentum=0.9,
                            warmup_steps=0, decay="constant", clip_norm=0.0))
    return c


def _batches(config, objective, n):
    """``n`` fixed global batches (numpy) from the real pipeline."""
    source = sources.get_source(config.data.name, "train", config.data.data_dir)
    it = pipeline.make_train_iterator(source, global_batch_size=config.batch_size,
                                      transform=transforms.parse(config.data.pp_train), seed=0)
    return [{k: np.asarray(b[k]) for k in objective.batch_keys} for b in (next(it) for _ in range(n))]


def _train(config, batches, devices):
    """Runs the trainer's jitted step over ``batches``; returns (losses, initial params,
    final params (numpy), final state)."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, devices)
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    init_params = jax.device_get(state.params)
    step_fn = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps)
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    losses = []
    with mesh_context(mesh):
        for b in batches:
            state, metrics = jitted(state, pipeline.global_batch(b, mesh))
            losses.append(float(metrics["loss"]))
    return np.array(losses), init_params, jax.device_get(state.params), state


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _max_change(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_mae_step_same_on_8_devices_fsdp_and_on_1(tiny_config):
    assert len(jax.devices()) >= 8
    config = _config(tiny_config, "mae", mesh=dict(data=2, fsdp=4, tensor=1), sharding="fsdp")
    batches = _batches(config, make_objective(config), 2)

    losses8, init8, params8, state8 = _train(config, batches, jax.devices()[:8])
    c1 = _config(tiny_config, "mae", mesh=dict(data=-1), sharding="fsdp")
    losses1, init1, params1, _ = _train(c1, batches, jax.devices()[:1])

    # Params really are sharded over fsdp on the 8-device mesh.
    leaves = jax.tree_util.tree_flatten_with_path(state8.params)[0]
    path, big = max(leaves, key=lambda kv: kv[1].size)
    spec = big.sharding.spec
    flat_axes = [a for axes in spec for a in ((axes,) if isinstance(axes, str) else (axes or ()))]
    assert "fsdp" in flat_axes, (jax.tree_util.keystr(path), spec)
    shard_shape = big.addressable_shards[0].data.shape
    assert np.prod(shard_shape) * 4 == np.prod(big.shape), (jax.tree_util.keystr(path), shard_shape, big.shape)
    n_sharded = sum(any(a is not None for a in x.sharding.spec) for _, x in leaves)
    assert n_sharded >= len(leaves) // 2, f"only {n_sharded}/{len(leaves)} params sharded"

    # Same init, same losses, same updated params.
    _assert_trees_close(init8, init1, rtol=0, atol=0)
    np.testing.assert_allclose(losses8, losses1, rtol=RTOL, atol=ATOL)
    assert _max_change(params8, init8) > 1e-4, "the steps did not move the params"
    _assert_trees_close(params8, params1)


@pytest.mark.parametrize("devices", [8, 1])
def test_grad_accumulation_equals_one_big_batch(tiny_config, devices):
    # Supervised: no per-micro-batch randomness (MAE's masks depend on the micro-batch rng).
    mesh = dict(data=2, fsdp=4, tensor=1) if devices == 8 else dict(data=-1)
    c1 = _config(tiny_config, "supervised", mesh=mesh, grad_accum_steps=1)
    c2 = _config(tiny_config, "supervised", mesh=mesh, grad_accum_steps=2)
    batches = _batches(c1, make_objective(c1), 2)

    losses1, init1, params1, _ = _train(c1, batches, jax.devices()[:devices])
    losses2, init2, params2, _ = _train(c2, batches, jax.devices()[:devices])

    _assert_trees_close(init1, init2, rtol=0, atol=0)
    np.testing.assert_allclose(losses2, losses1, rtol=RTOL, atol=ATOL)
    assert _max_change(params1, init1) > 1e-4, "the steps did not move the params"
    _assert_trees_close(params2, params1)


@pytest.mark.parametrize("name", ["convnext", "tinyvit"])
def test_grouped_convs_do_not_reshard_activations(name):
    """Under FSDP a depthwise conv keeps its activation split over the batch: no all-to-all in
    the conv ops of the compiled train-step gradient. (With the kernel's channel axis split over
    fsdp, XLA split the conv by channel and moved whole activations through four all-to-alls per
    block: ConvNeXt-T on v5e-256 read 123 GB per chip per step, docs/scaling.md.)"""
    import re

    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fmjax.models.registry import build_model
    from fmjax.parallel.rules import param_shardings
    if name == "convnext":
        kw = dict(name="convnext", depths=(1, 1), dims=(32, 64), num_classes=10)
    else:
        kw = dict(name="tinyvit", embed_dims=(32, 64, 96), depths=(1, 1, 1), num_heads=(1, 2, 3),
                  window_sizes=(4, 4, 2), num_classes=10)
    model = build_model(kw, "float32")
    mesh = make_mesh(dict(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    rules = get_rules("fsdp")
    x = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
    with mesh, nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        shardings = param_shardings(abstract, mesh, rules)

        def loss(variables, images):
            out = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                              mutable=["batch_stats"])[0]
            return out["logits"].mean()

        grad = jax.jit(jax.grad(loss), in_shardings=(shardings, NamedSharding(mesh, P(("data", "fsdp")))))
        hlo = grad.lower(nn.meta.unbox(abstract), x).compile().as_text()
    conv_a2a = [line for line in hlo.splitlines()
                if "all-to-all(" in line and re.search(r'op_name="[^"]*conv[^"]*"', line)]
    assert not conv_a2a, conv_a2a[0][:300]
