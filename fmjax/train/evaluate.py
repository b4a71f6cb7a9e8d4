"""Evaluators configured as data: ``config.evals = {name: {type: ..., every: ..., ...}}``.

Types: ``knn`` and ``linear_probe`` on frozen ``objective.features``; ``loss`` (the
objective's loss on a held-out split with a fixed rng); ``images`` (the objective's
``visualize`` pictures, written to ``DIR/images/`` and TensorBoard); ``generation`` (a
classifier trained with the ``supervised`` objective in ``classifier_workdir`` scores
``samples_per_class`` class-conditional samples per class: ``eval/<name>_accuracy``, per
class ``eval/<name>_accuracy_<class>``, and ``eval/<name>_classifier_real_accuracy`` on real
images of ``split``). Runs identically on every process; features are gathered so every
process sees the whole split.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.data import pipeline, sources
from fmjax.evals import generation as gen_lib
from fmjax.evals import knn as knn_lib
from fmjax.evals import linear_probe as probe_lib
from fmjax.evals import retrieval as retrieval_lib
from fmjax.evals import zero_shot as zero_shot_lib
from fmjax.errors import NonFiniteError
from fmjax.data.transforms import parse_pp  # noqa: F401  (re-exported)
from fmjax.train.restore import load_classifier
from fmjax.train.state import mesh_context
from fmjax.train.validate import ConfigError

EVAL_TYPES = ("knn", "linear_probe", "loss", "metrics", "images", "zero_shot", "retrieval",
              "generation")


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
        self.transform = parse_pp(config.data.pp_eval, "config.data.pp_eval")
        self._sources = {}
        self._features_fn = jax.jit(objective.features)
        self._text_fn = jax.jit(objective.text_features) if hasattr(objective, "text_features") else None
        self._loss_fn = jax.jit(lambda p, e, b, r, s: objective.loss(p, e, b, r, s)[0])
        self._eval_metrics_fn = jax.jit(objective.eval_metrics) if hasattr(objective, "eval_metrics") else None
        for name, ev in config.evals.items():
            if ev.get("type") in ("zero_shot", "retrieval") and self._text_fn is None:
                raise ConfigError(f"config.evals.{name}: objective {config.objective.name!r} has no text tower.")
            if ev.get("type") == "metrics" and self._eval_metrics_fn is None:
                raise ConfigError(f"config.evals.{name}: objective {config.objective.name!r} has no eval_metrics.")
            if ev.get("type") not in EVAL_TYPES:
                raise ConfigError(f"config.evals.{name}.type={ev.get('type')!r}; valid: {list(EVAL_TYPES)}.")
            if ev.get("type") == "generation":
                self._check_generation(name, ev)
        self._classifiers, self._generators, self._real_accuracy = {}, {}, {}
        self._step = 0

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
            src = sources.get_source(self.config.data.name, split, self.config.data.get("data_dir"),
                                     skip_bad_examples=self.config.data.get("skip_bad_examples", 0))
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

    def _features(self, params, extra, split, n, batch_size, with_text: bool = False):
        """(image features, labels[, text features]) over a split, padding removed."""
        feats, labels, texts = [], [], []
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            for batch, valid in self._batches(split, n, batch_size):
                v = gather(valid) if jax.process_count() > 1 else valid
                feats.append(gather(self._features_fn(params, extra, batch["image"]))[v])
                labels.append(gather(batch["label"])[v])
                if with_text:
                    texts.append(gather(self._text_fn(params, extra, batch["tokens"]))[v])
        out = (np.concatenate(feats).astype(np.float32), np.concatenate(labels))
        out = out + (np.concatenate(texts).astype(np.float32),) if with_text else out
        for name, x in (("image features", out[0]), ("text features", out[-1] if with_text else out[0])):
            if not np.isfinite(x).all():
                raise NonFiniteError(f"the model's {name} on {split} are not finite at step "
                                     f"{int(jax.device_get(self._step))}: the weights hold NaN/inf; "
                                     "evaluate an earlier checkpoint (--step=N).")
        return out

    def _embed_prompts(self, params, extra, prompts, batch_size: int = 256):
        """Text embeddings of prompt strings (same on every process: replicated inputs)."""
        from fmjax.data.transforms import tokenize
        tok = tokenize(**dict(self.config.data.get("tokenize", {})))
        ids = tok.tokenizer(list(prompts), tok.context_length)
        out = []
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            for i in range(0, len(ids), batch_size):
                out.append(np.asarray(self._text_fn(params, extra, ids[i:i + batch_size])))
        return np.concatenate(out)

    # -- evaluators -------------------------------------------------------------------------
    def run(self, names, state, writer, step: int) -> dict:
        metrics = {}
        self._step = step
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
            elif kind == "zero_shot":
                split = ev.get("split", "validation")
                img, lab = self._features(state.params, state.extra, split, ev.get("examples"), bs)
                names = list(ev.get("class_names") or sources.class_names(
                    self.config.data.name, self.config.data.get("data_dir")))
                templates = list(ev.get("templates") or ["a photo of a {}."])
                w = zero_shot_lib.classifier_weights(
                    lambda p: self._embed_prompts(state.params, state.extra, p), names, templates)
                res = zero_shot_lib.zero_shot_accuracy(img, lab, w)
                metrics.update({f"eval/{name}_{k}": v for k, v in res.items()})
            elif kind == "retrieval":
                img, _, txt = self._features(state.params, state.extra, ev.get("split", "validation"),
                                             ev.get("examples"), bs, with_text=True)
                res = retrieval_lib.retrieval_recall(img, txt)
                metrics.update({f"eval/{name}_{k}": v for k, v in res.items()})
            elif kind == "loss":
                metrics[f"eval/{name}"] = self._loss(state, ev, bs)
            elif kind == "metrics":
                metrics.update({f"eval/{name}_{k}": v for k, v in self._metrics(state, ev, bs).items()})
            elif kind == "images":
                self._images(state, ev, bs, writer, step, name)
            elif kind == "generation":
                metrics.update({f"eval/{name}_{k}": v for k, v in self._generation(state, ev, bs, name).items()})
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

    # -- generation -------------------------------------------------------------------------
    def _check_generation(self, name, ev):
        """One-line errors before training: a class-conditional generator and a matching classifier."""
        obj = self.objective
        if not hasattr(obj, "generate") or getattr(obj, "conditioning", None) != "class":
            raise ConfigError(f"config.evals.{name}: type 'generation' needs a class-conditional "
                              f"diffusion objective, got {self.config.objective.name!r} "
                              f"(conditioning {getattr(obj, 'conditioning', None)!r}).")
        if not ev.get("classifier_workdir"):
            raise ConfigError(f"config.evals.{name}: type 'generation' needs classifier_workdir=DIR "
                              "(a workdir trained with configs/supervised.py).")
        try:
            gen_lib.check_classifier_workdir(ev["classifier_workdir"], obj.num_classes)
            gen_lib.check_sampler(gen_lib.sampler_overrides(ev), obj.schedule.num_timesteps)
        except ValueError as e:
            raise ConfigError(f"config.evals.{name}: {e}") from None

    def _classifier(self, workdir, image_shape):
        """The classifier of ``workdir``, restored once onto this evaluator's devices."""
        key = os.path.abspath(os.path.expanduser(workdir))
        if key not in self._classifiers:
            self._classifiers[key] = load_classifier(key, self.objective.num_classes, image_shape,
                                                     devices=list(self.mesh.devices.flat))[0]
        return self._classifiers[key]

    def _generation(self, state, ev, bs, name) -> dict:
        """Classifier accuracy on ``samples_per_class`` EMA samples per class, and on real images."""
        if name not in self._generators:
            self._generators[name] = gen_lib.Generator(self.objective, self.mesh, self.rules, bs,
                                                       **gen_lib.sampler_overrides(ev))
        generator = self._generators[name]
        classifier = self._classifier(ev["classifier_workdir"], generator.image_shape)
        num_classes = self.objective.num_classes
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), int(ev.get("samples_per_class", 8)))
        images = generator(state.params, state.extra, {"label": labels}, seed=ev.get("seed", 0),
                           step=int(jax.device_get(state.step)))
        pred = classifier.classify(images, labels)
        try:
            names = sources.class_names(self.config.data.name, self.config.data.get("data_dir"))
        except Exception:  # noqa: BLE001 - names only label the per-class metrics
            names = None
        out = gen_lib.accuracy_metrics(pred, labels, num_classes, names,
                                       per_class=ev.get("per_class", num_classes <= 100))
        split = ev.get("split", "validation")
        key = (os.path.abspath(os.path.expanduser(ev["classifier_workdir"])), split, ev.get("examples"))
        if key not in self._real_accuracy:
            self._real_accuracy[key] = classifier.accuracy(self._source(split, ev.get("examples")))
        out["classifier_real_accuracy"] = self._real_accuracy[key]
        return out
