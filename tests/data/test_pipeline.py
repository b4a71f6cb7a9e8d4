"""Tests for fmjax.data.pipeline (grain iterators, Orbax state, global_batch)."""
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fmjax.data import pipeline as pl

PP = "random_resized_crop(8, scale=(0.3, 1.0))|flip_lr|normalize('imagenet')"


class ListSource:
    """Picklable in-memory source: example ``i`` has label ``i``."""

    def __init__(self, n: int, size: int = 12):
        rng = np.random.default_rng(123)
        self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(i), "caption": f"caption {i}"}


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _train(n=24, **kw):
    args = dict(global_batch_size=4, transform=PP, seed=0)
    args.update(kw)
    return pl.make_train_iterator(ListSource(n), **args)


def test_train_batches_shape_and_repeat():
    it = _train(n=10)
    batches = _take(it, 7)  # 28 examples > 10: repeats forever
    b = batches[0]
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4,) and b["caption"].shape == (4,)
    assert b["caption"][0] == f"caption {b['label'][0]}"
    labels = np.concatenate([x["label"] for x in batches])
    # Each epoch is a permutation of the data, reshuffled between epochs.
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:20]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:20])
    assert not np.array_equal(labels[:10], np.arange(10))


def test_train_seed_and_no_shuffle():
    _assert_batches_equal(_take(_train(), 3), _take(_train(), 3))
    a, b = next(_train(seed=0)), next(_train(seed=1))
    assert not np.array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(next(_train(shuffle=False))["label"], [0, 1, 2, 3])


def test_train_num_epochs_drops_remainder():
    batches = list(_train(n=10, num_epochs=2))
    assert len(batches) == 5 and all(len(b["label"]) == 4 for b in batches)


def test_train_bad_batch_size():
    with pytest.raises(ValueError, match="multiple of process_count"):
        _train(global_batch_size=5, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        _train(process_index=2, process_count=2)


def test_two_processes_disjoint_union_is_everything():
    n = 24
    single = list(_train(n=n, num_epochs=1))
    shares = [list(_train(n=n, num_epochs=1, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == 6 and all(len(s) == 6 for s in shares)
    assert all(b["label"].shape == (2,) for s in shares for b in s)
    labels = [set(np.concatenate([b["label"] for b in s]).tolist()) for s in shares]
    assert len(labels[0]) == 12 and len(labels[1]) == 12 and not labels[0] & labels[1]
    all_single = set(np.concatenate([b["label"] for b in single]).tolist())
    assert labels[0] | labels[1] == all_single == set(range(n))


def test_state_restore_resumes_exactly():
    it = _train(n=10)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)  # crosses an epoch boundary
    restored = _train(n=10)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 4), expected)


def test_workers_same_batches_and_restore():
    """worker_count=2 (spawned processes, ~5 s): same batches as in-process,
    and set_state rewinds exactly. One iterator only, to keep it fast."""
    reference = _take(_train(n=10), 7)
    it = _train(n=10, worker_count=2)
    try:
        first = _take(it, 3)
        state = it.get_state()
        rest = _take(it, 4)
        _assert_batches_equal(first + rest, reference)
        it.set_state(state)
        _assert_batches_equal(_take(it, 4), rest)
    finally:
        it.close()


def test_orbax_checkpoint_manager_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = _train(n=10)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(
            step=ocp.args.JsonSave({"step": 5}), data=pl.grain_save_args(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = _train(n=10)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        out = mngr.restore(5, args=ocp.args.Composite(
            step=ocp.args.JsonRestore(), data=pl.grain_restore_args(fresh)))
    assert out.step == {"step": 5} and out.data is fresh
    _assert_batches_equal(_take(fresh, 3), expected)


def test_eval_iterator_padding_and_order():
    n, gbs = 10, 4
    single = pl.make_eval_iterator(ListSource(n), global_batch_size=gbs, transform=PP)
    batches = list(single)
    assert len(single) == len(batches) == 3
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:n], np.arange(n))
    valid = np.concatenate([b["_valid"] for b in batches])
    assert valid.dtype == np.bool_ and valid.sum() == n and not valid[n:].any()

    shares = [list(pl.make_eval_iterator(ListSource(n), global_batch_size=gbs, transform=PP,
                                         process_index=p, process_count=2)) for p in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    for k in range(3):  # process-order concat of local batches == single-process batch
        merged = {key: np.concatenate([shares[0][k][key], shares[1][k][key]])
                  for key in batches[k]}
        for key in merged:
            np.testing.assert_array_equal(merged[key], batches[k][key])
    # Deterministic across runs.
    again = list(pl.make_eval_iterator(ListSource(n), global_batch_size=gbs, transform=PP))
    _assert_batches_equal(again, batches)


def test_eval_iterator_more_processes_than_data():
    it = pl.make_eval_iterator(ListSource(3), global_batch_size=8, transform=None,
                               process_index=3, process_count=4)
    (b,) = list(it)
    assert b["_valid"].tolist() == [False, False]


def _mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def test_global_batch_on_mesh():
    mesh = _mesh()
    local = next(_train(global_batch_size=16))
    with pytest.raises(TypeError, match="caption"):
        pl.global_batch(local, mesh)
    out = pl.global_batch(local, mesh, drop_non_numeric=True)
    assert set(out) == {"image", "label"}
    assert out["image"].shape == (16, 8, 8, 3)
    assert out["image"].sharding.spec == P(("data", "fsdp"))
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[0].data.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(out["label"]), local["label"])
    np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])


def test_global_batch_missing_axis_and_mask():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = next(pl.make_eval_iterator(ListSource(5), global_batch_size=8, transform="keep('label')"))
    out = pl.global_batch(batch, mesh)
    assert out["_valid"].dtype == np.bool_ and out["_valid"].sharding.spec == P(("data",))
    assert np.asarray(out["_valid"]).sum() == 5


def test_itertools_islice_compatible():
    # The train iterator is a plain Python iterator.
    assert len(list(itertools.islice(_train(), 2))) == 2
