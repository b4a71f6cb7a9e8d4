"""grain input pipelines: sharded, shuffled, checkpointable host batches.

Training::

    it = make_train_iterator(source, global_batch_size=256, seed=0,
                             transform="random_resized_crop(224)|flip_lr|normalize")
    batch = next(it)                       # dict of numpy, batch dim 256 // process_count
    arrays = global_batch(batch, mesh)     # dict of sharded jax.Arrays

Each process reads a disjoint strided shard of the source, reshuffled every
epoch with ``seed``. Each example's transform rng depends only on
``(seed, process_index, position in the stream)``, so batches are identical
for any ``worker_count``.

Iterator state (exact resume) — the returned iterator is a
``grain.DatasetIterator``: ``state = it.get_state()`` (a JSON-able dict) and
``it.set_state(state)``. With Orbax, put it next to the train state::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))        # == grain_save_args(it)
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))     # == grain_restore_args(it)

The restore mutates ``it`` in place (build it with the same arguments
first). grain writes one ``process_{i}-of-{n}.json`` per JAX process.

With ``worker_count > 0`` grain spawns worker processes: the source and
transform must be picklable and the launching script needs the usual
``if __name__ == "__main__":`` guard. Close such iterators (``it.close()``)
when done; any left open are closed at interpreter exit.

Bad data: examples are stacked into batches only after checking that every one
has the same keys and shapes per key (and, with ``example_shapes``, the shapes
the train step was compiled for). A mismatch (e.g. an eval split of 32x32 and
48x48 images with no resize in ``pp_eval``) is a one-line
``fmjax.errors.DataError`` naming the key, the two shapes and the fix. A source's
``DataError`` (an unreadable image: ``fmjax.data.bad_examples``) reaches the
caller of ``next(iterator)`` unwrapped, with ``worker_count`` 0 or more (grain
re-raises a worker's exception in the trainer, type and message intact).
"""
import atexit
import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import grain
import grain.checkpoint
import grain.python as gp
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.data import transforms as tr
from fmjax.errors import DataError
from fmjax.parallel.mesh import BATCH_AXES

try:  # grain's default batch function (np.stack per leaf, optionally into shared memory)
    from grain._src.python.dataset.transformations.batch import make_batch as _grain_make_batch
except ImportError:  # pragma: no cover - grain moved it
    _grain_make_batch = None

TransformLike = Union[None, str, Callable[[dict, np.random.Generator], dict]]
VALID_KEY = "_valid"


def _as_transform(transform: TransformLike) -> Callable:
    """None -> identity, str -> :func:`transforms.parse`, else unchanged."""
    if transform is None:
        return tr.Compose([])
    if isinstance(transform, str):
        return tr.parse(transform)
    return transform


def _process(process_index: Optional[int], process_count: Optional[int]):
    """Fills in ``jax.process_index()/process_count()`` and validates."""
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    return pi, pc


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``; raises if not divisible."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}")
    return global_batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
    """grain's worker pool reads absl flags; outside ``absl.app.run`` (e.g.
    pytest, notebooks) they are unparsed, so mark them parsed (defaults)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _IndexedTransform(gp.MapWithIndexTransform):
    """Applies ``transform(example, rng)`` with ``rng`` seeded by
    ``(seed, process_index, index)``, ``index`` being the element's position
    in this process's (repeated) stream, so results do not depend on workers.
    """

    def __init__(self, transform: Callable, seed: int, process_index: int):
        self.transform = transform
        self.seed = int(seed)
        self.process_index = int(process_index)

    def map_with_index(self, index: int, element):
        rng = np.random.default_rng((self.seed, self.process_index, int(index)))
        if getattr(self.transform, "wants_stream", False):  # e.g. teacher_topk: rows by position
            element = {**element, tr.STREAM_KEY: (self.process_index, int(index))}
        return self.transform(element, rng)


def _stack(values, output_to_shared_memory: bool = False):
    """grain's default batching: a new leading batch dim on every leaf."""
    if _grain_make_batch is not None:
        return _grain_make_batch(values, output_to_shared_memory=output_to_shared_memory)
    first = values[0]
    if isinstance(first, dict):
        return {k: _stack([v[k] for v in values]) for k in first}
    return np.stack([np.asarray(v) for v in values])


def _shape(x) -> tuple:
    return tuple(int(d) for d in x)


class _Batch:
    """A grain ``batch_fn``: grain's default stacking, after checking that the examples
    (dicts) agree on their keys and on the shape of each array (and match
    ``example_shapes`` where given). A mismatch is a one-line DataError naming the
    key, the shapes and the fix in ``pp_key``. Picklable (grain worker processes)."""

    def __init__(self, pp_key: str, example_shapes: Optional[Mapping[str, Sequence[int]]] = None):
        self.pp_key = pp_key
        self.example_shapes = {k: _shape(v) for k, v in (example_shapes or {}).items()}
        self.output_to_shared_memory = False

    def enable_shared_memory_output(self) -> None:  # grain calls this under mp_prefetch
        self.output_to_shared_memory = True

    def __call__(self, values):
        if values and all(isinstance(v, dict) for v in values):
            self._check(values)
        return _stack(values, self.output_to_shared_memory)

    def _check(self, values) -> None:
        first = values[0]
        for example in values[1:]:
            if example.keys() != first.keys():
                raise DataError(
                    f"examples of one batch have different keys, {sorted(first)} and {sorted(example)}: "
                    f"make {self.pp_key} give every example the same keys (end it in keep(...)).")
        for key in first:
            arrays = [v[key] for v in values]
            if not all(isinstance(a, np.ndarray) for a in arrays):
                continue  # strings, ints, nested dicts: stacked as grain does
            expected = self.example_shapes.get(key)
            reference = expected if expected is not None else arrays[0].shape
            for i, a in enumerate(arrays):
                if a.shape != reference:
                    raise DataError(self._mismatch(key, reference, a.shape, values[0], values[i],
                                                   expected is not None))

    def _mismatch(self, key, reference, got, first, example, compiled: bool) -> str:
        def source_of(ex):
            name = ex.get("file_name")
            return f" ({name})" if isinstance(name, str) else ""
        if compiled:
            what = (f"{key!r} has shape {_shape(got)}{source_of(example)} but the train step was built "
                    f"for {_shape(reference)} (the first training example)")
        else:
            what = (f"examples of one batch have different shapes for {key!r}: {_shape(reference)}"
                    f"{source_of(first)} and {_shape(got)}{source_of(example)}")
        if len(reference) == 3 and len(got) == 3:  # (H, W, C) images of different sizes
            size = reference[0]
            fix = (f"give every image one size in {self.pp_key}, e.g. start it with "
                   f"resize({size})|center_crop({size})")
        else:
            fix = f"make {self.pp_key} give {key!r} one shape for every example"
        return f"{what}: {fix}."


def read_options(read_threads: int) -> "gp.ReadOptions":
    """grain's read options for a dataset whose elements are whole batches (``batch`` runs on
    the MapDataset): ``read_threads`` threads each build a batch, at most
    ``max(2, read_threads)`` batches ahead of the trainer.

    grain's ``prefetch_buffer_size`` counts the dataset's elements, here batches. It was
    ``2 * local batch size``: 256 batches ahead at batch 128 (hundreds of MB of host memory on
    the CPU presets; at ImageNet sizes more than a host has). On the 2-core CPU the readers
    then ran flat out beside the train step for the first ~40 s of every run: configs/clip.py's
    default stepped at 0.9/s for ~40 steps before reaching 1.5/s (2026-12-06)."""
    return gp.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, int(read_threads)))


def _close_at_exit(iterator) -> None:
    """Closes a worker-process iterator at interpreter exit if still open: its workers and
    buffered shared-memory batches are released before module teardown, where grain's
    ``__del__`` would otherwise print "Exception ignored" tracebacks after an error."""
    ref = weakref.ref(iterator)

    def close():
        it = ref()
        if it is not None:
            try:
                it.close()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass

    atexit.register(close)


def make_train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    transform: TransformLike,
    seed: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    worker_count: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    read_threads: int = 4,
    pp_key: str = "config.data.pp_train",
    example_shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> "grain.DatasetIterator":
    """Returns an iterator of per-process local batches (dicts of numpy).

    Pipeline (grain dataset API): ``source[:m][process_index::process_count]``
    (``m`` = largest multiple of ``process_count``), per-epoch reseeded
    shuffle, repeat, per-example transform, batch (remainder dropped),
    optional ``mp_prefetch`` workers. Worker processes each build whole
    batches ``i::worker_count`` and the output is interleaved back in order,
    so batches are identical for any ``worker_count``.

    Args:
      source: random-access source (``len`` and ``__getitem__(i) -> dict``);
        must be picklable when ``worker_count > 0``.
      global_batch_size: batch size over all processes; each local batch has
        ``global_batch_size // process_count`` examples.
      transform: ``transform(example, rng) -> example``, a pp string, or None.
      seed: shuffle and augmentation seed (``0 <= seed < 2**32``).
      process_index, process_count: this process's shard; default JAX's.
      worker_count: grain worker processes (0: threads in this process).
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever; else stop after that many epochs.
      read_threads: threads reading/transforming elements in each process.
      pp_key: the config key of ``transform``, named in shape-mismatch errors.
      example_shapes: optional ``{key: per-example shape}`` every example must
        have (e.g. what the train step was compiled for); else examples only
        need to agree within a batch. A mismatch is a ``DataError``.

    Returns:
      A ``grain.DatasetIterator`` with ``get_state()``/``set_state()``.
    """
    pi, pc = _process(process_index, process_count)
    local_bs = _local_batch_size(global_batch_size, pc)
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    n = len(source)
    per_process = n // pc
    if per_process == 0 or (per_process < local_bs and num_epochs is not None):
        raise ValueError(f"{n} examples over {pc} processes cannot fill a local batch of {local_bs}")
    ds = grain.MapDataset.source(source)[: per_process * pc][pi::pc]
    if shuffle:
        ds = ds.shuffle(seed=int(seed))  # reseeded per epoch by repeat()
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_IndexedTransform(_as_transform(transform), seed, pi))
    ds = ds.batch(local_bs, drop_remainder=True, batch_fn=_Batch(pp_key, example_shapes))
    it_ds = ds.to_iter_dataset(read_options(read_threads))
    if worker_count:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(gp.MultiprocessingOptions(num_workers=worker_count))
    iterator = iter(it_ds)
    if worker_count:
        _close_at_exit(iterator)
    return iterator


def grain_save_args(iterator) -> Any:
    """Orbax args saving a grain iterator (use inside ``ocp.args.Composite``)."""
    return grain.checkpoint.CheckpointSave(iterator)


def grain_restore_args(iterator) -> Any:
    """Orbax args restoring a grain iterator in place."""
    return grain.checkpoint.CheckpointRestore(iterator)


def eval_indices(num_examples: int, global_batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
    """Source indices this process reads for eval; ``-1`` marks padding.

    Global batch ``k`` holds examples ``[k * G, (k + 1) * G)`` in order and
    process ``p`` holds the ``p``-th slice of ``G // process_count`` of it, so
    concatenating the local batches in process order restores dataset order.
    """
    local_bs = _local_batch_size(global_batch_size, process_count)
    num_batches = -(-num_examples // global_batch_size)
    idx = np.arange(num_batches * global_batch_size).reshape(num_batches, process_count, local_bs)
    idx = idx[:, process_index].reshape(-1)
    return np.where(idx < num_examples, idx, -1)


class _EvalSource:
    """Random-access view: position -> transformed example + ``_valid``."""

    def __init__(self, source, indices: np.ndarray, transform: Callable, seed: int):
        self.source = source
        self.indices = indices
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        i = int(self.indices[position])
        j = max(i, 0)  # padding repeats example 0 and is masked out
        example = self.transform(self.source[j], np.random.default_rng((self.seed, j)))
        example = dict(example)
        example[VALID_KEY] = np.bool_(i >= 0)
        return example


class EvalIterator:
    """One in-order pass over a split; ``len()`` is the number of batches,
    equal on every process."""

    def __init__(self, dataset, num_batches: int):
        self._it = iter(dataset)
        self._num_batches = num_batches

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return next(self._it)


def make_eval_iterator(
    source: Any,
    *,
    global_batch_size: int,
    transform: TransformLike,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    seed: int = 0,
    pp_key: str = "config.data.pp_eval",
) -> EvalIterator:
    """One pass over ``source`` in order, no shuffle, per-process share.

    Every process yields ``ceil(len(source) / global_batch_size)`` batches of
    ``global_batch_size // process_count``; padding examples (copies of
    example 0) have ``batch['_valid'] == False``. ``seed`` only matters for
    random transforms (each example's rng is seeded by ``(seed, index)``).
    ``pp_key`` names ``transform`` in the DataError for examples of different
    shapes (e.g. images of several sizes and no resize in ``pp_eval``).
    """
    pi, pc = _process(process_index, process_count)
    local_bs = _local_batch_size(global_batch_size, pc)
    n = len(source)
    if n == 0:
        raise ValueError("make_eval_iterator: empty source")
    indices = eval_indices(n, global_batch_size, pi, pc)
    ds = grain.MapDataset.source(_EvalSource(source, indices, _as_transform(transform), seed))
    ds = ds.batch(local_bs, drop_remainder=False, batch_fn=_Batch(pp_key))
    return EvalIterator(ds.to_iter_dataset(), len(indices) // local_bs)


def _is_numeric(x: np.ndarray) -> bool:
    """bool / int / uint / float / complex dtypes (incl. bfloat16)."""
    return x.dtype.kind in "biufc" or x.dtype.name == "bfloat16"


def global_batch(
    local_batch: Dict[str, Any],
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    *,
    drop_non_numeric: bool = False,
) -> Dict[str, jax.Array]:
    """Local host batch -> global ``jax.Array``s sharded on the batch dim.

    The batch dim is split over ``batch_axes`` (those absent from ``mesh``
    are ignored) with ``jax.make_array_from_process_local_data``; the global
    batch is the concatenation of all processes' local batches in process
    order. Non-numeric values (e.g. caption strings) raise a TypeError, or
    are dropped with ``drop_non_numeric=True``.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, P(axes if axes else None))
    out = {}
    for k, v in local_batch.items():
        arr = np.asarray(v)
        if not _is_numeric(arr):
            if drop_non_numeric:
                continue
            raise TypeError(
                f"global_batch: key {k!r} has non-numeric dtype {arr.dtype}; tokenize it or "
                "drop it (drop_non_numeric=True) before making device arrays")
        if arr.ndim == 0:
            raise ValueError(f"global_batch: key {k!r} is a scalar, expected a batch dim")
        global_shape = (arr.shape[0] * jax.process_count(),) + arr.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, arr, global_shape)
    return out
