"""A training data order that resumes exactly on any number of processes.

Why ``fmjax.data.pipeline.make_train_iterator`` cannot: process ``p`` of ``P`` reads the strided
shard ``source[p::P]`` and shuffles it with its own per-epoch permutation. Which examples a
process has seen depends on ``P``, and its grain state (one position per process, saved as
``process_<p>-of-<P>.json``) means nothing to a run with another ``P``: continuing on 1 or 4
processes from a 2-process checkpoint would repeat some examples of the epoch and skip others.
Restoring it onto another process count is refused by :func:`check_restore` /
:class:`DataStateHandler` with a one-line :class:`fmjax.errors.ConfigError` saying this.

The global order (:func:`make_global_train_iterator`) fixes one stream for all process counts:

  * The stream is the whole source, shuffled per epoch with ``seed`` (grain's
    ``MapDataset.shuffle(seed).repeat(num_epochs)``): global position ``g`` holds example
    ``perm_e[g - e*n]`` of epoch ``e = g // n``; each epoch is a permutation of all ``n``
    examples (none dropped).
  * Global batch ``k`` is positions ``[k*G, (k+1)*G)``; process ``p`` of ``P`` reads its
    contiguous ``G/P`` of it, ``[k*G + p*G/P, k*G + (p+1)*G/P)`` (the layout
    ``jax.make_array_from_process_local_data`` assembles in process order).
  * The augmentation rng of position ``g`` is ``default_rng((seed, 0, g))``: independent of
    ``P`` and of ``worker_count``.
  * The state is one number, ``next_batch`` (= global batches consumed; the same on every
    process), plus what must not change (``global_batch_size``, ``num_examples``, ``seed``,
    ``shuffle``, ``num_epochs``).

So a run on 2 processes stopped after batch ``k`` and continued on 1 or 4 yields exactly the
global batches ``k, k+1, ...`` of an uninterrupted run, with the same augmentations: no example
repeated or skipped (``tests/data/test_elastic_resume.py`` checks 2 -> 1 -> 4 against an
uninterrupted run). With one process the batches are identical to ``make_train_iterator``'s.

Checkpointing: the iterator is a ``grain.DatasetIterator`` with a JSON state, so
``pipeline.grain_save_args`` / ``grain_restore_args`` save and restore it exactly on the same
process count. grain's own handler reads only ``process_<p>-of-<P now>.json``; to restore onto a
different count use :func:`save_args` / :func:`restore_args` (``DataStateHandler``: the same
file layout, and on restore it reads the saved ``process_0-of-<P saved>.json`` when its own file
is absent). Those two also work for the per-process iterator, where they give the one-line
error instead of grain's ``File ... does not exist``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Optional, Sequence

import grain
import grain.python as gp
from etils import epath

from fmjax.data import pipeline
from fmjax.errors import ConfigError

ORDER_KEY = "fmjax_data_order"
ORDER = "global"
STATE_VERSION = 1
# The state keys that must agree between the saving and the restoring run.
FIXED_KEYS = ("global_batch_size", "num_examples", "seed", "shuffle", "num_epochs")
# How a user switches to this order; named in the error for the per-process pipeline.
GLOBAL_ORDER_HINT = ("start the run with config.data.order='global' "
                     "(fmjax.data.elastic.make_global_train_iterator), whose state any process "
                     "count continues exactly")
_STATE_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


class GlobalOrderIterator(grain.DatasetIterator):
    """Local batches of the global order (see the module docstring); ``get_state()`` /
    ``set_state()`` are JSON dicts whose position is the global batch count. ``set_state``
    accepts a state saved by any process count (and any ``worker_count``)."""

    def __init__(self, local_batches, *, read_options, worker_count: int, info: dict,
                 process_index: int, process_count: int):
        super().__init__()
        self._batches = local_batches
        self._read_options = read_options
        self._worker_count = int(worker_count)
        self._info = dict(info)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self._next = 0
        self._it = None

    def _inner(self):
        if self._it is None:
            ds = self._batches[self._next:] if self._next else self._batches
            it_ds = ds.to_iter_dataset(self._read_options)
            if self._worker_count:
                pipeline._ensure_absl_flags_parsed()  # pylint: disable=protected-access
                it_ds = it_ds.mp_prefetch(gp.MultiprocessingOptions(num_workers=self._worker_count))
            self._it = iter(it_ds)
        return self._it

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._inner())
        self._next += 1
        return batch

    @property
    def next_batch(self) -> int:
        """Global batches consumed so far (the index of the next one)."""
        return self._next

    def get_state(self) -> dict:
        return {ORDER_KEY: ORDER, "version": STATE_VERSION, "next_batch": self._next,
                **self._info, "saved_by_process_count": self.process_count}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._next = check_state(state, self._info)
        if self._it is not None:
            self._it.close()
            self._it = None

    def start_prefetch(self) -> None:
        inner = self._inner()
        if hasattr(inner, "start_prefetch"):
            inner.start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()

    def __str__(self):
        return (f"GlobalOrderIterator(next_batch={self._next}, process {self.process_index} of "
                f"{self.process_count}, {self._info})")


def check_state(state: Mapping[str, Any], info: Mapping[str, Any]) -> int:
    """``next_batch`` of a saved state, after checking it belongs to this data order and that
    ``info`` (batch size, dataset size, seed, ...) is unchanged; else a one-line ConfigError."""
    if not isinstance(state, Mapping) or state.get(ORDER_KEY) != ORDER:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(
            f"the saved data iterator state (keys {keys}) was written by the per-process data order "
            "(fmjax.data.pipeline.make_train_iterator), which the global order cannot continue: "
            "resume with the data order the run started with, or use a new --workdir.")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ConfigError(f"the saved data state has version {state.get('version')} (this fmjax reads "
                          f"up to {STATE_VERSION}): resume with the fmjax that wrote it.")
    diffs = [f"{k} {state.get(k)!r} -> {info.get(k)!r}" for k in FIXED_KEYS if state.get(k) != info.get(k)]
    if diffs:
        raise ConfigError(
            f"the saved data order does not match this run ({'; '.join(diffs)}): resume with the "
            "same batch size, dataset, seed and epochs, or use a new --workdir.")
    next_batch = state.get("next_batch")
    if isinstance(next_batch, bool) or not isinstance(next_batch, int) or next_batch < 0:
        raise ConfigError(f"the saved data state has next_batch={next_batch!r}, not a count >= 0: "
                          "the checkpoint's data item is damaged; restore it from a backup.")
    return next_batch


def make_global_train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    transform: pipeline.TransformLike,
    seed: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    worker_count: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    read_threads: int = 4,
    pp_key: str = "config.data.pp_train",
    example_shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> GlobalOrderIterator:
    """Like :func:`fmjax.data.pipeline.make_train_iterator` (same arguments, same local batches
    of ``global_batch_size // process_count``), in the global order of the module docstring,
    whose state restores onto any ``process_count``."""
    pi, pc = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
    local_bs = pipeline._local_batch_size(global_batch_size, pc)  # pylint: disable=protected-access
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    n = len(source)
    if n == 0:
        raise ValueError("make_global_train_iterator: empty source")
    if num_epochs is not None and n * int(num_epochs) < global_batch_size:
        raise ValueError(f"{n} examples x {num_epochs} epoch(s) cannot fill a global batch of "
                         f"{global_batch_size}")
    stream = grain.MapDataset.source(source)
    if shuffle:
        stream = stream.shuffle(seed=int(seed))  # reseeded per epoch by repeat()
    stream = stream.repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so every process ends together
        stream = stream[: (n * int(num_epochs) // global_batch_size) * global_batch_size]
    stream = stream.map_with_index(pipeline._IndexedTransform(  # pylint: disable=protected-access
        pipeline._as_transform(transform), seed, 0))  # rng (seed, 0, global position)
    local = stream.batch(local_bs, drop_remainder=True,
                         batch_fn=pipeline._Batch(pp_key, example_shapes))  # pylint: disable=protected-access
    local = local[pi::pc]  # sub-batch k*P + p = process p's part of global batch k
    info = dict(global_batch_size=int(global_batch_size), num_examples=int(n), seed=int(seed),
                shuffle=bool(shuffle), num_epochs=None if num_epochs is None else int(num_epochs))
    read = pipeline.read_options(read_threads)
    iterator = GlobalOrderIterator(local, read_options=read, worker_count=worker_count, info=info,
                                   process_index=pi, process_count=pc)
    if worker_count:
        pipeline._close_at_exit(iterator)  # pylint: disable=protected-access
    return iterator


def make_train_iterator(source: Any, *, order: str = "per_process", **kwargs):
    """``order='per_process'``: ``pipeline.make_train_iterator`` (the default, each process
    shuffles its own shard); ``order='global'``: :func:`make_global_train_iterator`."""
    if order == "global":
        return make_global_train_iterator(source, **kwargs)
    if order == "per_process":
        return pipeline.make_train_iterator(source, **kwargs)
    raise ConfigError(f"config.data.order={order!r}: use 'per_process' (the default) or 'global' "
                      "(restores onto any number of processes).")


# -- checkpoints --------------------------------------------------------------------------------


def _process_of(iterator) -> tuple:
    """(index, count) a state file is named by: the iterator's own for the global order (so
    simulated processes work in tests), else JAX's (as grain's handler does)."""
    if isinstance(iterator, GlobalOrderIterator):
        return iterator.process_index, iterator.process_count
    from grain._src.core import sharding  # pylint: disable=g-import-not-at-top
    return sharding.get_process_index_and_count()


def saved_process_files(directory) -> dict:
    """``{process_count: {process_index: path}}`` of the state files in a checkpoint's data item."""
    directory = epath.Path(directory)
    out: dict = {}
    if not directory.exists():
        return out
    for path in directory.iterdir():
        m = _STATE_FILE.match(path.name)
        if m:
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    return out


def process_count_error(directory, saved_count: int, process_count: int) -> ConfigError:
    return ConfigError(
        f"the data iterator state in {directory} was saved by {saved_count} process(es) and this run "
        f"has {process_count}: the per-process data order (each process shuffles its own strided "
        "shard of the data) cannot continue on another process count without repeating or skipping "
        f"examples; resume on {saved_count} process(es), or {GLOBAL_ORDER_HINT}.")


def check_restore(directory, iterator, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> None:
    """Raises a one-line ConfigError when ``iterator`` cannot continue from the data item
    ``directory`` (``<checkpoint step>/data``): a per-process iterator whose state was saved by
    another number of processes, a state of the other data order, a global-order state with
    another batch size / dataset / seed, or an incomplete set of state files. No-op when the
    state can be restored (or when there is none). Cheap: lists the folder, reads one file."""
    pi, pc = _process_of(iterator)
    pi = pi if process_index is None else int(process_index)
    pc = pc if process_count is None else int(process_count)
    saved = saved_process_files(directory)
    if not saved:
        return
    path = saved.get(pc, {}).get(pi)
    if path is None:
        if not isinstance(iterator, GlobalOrderIterator):
            raise process_count_error(directory, max(saved, key=lambda c: len(saved[c])), pc)
        path = _global_state_file(directory, saved)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # unreadable: the restore itself reports it
    if isinstance(iterator, GlobalOrderIterator):
        check_state(state, iterator._info)  # pylint: disable=protected-access
    elif isinstance(state, Mapping) and state.get(ORDER_KEY) == ORDER:
        raise ConfigError(
            f"the data iterator state in {directory} was saved by the global data order "
            "(config.data.order='global') and this run uses the per-process order: resume with "
            "config.data.order='global', or use a new --workdir.")


def _global_state_file(directory, saved: dict):
    """The state file a global-order restore reads when its own is absent: process 0's of the
    (single, complete) saved process count."""
    counts = sorted(c for c, files in saved.items() if len(files) == c and 0 in files)
    if len(counts) != 1:
        found = {c: sorted(f) for c, f in saved.items()}
        raise ConfigError(f"the data item {directory} holds an incomplete or mixed set of state files "
                          f"(process count -> indices: {found}): restore the checkpoint from a "
                          "backup, or use an older step.")
    return saved[counts[0]][0]


class DataStateHandler:
    """Orbax ``CheckpointHandler`` for data iterators, file-compatible with grain's
    (``process_<p>-of-<P>.json``, JSON states). Restore reads this process's file when it was
    saved on the same process count; otherwise a global-order iterator reads process 0's file
    of the saved count, and any other iterator raises :func:`process_count_error`."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None):
        item = item if item is not None else args.item
        pi, pc = _process_of(item)
        if isinstance(item, grain.DatasetIterator):
            text = json.dumps(item.get_state(), indent=4)
        else:  # grain's DataLoaderIterator: bytes
            text = item.get_state().decode()
        (epath.Path(directory) / f"process_{pi}-of-{pc}.json").write_text(text)

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None):
        item = item if item is not None else args.item
        directory = epath.Path(directory)
        pi, pc = _process_of(item)
        own = directory / f"process_{pi}-of-{pc}.json"
        check_restore(directory, item, pi, pc)  # the one-line errors, before anything is set
        if own.exists():
            path = own
        else:  # saved on another process count, and check_restore found that restorable
            saved = saved_process_files(directory)
            if not saved:
                raise FileNotFoundError(f"no data iterator state (process_*-of-*.json) in {directory}.")
            path = _global_state_file(directory, saved)
        text = path.read_text()
        item.set_state(json.loads(text) if isinstance(item, grain.DatasetIterator) else text.encode())
        if hasattr(item, "start_prefetch"):
            item.start_prefetch()
        return item

    def structure(self, directory):  # required by the interface; not used
        del directory
        return None

    def metadata(self, directory):
        del directory
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


import orbax.checkpoint as ocp  # noqa: E402  pylint: disable=g-import-not-at-top


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any


def save_args(iterator) -> DataStateSave:
    """Orbax args saving a data iterator (either order), inside ``ocp.args.Composite``."""
    return DataStateSave(iterator)


def restore_args(iterator) -> DataStateRestore:
    """Orbax args restoring a data iterator in place: onto any process count for the global
    order, with the one-line error for the per-process order. Reads states saved with
    ``pipeline.grain_save_args`` too (same files)."""
    return DataStateRestore(iterator)


def position(state: Mapping[str, Any]) -> dict:
    """Where a global-order state stands: ``examples_seen`` (global), ``epoch`` and
    ``index_in_epoch`` of the next example."""
    seen = int(state["next_batch"]) * int(state["global_batch_size"])
    epoch, index = divmod(seen, int(state["num_examples"]))
    return dict(examples_seen=seen, epoch=epoch, index_in_epoch=index)


