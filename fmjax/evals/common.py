"""What every eval type shares: the ``Evaluator`` base class, its config checks, and the
``Context`` of one run (data sources, eval pipelines, jitted objective hooks).

An entry ``config.evals.<name> = dict(type=..., ...)`` is run by the class that the
registry (``fmjax/evals/registry.py``) finds for its type. Every entry brings its own data
(big_vision's ``evaluators/common.py`` is the model):

  every          run every N steps and at the last (default ``config.eval_every``; 0: not
                 periodically, only at step 0 with ``config.eval_at_start``)
  batch_size     global eval batch (default ``config.batch_size``)
  dataset        data source name (default ``config.data.name``; any name
                 ``fmjax.data.sources`` knows, e.g. ``fmjax_shapes/64``, ``imagenet2012``)
  data_dir       where the dataset lives (default ``config.data.data_dir``)
  split          the evaluated split (default ``validation``)
  pp             eval pipeline (default ``config.data.pp_eval``)
  examples       first N examples of ``split`` (default / 0: all)
  train_split    kNN, linear probe, few-shot, captioning: the split fitted on (or searched)
                 (default ``train``)
  train_examples first N examples of ``train_split`` (default / 0: all)

plus the keys its type declares in ``fields``. ``Evaluator.check`` (every key known, every
value sensible, the objective has the hooks the type needs) and ``Evaluator.check_data``
(the dataset and split exist, files named by the entry exist) raise one-line
``ConfigError``s; ``fmjax/train/validate.py`` runs them before anything is compiled.

``Evaluator.run(state, step, writer)`` returns ``{key: value}``; the trainer logs
``eval/<name>_<key>`` (``eval/<name>`` for the key ``""``). Evaluators run identically on
every process; features are gathered so every process sees the whole split. Nothing here
imports ``fmjax.train``: what an evaluator needs from the trainer (restoring a classifier
from a workdir) comes in through the ``Context``.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.data import pipeline, sources
from fmjax.data.text_ops import tokenize_texts
from fmjax.data.transforms import parse_pp
from fmjax.errors import ConfigError, NonFiniteError
from fmjax.parallel import mesh as mesh_lib
from fmjax.objectives.base import supports

COMMON_FIELDS = ("type", "every", "batch_size", "dataset", "data_dir", "split", "pp", "examples")
TRAIN_FIELDS = ("train_split", "train_examples")


def scope(mesh, rules):
    """The ambient mesh and logical-axis rules under which a sharded model runs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh)
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


class Subset:
    """The first ``n`` examples of a random-access source (picklable)."""

    def __init__(self, source, n: int | None):
        self.source, self.n = source, len(source) if not n else min(int(n), len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i]


# -- value checks (each raises a one-line ConfigError naming the key) --------------------------
def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(where: str, key: str, value, minimum: int, hint: str = "") -> None:
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{where}.{key}={value!r}; it must be an integer >= {minimum}{hint}.")


def check_number(where: str, key: str, value, positive: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ConfigError(f"{where}.{key}={value!r}; it must be a finite number "
                          f"{'> 0' if positive else '>= 0'}.")


def check_fraction(where: str, key: str, value, low_open: bool = False) -> None:
    """A finite number in [0, 1] (``low_open``: in (0, 1])."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ConfigError(f"{where}.{key}={value!r}; it must be a number in "
                          f"{'(0, 1]' if low_open else '[0, 1]'}.")


def check_str(where: str, key: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}={value!r}; it must be a non-empty string.")


def read_lines(path: str, where: str) -> list[str]:
    """The non-empty, stripped lines of a text file (a missing file is a ConfigError)."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    try:
        with open(full, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise ConfigError(f"{where}={path!r}: cannot read {full}: {e.strerror or e}.") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"{where}={path!r}: {full} has no non-empty line.")
    return lines


class Context:
    """What the evaluators of one run share: the config, objective, mesh and rules, data
    sources and eval pipelines (cached), the objective's hooks jitted once, and services
    from the trainer (``load_classifier(workdir, num_classes, image_shape, devices)``)."""

    def __init__(self, config, objective, mesh, rules, load_classifier=None):
        self.config, self.objective, self.mesh, self.rules = config, objective, mesh, rules
        self.load_classifier = load_classifier
        self.step = 0
        self.cache: dict = {}  # shared by the evaluators of this run (e.g. restored classifiers)
        self._sources, self._transforms, self._jitted = {}, {}, {}
        self._features: dict | None = None

    @contextlib.contextmanager
    def evaluating(self, step: int):
        """One evaluation of one state: features of a split are computed once and shared by
        the evaluators that read it with the same pipeline and batch size (kNN, linear probe
        and few-shot on the same splits), then dropped."""
        self.step, self._features = step, {}
        try:
            yield self
        finally:
            self._features = None

    def jit(self, hook: str):
        """``jax.jit(objective.<hook>)``, made once per run (``loss``: the loss value only)."""
        if hook not in self._jitted:
            obj = self.objective
            fn = ((lambda p, e, b, r, s: obj.loss(p, e, b, r, s)[0]) if hook == "loss"
                  else getattr(obj, hook))
            self._jitted[hook] = jax.jit(fn)
        return self._jitted[hook]

    def scope(self):
        return scope(self.mesh, self.rules)

    def source(self, dataset: str, split: str, n, data_dir, where: str):
        key = (dataset, split, n, data_dir)
        if key not in self._sources:
            try:
                src = sources.get_source(dataset, split, data_dir,
                                         skip_bad_examples=self.config.data.get("skip_bad_examples", 0))
            except ValueError as e:  # a bad name or split: the config's fault
                raise ConfigError(f"{where}: {e}") from None
            self._sources[key] = Subset(src, n)
        return self._sources[key]

    def transform(self, pp: str, key: str):
        if (pp, key) not in self._transforms:
            self._transforms[(pp, key)] = parse_pp(pp, key)
        return self._transforms[(pp, key)]

    def batches(self, source, transform, batch_size: int, pp_key: str = "config.data.pp_eval"):
        """(global batch, valid mask) over ``source`` in order; the last batch is padded."""
        it = pipeline.make_eval_iterator(source, global_batch_size=batch_size, transform=transform,
                                         pp_key=pp_key)
        for local in it:
            valid = np.asarray(local.pop("_valid"))
            arrays = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
                      for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
            yield pipeline.global_batch(arrays, self.mesh), valid

    def features(self, params, extra, source, transform, batch_size: int, split: str,
                 pp_key: str = "config.data.pp_eval", with_text: bool = False):
        """(image features, labels[, text features]) over ``source``, padding removed (cached
        inside ``evaluating``: the params are those of the state being evaluated)."""
        key = (id(source), id(transform), int(batch_size), with_text)
        if self._features is not None and key in self._features:
            return self._features[key]
        feats, labels, texts = [], [], []
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        features_fn = self.jit("features")
        text_fn = self.jit("text_features") if with_text else None
        with self.scope():
            for batch, valid in self.batches(source, transform, batch_size, pp_key):
                v = gather(valid) if jax.process_count() > 1 else valid
                feats.append(gather(features_fn(params, extra, batch["image"]))[v])
                labels.append(gather(batch["label"])[v])
                if with_text:
                    texts.append(gather(text_fn(params, extra, batch["tokens"]))[v])
        out = (np.concatenate(feats).astype(np.float32), np.concatenate(labels))
        out = out + (np.concatenate(texts).astype(np.float32),) if with_text else out
        for name, x in (("image features", out[0]), ("text features", out[-1] if with_text else out[0])):
            if not np.isfinite(x).all():
                raise NonFiniteError(f"the model's {name} on {split} are not finite at step "
                                     f"{int(jax.device_get(self.step))}: the weights hold NaN/inf; "
                                     "evaluate an earlier checkpoint (--step=N).")
        if self._features is not None:
            self._features[key] = out
        return out

    def embed_prompts(self, params, extra, prompts, batch_size: int = 256):
        """Text embeddings of prompt strings (same on every process: replicated inputs)."""
        ids = tokenize_texts(self.config, prompts)
        text_fn = self.jit("text_features")
        out = []
        with self.scope():
            for i in range(0, len(ids), batch_size):
                out.append(np.asarray(text_fn(params, extra, ids[i:i + batch_size])))
        return np.concatenate(out)


class Evaluator:
    """Base class of the eval types. A subclass registers itself with
    ``@registry.register("<type>")`` and implements ``run``; it declares:

      fields           its own config keys (beyond COMMON_FIELDS, and TRAIN_FIELDS if
                       ``train_side``)
      train_side       it also reads a training split (kNN, linear probe, few-shot)
      requires         ``{objective hook: what the error calls a missing one}``
      random_init      meaningful on a freshly initialised model (launch/eval.py
                       --random_init_seeds skips it otherwise)
      sharded_batches  it feeds ``batch_size`` examples to the mesh, so the batch must split
                       over the data-parallel devices
    """

    type_name: str = ""  # set by registry.register
    fields: tuple = ()
    train_side: bool = False
    requires: dict = {}
    random_init: bool = True
    sharded_batches: bool = True

    # -- config checks (class methods: they run before anything is built) ---------------------
    @classmethod
    def valid_fields(cls) -> tuple:
        return COMMON_FIELDS + (TRAIN_FIELDS if cls.train_side else ()) + tuple(cls.fields)

    @classmethod
    def check(cls, name: str, ev, config, objective, mesh) -> None:
        """One-line ConfigErrors for unknown keys, bad values and missing objective hooks."""
        where = f"config.evals.{name}"
        valid = cls.valid_fields()
        unknown = sorted(k for k in ev.keys() if k not in valid)
        if unknown:
            raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {unknown} for "
                              f"type {cls.type_name!r}; valid: {sorted(valid)}.")
        for hook, what in cls.requires.items():
            if not supports(objective, hook):
                raise ConfigError(f"{where}: objective {config.objective.name!r} has no {what}.")
        if ev.get("every") is not None:
            check_int(where, "every", ev["every"], 0, " (0: not periodically)")
        if ev.get("batch_size") is not None:
            check_int(where, "batch_size", ev["batch_size"], 1)
            dp = mesh_lib.batch_parallelism(mesh)
            if cls.sharded_batches and ev["batch_size"] % dp:
                raise ConfigError(f"{where}.batch_size={ev['batch_size']} is not divisible by the "
                                  f"data-parallel size {dp}; use a multiple of {dp}.")
        for key in ("examples", "train_examples"):
            if ev.get(key) is not None:
                check_int(where, key, ev[key], 0, " (0: the whole split)")
        for key in ("dataset", "data_dir", "split", "train_split"):
            if ev.get(key) is not None:
                check_str(where, key, ev[key])
        if ev.get("pp") is not None:
            parse_pp(ev["pp"], f"{where}.pp")
        cls.check_options(where, ev, config, objective)

    @classmethod
    def check_options(cls, where: str, ev, config, objective) -> None:
        """Checks of the type's own ``fields`` (override)."""

    @classmethod
    def check_data(cls, name: str, ev, config) -> None:
        """The dataset and split(s) the entry reads exist (cheap: nothing is prepared or read)."""
        where = f"config.evals.{name}"
        dataset = ev.get("dataset") or config.data.name
        data_dir = ev.get("data_dir") or config.data.get("data_dir")
        splits = [ev.get("split", "validation")] + ([ev.get("train_split", "train")] if cls.train_side else [])
        for split in splits:
            try:
                sources.check_source(dataset, split, data_dir)
            except (ValueError, FileNotFoundError) as e:
                msg = " ".join(str(e).split())
                if ev.get("dataset") or ev.get("data_dir"):  # the entry's own data: its own key
                    msg = msg.replace("--config.data.data_dir", f"--{where}.data_dir")
                raise ConfigError(f"{where}: {msg}") from None

    # -- one entry, built once per run --------------------------------------------------------
    def __init__(self, name: str, ev, ctx: Context):
        config = ctx.config
        self.name, self.ev, self.ctx = name, ev, ctx
        self.where = f"config.evals.{name}"
        self.dataset = ev.get("dataset") or config.data.name
        self.data_dir = ev.get("data_dir") or config.data.get("data_dir")
        self.split = ev.get("split", "validation")
        self.examples = ev.get("examples")
        self.train_split = ev.get("train_split", "train")
        self.train_examples = ev.get("train_examples")
        self.batch_size = ev.get("batch_size", config.batch_size)
        if ev.get("pp") is not None:
            self.pp, self.pp_key = ev["pp"], f"{self.where}.pp"
        else:
            self.pp, self.pp_key = config.data.pp_eval, "config.data.pp_eval"
        self.transform = ctx.transform(self.pp, self.pp_key)

    def source(self, train: bool = False, examples=None):
        """The (first ``examples`` of the) eval split, or the train split with ``train``."""
        split = self.train_split if train else self.split
        n = examples if examples is not None else (self.train_examples if train else self.examples)
        return self.ctx.source(self.dataset, split, n, self.data_dir, self.where)

    def batches(self, train: bool = False, examples=None):
        return self.ctx.batches(self.source(train, examples), self.transform, self.batch_size,
                                self.pp_key)

    def features(self, state, train: bool = False, with_text: bool = False):
        """(features, labels[, text features]) of the eval split (or the train split)."""
        return self.ctx.features(state.params, state.extra, self.source(train), self.transform,
                                 self.batch_size, self.train_split if train else self.split,
                                 self.pp_key, with_text)

    def class_names(self):
        """The dataset's class names, or None where unknown."""
        return sources.class_names(self.dataset, self.data_dir)

    def num_classes(self, *labels) -> int:
        """The dataset's number of classes where known, and at least 1 + the largest label."""
        known = None
        try:
            known = sources.num_classes(self.dataset, self.data_dir)
        except Exception:  # noqa: BLE001 - the labels decide then
            pass
        seen = max((int(np.max(x)) + 1 for x in labels if np.size(x)), default=0)
        return max(int(known or 0), seen)

    def run(self, state, step: int, writer) -> dict:
        """``{key: value}``, logged as ``eval/<name>_<key>`` (``eval/<name>`` for ``""``)."""
        raise NotImplementedError


class SeededEvaluator(Evaluator):
    """An eval type whose batches need an rng (``loss``, ``metrics``): the ``seed`` key
    (default 1234); batch ``i`` uses ``fold_in(PRNGKey(seed), i)``."""

    fields = ("seed",)

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "seed" in ev:
            check_int(where, "seed", ev["seed"], 0)

    def seeded_batches(self):
        """(batch, valid mask, rng) over the eval split, in order."""
        rng = jax.random.PRNGKey(self.ev.get("seed", 1234))
        for i, (batch, valid) in enumerate(self.batches()):
            yield batch, valid, jax.random.fold_in(rng, i)
