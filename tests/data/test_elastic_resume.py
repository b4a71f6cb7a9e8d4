"""Exact resume over ArrayRecord shards, and restoring the data order onto another number of
processes (``fmjax.data.elastic``).

Processes are simulated in one Python process with ``process_index`` / ``process_count``: the
local batches of global batch ``k`` are concatenated in process order, as
``jax.make_array_from_process_local_data`` assembles them.
"""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from fmjax.data import elastic, pipeline, records, sources
from fmjax.errors import ConfigError

PP = "random_resized_crop(8, scale=(0.3, 1.0))|flip_lr|normalize('imagenet')"
N = 37  # not a multiple of the batch size or of any process count


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("ar")
    rng = np.random.default_rng(0)
    examples = [dict(image=rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), label=i % 5, index=i,
                     caption=f"caption {i}") for i in range(N)]
    records.write_shards(examples, str(d), "train", 4)
    return f"array_record:{d}"


def _source(name):
    return sources.get_source(name, "train")


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _global(its, k):
    """``k`` global batches from the simulated processes ``its`` (in process order)."""
    out = []
    for _ in range(k):
        parts = [next(it) for it in its]
        out.append({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
    return out


def _manager(path):
    return ocp.CheckpointManager(str(path), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))


# -- exact resume on the same process count ---------------------------------------------------------

@pytest.mark.parametrize("make", ["per_process", "global"])
def test_exact_resume_through_orbax(make, shards, tmp_path):
    """Save the iterator with the trainer's helpers (pipeline.grain_save_args /
    grain_restore_args) after 5 batches; a fresh iterator restored from it continues with
    exactly the batches (order and augmentations) of the uninterrupted one."""
    def build():
        return elastic.make_train_iterator(_source(shards), order=make, global_batch_size=6,
                                           transform=PP, seed=7)
    it = build()
    _take(it, 5)
    mngr = _manager(tmp_path / "ckpt")
    mngr.save(5, args=ocp.args.Composite(data=pipeline.grain_save_args(it)))
    mngr.wait_until_finished()
    expected = _take(it, 9)  # crosses the end of the first epoch (37 examples)

    resumed = build()
    _manager(tmp_path / "ckpt").restore(5, args=ocp.args.Composite(data=pipeline.grain_restore_args(resumed)))
    _assert_same(_take(resumed, 9), expected)
    # elastic.save_args / restore_args read and write the same files.
    again = build()
    _manager(tmp_path / "ckpt").restore(5, args=ocp.args.Composite(data=elastic.restore_args(again)))
    _assert_same(_take(again, 9), expected)


def test_global_order_with_one_process_is_the_per_process_order(shards):
    a = pipeline.make_train_iterator(_source(shards), global_batch_size=4, transform=PP, seed=3)
    b = elastic.make_global_train_iterator(_source(shards), global_batch_size=4, transform=PP, seed=3)
    _assert_same(_take(a, 25), _take(b, 25))


# -- another number of processes --------------------------------------------------------------------

def test_global_order_resumes_2_then_1_then_4_processes(shards, tmp_path):
    """2 processes for 7 global batches, checkpoint; 1 process for 9 more, checkpoint; 4
    processes for 20 more: the 36 global batches are those of an uninterrupted 1-process run
    (same examples, order and augmentations), so every epoch holds each example exactly once."""
    G = 8
    kw = dict(global_batch_size=G, transform=PP, seed=11)
    src = _source(shards)
    reference = _global([elastic.make_global_train_iterator(src, **kw)], 36)
    handler = elastic.DataStateHandler()

    two = [elastic.make_global_train_iterator(src, process_index=p, process_count=2, **kw) for p in range(2)]
    seen = _global(two, 7)
    first = epath.Path(tmp_path / "step7")
    first.mkdir()
    for it in two:  # every process writes its own file, as under Orbax
        handler.save(first, args=elastic.save_args(it))
    assert sorted(p.name for p in first.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
    state = json.loads((first / "process_1-of-2.json").read_text())
    assert state["next_batch"] == 7 and elastic.position(state) == dict(
        examples_seen=56, epoch=1, index_in_epoch=19)

    one = elastic.make_global_train_iterator(src, process_index=0, process_count=1, **kw)
    elastic.check_restore(first, one)  # no error: the global order restores onto 1 process
    handler.restore(first, args=elastic.restore_args(one))
    seen += _global([one], 9)
    second = epath.Path(tmp_path / "step16")
    second.mkdir()
    handler.save(second, args=elastic.save_args(one))

    four = [elastic.make_global_train_iterator(src, process_index=p, process_count=4, **kw) for p in range(4)]
    for it in four:
        handler.restore(second, args=elastic.restore_args(it))
    seen += _global(four, 20)

    _assert_same(seen, reference)
    order = np.concatenate([b["index"] for b in seen])
    assert len(order) == 36 * G
    for e in range(len(order) // N):  # 7 whole epochs: each a permutation of all 37 examples
        assert sorted(order[e * N:(e + 1) * N]) == list(range(N))
    assert not np.array_equal(order[:N], order[N:2 * N])  # reshuffled every epoch


def test_finite_epochs_end_together_on_every_process_count(shards):
    """num_epochs=2: 74 positions -> 9 whole global batches of 8 on 1, 2 or 4 processes."""
    src = _source(shards)
    ref = None
    for pc in (1, 2, 4):
        its = [elastic.make_global_train_iterator(src, global_batch_size=8, transform=None, seed=0,
                                                  num_epochs=2, process_index=p, process_count=pc)
               for p in range(pc)]
        batches = _global(its, 9)
        for it in its:
            with pytest.raises(StopIteration):
                next(it)
        order = np.concatenate([b["index"] for b in batches])
        assert sorted(order[:N]) == list(range(N))
        if ref is None:
            ref = order
        np.testing.assert_array_equal(order, ref)


def test_per_process_order_refuses_another_process_count(shards, tmp_path):
    """The default order's state cannot continue on another process count: a one-line
    ConfigError that says why and what to do (not grain's 'File ... does not exist')."""
    src = _source(shards)
    data = epath.Path(tmp_path / "data")
    data.mkdir()
    for p in range(2):
        it = pipeline.make_train_iterator(src, global_batch_size=4, transform=None, seed=0,
                                          process_index=p, process_count=2)
        _take(it, 3)
        (data / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
    plain = pipeline.make_train_iterator(src, global_batch_size=4, transform=None, seed=0)  # 1 process
    with pytest.raises(ConfigError) as e:
        elastic.check_restore(data, plain)
    msg = str(e.value)
    assert "\n" not in msg
    assert "saved by 2 process(es) and this run has 1" in msg
    assert "cannot continue on another process count without repeating or skipping" in msg
    assert "resume on 2 process(es)" in msg and "config.data.order='global'" in msg
    with pytest.raises(ConfigError, match="saved by 2 process"):
        elastic.DataStateHandler().restore(data, args=elastic.restore_args(plain))
    # Same count: no error, and the state is restored.
    elastic.check_restore(data, plain, process_index=1, process_count=2)
    # A global-order iterator cannot continue a per-process state, nor the other way round;
    # check_restore says so before anything is restored.
    glob = elastic.make_global_train_iterator(src, global_batch_size=4, transform=None, seed=0)
    with pytest.raises(ConfigError, match="written by the per-process data order"):
        elastic.check_restore(data, glob, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="written by the per-process data order"):
        elastic.DataStateHandler().restore(data, args=elastic.restore_args(glob))
    _take(glob, 2)
    (data / "process_0-of-1.json").write_text(json.dumps(glob.get_state()))
    with pytest.raises(ConfigError, match="saved by the global data order .* uses the per-process order"):
        elastic.check_restore(data, plain)


def test_global_state_checks(shards, tmp_path):
    src = _source(shards)
    it = elastic.make_global_train_iterator(src, global_batch_size=4, transform=None, seed=0)
    _take(it, 2)
    state = it.get_state()
    other = elastic.make_global_train_iterator(src, global_batch_size=8, transform=None, seed=1)
    with pytest.raises(ConfigError, match=r"global_batch_size 4 -> 8; seed 0 -> 1"):
        other.set_state(state)
    saved = epath.Path(tmp_path / "saved")
    saved.mkdir()
    (saved / "process_0-of-1.json").write_text(json.dumps(state))
    elastic.check_restore(saved, it)
    with pytest.raises(ConfigError, match=r"does not match this run \(global_batch_size 4 -> 8"):
        elastic.check_restore(saved, other)  # before anything is restored
    with pytest.raises(ConfigError, match="next_batch=-1"):
        it.set_state(dict(state, next_batch=-1))
    # An incomplete set of state files (a process's file lost) is refused, not guessed.
    data = epath.Path(tmp_path / "data")
    data.mkdir()
    (data / "process_1-of-2.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="incomplete or mixed set of state files"):
        elastic.DataStateHandler().restore(data, args=elastic.restore_args(it))
    with pytest.raises(ConfigError, match="config.data.order='bogus'"):
        elastic.make_train_iterator(src, order="bogus", global_batch_size=4, transform=None, seed=0)


def test_worker_processes_give_the_same_batches_after_a_restore(shards):
    """worker_count=2: the ArrayRecord source pickles into grain's workers; a restored
    iterator restarts its workers at the saved global batch."""
    kw = dict(global_batch_size=4, transform=PP, seed=5)
    plain = elastic.make_global_train_iterator(_source(shards), **kw)
    expected = _take(plain, 8)
    with_workers = elastic.make_global_train_iterator(_source(shards), worker_count=2, **kw)
    try:
        _assert_same(_take(with_workers, 3), expected[:3])
        state = with_workers.get_state()
        with_workers.set_state(dict(state, next_batch=5))
        _assert_same(_take(with_workers, 3), expected[5:8])
    finally:
        with_workers.close()
