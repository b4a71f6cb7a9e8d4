"""TinyViT's fast distillation (Wu et al. 2022, microsoft/Cream TinyViT): the teacher's sparse
top-k probabilities, stored once for every example of a training run as it will be augmented,
then replayed by runs that need no teacher.

**What is stored** (``launch/store_logits.py``, ``fmjax.objectives.distill.store_topk``): for
each step of the run the config describes, the batch the trainer would draw (the same pipeline,
seed and per-example augmentation) mixed as the objective mixes it (the same mixup / CutMix
draws), through the teacher; for every example the top-k of ``softmax(teacher logits / T)``:

- ``DIR/probs.npy``: (N, k) float16 (or float32), largest first; ``DIR/index.npy``: (N, k) int32 classes;
- ``DIR/meta.json``: ``topk``, ``num_classes``, ``temperature``, ``rows`` (N = steps x batch),
  ``steps``, ``teacher`` (its workdir and step, for the record) and the ``fingerprint`` of
  everything that decides the batches (dataset, split, seed, batch size, order, pp_train
  without this op, the mixing options).

Row ``step * batch + i`` is example ``i`` of step ``step``: the position of that example in the
training stream (``fmjax.data.pipeline`` seeds each example's augmentation by it), which is
TinyViT's (epoch, index, augmentation seed) key in one number.

**Replay**: the pp op ``teacher_topk('DIR')`` (in ``config.data.pp_train``, before
``keep(...)``, which must keep ``teacher_probs`` and ``teacher_index``) reads the row of each
example by its stream position, which the training pipeline passes to ops that ask for it
(``wants_stream``). With ``objective.teacher.logits=DIR`` the distill objective uses the rows
instead of running a teacher (see ``fmjax.objectives.distill``). Shape probes outside the
training stream (the batch spec, ahead-of-time compiles) get zero rows of the right shape.
One process only (the positions are per process; mixing couples a batch across processes).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from fmjax.data.registry import register_op
from fmjax.data.transform_base import Transform
from fmjax.errors import ConfigError, DataError

META, PROBS, INDEX = "meta.json", "probs.npy", "index.npy"
KEYS = ("teacher_probs", "teacher_index")


def read_meta(directory: str) -> dict:
    """``DIR/meta.json`` of a finished store; one-line ConfigErrors otherwise."""
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise ConfigError(f"stored teacher logits {directory}: no {META} (a finished "
                          "launch/store_logits.py run writes it last); store them first.")
    with open(path) as f:
        meta = json.load(f)
    for name in (PROBS, INDEX):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ConfigError(f"stored teacher logits {directory}: {name} is missing; store them again.")
    return meta


def without_op(pp: str) -> str:
    """``pp`` without its ``teacher_topk(...)`` op and without the op's keys in ``keep(...)``:
    what made the stored batches (a replay config's pp_train and the original agree on it)."""
    from fmjax.data.registry import split_pp
    keys = "|".join(KEYS)
    ops = [s.strip() for s in split_pp(pp) if not s.strip().startswith("teacher_topk")]
    return "|".join(re.sub(rf"\s*,\s*(['\"])({keys})\1", "", s) if s.startswith("keep") else s
                    for s in ops)


def with_op(pp: str, directory: str) -> str:
    """``pp`` with ``teacher_topk('DIR')`` before its last ``keep(...)`` and the op's keys added
    to that keep (at the end when there is none): a replay's pp_train."""
    from fmjax.data.registry import split_pp
    ops = [s.strip() for s in split_pp(without_op(pp))]
    op = f"teacher_topk({str(directory)!r})"
    last = max((i for i, s in enumerate(ops) if s.startswith("keep(")), default=None)
    if last is None:
        return "|".join(ops + [op])
    keep = ops[last].rstrip()[:-1].rstrip().rstrip(",") + ", " + ", ".join(repr(k) for k in KEYS) + ")"
    return "|".join(ops[:last] + [op, keep] + ops[last + 1:])


@register_op
class teacher_topk(Transform):  # noqa: N801
    """Adds ``teacher_probs`` (k,) float32 and ``teacher_index`` (k,) int32: the stored row of
    this example's stream position (see the module docstring)."""

    wants_stream = True

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(str(directory)))
        meta = read_meta(self.directory)
        self.k, self.rows = int(meta["topk"]), int(meta["rows"])
        self._arrays = None

    def __getstate__(self):  # grain workers reopen the memory maps
        return {**self.__dict__, "_arrays": None}

    def _open(self):
        if self._arrays is None:
            self._arrays = tuple(np.load(os.path.join(self.directory, n), mmap_mode="r")
                                 for n in (PROBS, INDEX))
        return self._arrays

    def __call__(self, example, rng):
        from fmjax.data.transforms import STREAM_KEY
        out = dict(example)
        stream = example.get(STREAM_KEY)
        if stream is None:  # a shape probe (batch spec, AOT), not a training example
            out["teacher_probs"] = np.zeros((self.k,), np.float32)
            out["teacher_index"] = np.zeros((self.k,), np.int32)
            return out
        process, position = stream
        if process != 0:
            raise DataError(f"teacher_topk: stored teacher logits are for one process; this is "
                            f"process {process}. Train on one process (or store per process).")
        if position >= self.rows:
            raise DataError(f"teacher_topk: training-stream position {position} is past the "
                            f"{self.rows} rows stored in {self.directory}; store more steps "
                            "(launch/store_logits.py --steps) or train fewer.")
        probs, index = self._open()
        out["teacher_probs"] = np.asarray(probs[position], np.float32)
        out["teacher_index"] = np.asarray(index[position], np.int32)
        return out
