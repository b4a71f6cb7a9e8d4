"""Evaluators configured as data: ``config.evals = {name: {type: ..., every: ..., ...}}``.

Types: ``knn`` and ``linear_probe`` on frozen ``objective.features``; ``loss`` (the
objective's loss on a held-out split with a fixed rng); ``images`` (the objective's
``visualize`` pictures, written to ``DIR/images/`` and TensorBoard). Runs identically
on every process; features are gathered so every process sees the whole split.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.data import pipeline, sources, transforms
from fmjax.evals import knn as knn_lib
from fmjax.evals import linear_probe as probe_lib
from fmjax.train.state import mesh_context

EVAL_TYPES = ("knn", "linear_probe", "loss", "metrics", "images")


class Subset:
    """The first ``n`` examples of a random-access source (picklable)."""

    def __init__(self, source, n: int | None):
        self.source, self.n = source, len(source) if not n else min(int(n), len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i]


class Evaluator:
    def __init__(self, config, objective, mesh, rules):
        self.config, self.objective, self.mesh, self.rules = config, objective, mesh, rules
        self.transform = transforms.parse(config.data.pp_eval)
        self._sources = {}
        self._features_fn = jax.jit(objective.features)
        self._loss_fn = jax.jit(lambda p, e, b, r, s: objective.loss(p, e, b, r, s)[0])
        self._eval_metrics_fn = jax.jit(objective.eval_metrics) if hasattr(objective, "eval_metrics") else None
        for name, ev in config.evals.items():
            if ev.get("type") == "metrics" and self._eval_metrics_fn is None:
                raise ValueError(f"config.evals.{name}: objective {config.objective.name!r} has no eval_metrics.")
            if ev.get("type") not in EVAL_TYPES:
                raise ValueError(f"config.evals.{name}.type={ev.get('type')!r}; valid: {list(EVAL_TYPES)}.")

    def due(self, step: int, total_steps: int) -> list[str]:
        out = []
        for name, ev in self.config.evals.items():
            every = ev.get("every", self.config.eval_every)
            if every and (step % every == 0 or step == total_steps):
                out.append(name)
        return out

    # -- data -------------------------------------------------------------------------------
    def _source(self, split: str, n: int | None):
        key = (split, n)
        if key not in self._sources:
            src = sources.get_source(self.config.data.name, split, self.config.data.get("data_dir"))
            self._sources[key] = Subset(src, n)
        return self._sources[key]

    def _batches(self, split: str, n: int | None, batch_size: int):
        it = pipeline.make_eval_iterator(self._source(split, n), global_batch_size=batch_size,
                                         transform=self.transform)
        for local in it:
            valid = np.asarray(local.pop("_valid"))
            arrays = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
                      for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
            yield pipeline.global_batch(arrays, self.mesh), valid

    def _features(self, params, extra, split, n, batch_size):
        feats, labels = [], []
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            for batch, valid in self._batches(split, n, batch_size):
                f = self._features_fn(params, extra, batch["image"])
                f = multihost_utils.process_allgather(f, tiled=True)
                lab = multihost_utils.process_allgather(batch["label"], tiled=True)
                v = multihost_utils.process_allgather(valid, tiled=True) if jax.process_count() > 1 else valid
                feats.append(np.asarray(f)[v]), labels.append(np.asarray(lab)[v])
        return np.concatenate(feats).astype(np.float32), np.concatenate(labels)

    # -- evaluators -------------------------------------------------------------------------
    def run(self, names, state, writer, step: int) -> dict:
        metrics = {}
        for name in names:
            ev = self.config.evals[name]
            kind = ev["type"]
            bs = ev.get("batch_size", self.config.batch_size)
            if kind in ("knn", "linear_probe"):
                tr = self._features(state.params, state.extra, ev.get("train_split", "train"),
                                    ev.get("train_examples"), bs)
                te = self._features(state.params, state.extra, ev.get("split", "validation"),
                                    ev.get("examples"), bs)
                num_classes = int(max(tr[1].max(), te[1].max()) + 1)
                if kind == "knn":
                    res = knn_lib.knn_classify(tr[0], tr[1], te[0], te[1], num_classes,
                                               k=ev.get("k", 20), temperature=ev.get("temperature", 0.07))
                else:
                    kw = {k: ev[k] for k in ("steps", "lr", "weight_decay") if k in ev}
                    res = probe_lib.linear_probe(tr[0], tr[1], te[0], te[1], num_classes, **kw)
                metrics.update({f"eval/{name}_{k}": v for k, v in res.items()})
            elif kind == "loss":
                metrics[f"eval/{name}"] = self._loss(state, ev, bs)
            elif kind == "metrics":
                metrics.update({f"eval/{name}_{k}": v for k, v in self._metrics(state, ev, bs).items()})
            elif kind == "images":
                self._images(state, ev, bs, writer, step, name)
        return metrics

    def _loss(self, state, ev, bs) -> float:
        total, count = 0.0, 0
        rng = jax.random.PRNGKey(ev.get("seed", 1234))
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            for i, (batch, valid) in enumerate(self._batches(ev.get("split", "validation"), ev.get("examples"), bs)):
                if not valid.all():  # padded tail batch: a mean loss over it would be biased
                    continue
                loss = self._loss_fn(state.params, state.extra, batch, jax.random.fold_in(rng, i), state.step)
                total, count = total + float(loss), count + 1
        return total / max(count, 1)

    def _metrics(self, state, ev, bs) -> dict:
        """Averages the objective's per-example ``eval_metrics`` over a split (padding excluded)."""
        fn = self._eval_metrics_fn
        sums, count = {}, 0
        rng = jax.random.PRNGKey(ev.get("seed", 1234))
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            for i, (batch, valid) in enumerate(self._batches(ev.get("split", "validation"), ev.get("examples"), bs)):
                values = fn(state.params, state.extra, batch, jax.random.fold_in(rng, i))
                if jax.process_count() > 1:
                    values = multihost_utils.process_allgather(values, tiled=True)
                    valid = multihost_utils.process_allgather(valid, tiled=True)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(np.asarray(v)[valid].sum())
                count += int(valid.sum())
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _images(self, state, ev, bs, writer, step, name):
        if not hasattr(self.objective, "visualize"):
            return
        batch, _ = next(self._batches(ev.get("split", "validation"), ev.get("examples", bs), bs))
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            pics = self.objective.visualize(state.params, state.extra, batch, jax.random.PRNGKey(ev.get("seed", 0)))
        for pic_name, pic in pics.items():
            writer.write_image(step, f"{name}_{pic_name}", np.asarray(pic))
