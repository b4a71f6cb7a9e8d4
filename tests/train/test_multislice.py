"""Multi-slice meshes: ``config.mesh.dcn_data`` / ``dcn_fsdp`` tile per-slice (ICI) grids over
slices, laid out like ``mesh_utils.create_hybrid_device_mesh``; tested on 8 simulated CPU
devices assigned to fake slices (``device.id // 4``)."""
import jax
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.parallel import mesh as mesh_lib
from fmjax.train.loop import check_config

FAKE_SLICE = lambda d: d.id // 4  # noqa: E731  2 slices of 4 devices


def _slices(mesh):
    return np.vectorize(FAKE_SLICE)(mesh.devices)


def test_dcn_data_puts_slices_on_the_outer_data_index():
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=1, dcn_data=2), jax.devices()[:8], slice_of=FAKE_SLICE)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    sl = _slices(mesh)
    # every fsdp group (all-gathers of params) stays inside one slice; data crosses slices
    assert (sl[0] == 0).all() and (sl[1] == 1).all()


def test_dcn_fsdp_with_ici_data():
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=1, dcn_fsdp=2), jax.devices()[:8], slice_of=FAKE_SLICE)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    sl = _slices(mesh)[:, :, 0]
    assert (sl[:, :2] == 0).all() and (sl[:, 2:] == 1).all()  # fsdp's outer (DCN) half is the slice
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_minus_one_fills_a_slice():
    mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1, dcn_data=2), jax.devices()[:8], slice_of=FAKE_SLICE)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_one_slice_is_unchanged():
    a = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices()[:8])
    b = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, dcn_data=1, dcn_fsdp=1), jax.devices()[:8])
    assert (a.devices == b.devices).all()


def test_wrong_slice_count_is_an_error():
    with pytest.raises(ValueError, match="spans 2 slices .* devices are in 1 slice"):
        mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1, dcn_data=2), jax.devices()[:8])  # CPU: one slice
    with pytest.raises(ValueError, match="dcn_data must be a positive"):
        mesh_lib.make_mesh(dict(data=-1, dcn_data=0), jax.devices()[:8])


def test_config_error_before_anything_is_written(tiny_config, tmp_path):
    config = tiny_config("mae")
    config.mesh.dcn_data = 2
    with pytest.raises(ConfigError, match="spans 2 slices"):
        check_config(config, str(tmp_path / "wd"), jax.devices()[:8])


def test_train_step_on_a_two_slice_mesh(tiny_config, monkeypatch):
    """The sharded step runs (and computes the same loss) on the hybrid mesh."""
    from fmjax.testing import initial_state  # noqa: F401  (imports the trainer's pieces)
    from fmjax.train import setup as setup_lib
    from fmjax.train.state import create_state, mesh_context
    from fmjax.train.step import jit_train_step, make_train_step
    from fmjax.train import optimizer as opt_lib
    from fmjax.data import pipeline, sources
    from fmjax.data.transforms import parse_pp

    def loss_on(mesh_config, slice_of):
        config = tiny_config("mae")
        config.mesh = mesh_config
        monkeypatch.setattr(mesh_lib, "slice_index", slice_of)
        objective, mesh, rules = setup_lib.build(config, jax.devices()[:8])
        tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
        source = sources.get_source(config.data.name, "train", config.data.data_dir)
        transform = parse_pp(config.data.pp_train, "config.data.pp_train")
        spec = setup_lib.batch_spec(source, transform, objective.batch_keys, config.batch_size)
        state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
        it = pipeline.make_train_iterator(source, global_batch_size=config.batch_size, transform=transform,
                                          seed=0)
        batch = pipeline.global_batch(setup_lib.host_arrays(next(it), spec), mesh)
        fn = jit_train_step(make_train_step(objective, tx, schedule, rules), shardings,
                            jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), spec))
        with mesh_context(mesh):
            _, metrics = fn(state, batch)
        return float(metrics["loss"]), mesh

    one, _ = loss_on(dict(data=2, fsdp=4, tensor=1), mesh_lib.slice_index)
    two, mesh = loss_on(dict(data=1, fsdp=4, tensor=1, dcn_data=2), FAKE_SLICE)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert two == pytest.approx(one, rel=1e-5)
