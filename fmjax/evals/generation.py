"""Conditional-generation quality: sharded sampling and a classifier that scores the samples.

The project's conditional-generation metric (issue "Diffusion"): a classifier trained with
the ``supervised`` objective on real images classifies class-conditional samples; the
fraction classified as their conditioning label is the metric, reported beside the
classifier's accuracy on real images of the same split (the most the metric can reach).

``Generator`` draws samples from any objective with ``generate(params, extra, cond_batch,
rng, shape=None, use_ema=True, **overrides)`` (samples in [-1, 1]) with the batch dimension
sharded over the mesh's data-parallel axes; ``Classifier`` runs an objective with
``predict(params, extra, images) -> logits`` on its own mesh, feeding generated uint8
pictures through the classifier's own ``pp_eval`` transform. Both enter their mesh and
logical-axis rules themselves; on several processes every process gets the whole result.
"""
from __future__ import annotations

import inspect
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.data import pipeline, transforms
from fmjax.diffusion import process
from fmjax.diffusion import sampling
from fmjax.errors import ConfigError, NonFiniteError
from fmjax.evals import common, registry
from fmjax.parallel import mesh as mesh_lib
from fmjax.objectives.base import supports

# Keys of sampling.sample a caller may override (sampler, num_steps, eta, guidance_scale, ...).
SAMPLER_KEYS = tuple(k for k in inspect.signature(sampling.sample).parameters
                     if k not in ("model_fn", "schedule", "shape", "rng", "uncond_fn", "x_T", "sharding"))


# The settings of an autoregressive sampler (fmjax.models.generate; DALL-E).
AR_KEYS = ("temperature", "top_k", "top_p", "guidance_scale")


def _check_guidance(settings, prefix: str = "") -> None:
    """A classifier-free guidance scale (diffusion's or an autoregressive sampler's) is finite."""
    if settings.get("guidance_scale") is not None:
        g = _number(prefix + "guidance_scale", settings["guidance_scale"])
        if not np.isfinite(g):
            raise ValueError(f"{prefix}guidance_scale={g}; it must be a finite number "
                             "(1: no guidance; e.g. 2.0 for classifier-free guidance).")


def check_ar_sampler(settings, prefix: str = "") -> None:
    """ValueError naming the bad autoregressive sampler setting (``prefix`` + its name):
    temperature (a finite number > 0), top_k (an integer >= 0), top_p (in (0, 1]) or
    guidance_scale (finite)."""
    t, k, p = (settings.get(key) for key in ("temperature", "top_k", "top_p"))
    _check_guidance(settings, prefix)
    if t is not None and not (np.isfinite(_number(prefix + "temperature", t)) and float(t) > 0):
        raise ValueError(f"{prefix}temperature={t}; it must be a finite number > 0 (1: the model's distribution).")
    if k is not None and (not float(_number(prefix + "top_k", k)).is_integer() or int(k) < 0):
        raise ValueError(f"{prefix}top_k={k}; it must be an integer >= 0 (0: no limit).")
    if p is not None and not 0.0 < _number(prefix + "top_p", p) <= 1.0:
        raise ValueError(f"{prefix}top_p={p}; it must be in (0, 1] (1: no limit).")


def sampler_overrides(settings) -> dict:
    """The sampler settings among ``settings`` (e.g. an eval config), None values dropped."""
    return {k: settings[k] for k in SAMPLER_KEYS if k in settings and settings[k] is not None}


def _number(key, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}; it must be a number.") from None


def check_sampler(settings: dict, num_timesteps: int) -> None:
    """ValueError naming the bad sampler setting, before anything is compiled: unknown
    names, a non-finite guidance_scale / eta / clip_sample_range, a negative eta, and
    num_steps outside 1 .. ``num_timesteps`` (the model's train timesteps)."""
    for key, valid in (("sampler", process.SAMPLERS), ("spacing", process.SPACINGS),
                       ("variance_type", process.VARIANCE_TYPES),
                       ("prediction_type", process.PREDICTION_TYPES)):
        if key in settings and settings[key] not in valid:
            raise ValueError(f"{key}={settings[key]!r}; valid: {list(valid)}.")
    _check_guidance(settings)
    if settings.get("eta") is not None:
        eta = _number("eta", settings["eta"])
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta={eta}; it must be a finite number >= 0 (0: deterministic DDIM, "
                             "1: DDPM-like step noise).")
    if settings.get("clip_sample_range") is not None:
        r = _number("clip_sample_range", settings["clip_sample_range"])
        if not (np.isfinite(r) and r > 0):
            raise ValueError(f"clip_sample_range={r}; it must be a finite number > 0 (1 for images "
                             "in [-1, 1]).")
    n = settings.get("num_steps")
    if n is not None:
        try:
            ok = int(n) == float(n) and 1 <= int(n) <= num_timesteps
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"num_steps={n}; valid: 1 .. num_timesteps={num_timesteps} "
                             "(the model's train timesteps).")


def to_uint8(x) -> np.ndarray:
    """Samples in [-1, 1] (clipped) -> uint8 pixels."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


scope = common.scope  # the ambient mesh and logical-axis rules of a sharded model


def padded_batch_size(batch_size: int, mesh) -> int:
    """``batch_size`` (at least 1) rounded up to a multiple of the mesh's data-parallel size."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size}; it must be at least 1.")
    dp = mesh_lib.batch_parallelism(mesh)
    return max(dp, -(-int(batch_size) // dp) * dp)


def _put(host: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds whole -> a global array with ``sharding``."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _fetch(x) -> np.ndarray:
    """A global array -> the whole value as numpy on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _chunk(host: np.ndarray, start: int, size: int) -> np.ndarray:
    """host[start:start + size], padded to ``size`` with copies of its first row."""
    part = host[start:start + size]
    if len(part) < size:
        part = np.concatenate([part, np.repeat(host[:1], size - len(part), axis=0)])
    return part


def map_batches(fn, host: np.ndarray, batch_size: int, sharding, mesh, rules) -> np.ndarray:
    """``fn`` (jitted, one global batch -> a batch-sharded result) over a host array [N, ...]
    that every process holds whole, in padded chunks of ``batch_size`` split by ``sharding``;
    the results concatenated on the host and cut to N."""
    out = []
    with scope(mesh, rules):
        for start in range(0, len(host), batch_size):
            out.append(_fetch(fn(_put(_chunk(host, start, batch_size), sharding))))
    return np.concatenate(out)[:len(host)]


class Generator:
    """Sharded sampling from an objective's ``generate`` in fixed-size global batches.

    The batch (``batch_size`` rounded up to a multiple of the data-parallel size) is split
    over the mesh's data axes; each sample's x_T comes from ``fold_in(key, index)``, so with a
    deterministic sampler (DDIM, eta 0) sample i depends on (seed, i, condition) only, not on
    the batch size or the device count. Stochastic samplers draw step noise per batch
    (``fold_in(key', batch index)``): reproducible for the same seed and batch size.
    """

    def __init__(self, objective, mesh, rules, batch_size: int, use_ema: bool = True, **overrides):
        if not supports(objective, "generate"):
            raise ValueError(f"objective {objective.config.objective.name!r} cannot generate images.")
        self.objective, self.mesh, self.rules = objective, mesh, rules
        self.batch_size = padded_batch_size(batch_size, mesh)
        self.sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
        self.overrides, self.use_ema = dict(overrides), use_ema
        if getattr(objective, "conditioning", None) == "none":
            self.overrides["guidance_scale"] = 1.0  # nothing to guide by (and no null branch)
        cfg = objective.config
        self.image_shape = (int(cfg.data.image_size), int(cfg.data.image_size),
                            int(cfg.model.get("in_channels", 3)))
        shape = (self.batch_size,) + self.image_shape

        def sample(params, extra, cond, index, rng):
            x_rng, step_rng = jax.random.split(rng)
            x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(x_rng, i), shape[1:]))(index)
            x_T = jax.lax.with_sharding_constraint(x_T, self.sharding)
            return objective.generate(params, extra, cond, jax.random.fold_in(step_rng, index[0]),
                                      shape=shape, use_ema=use_ema, x_T=x_T, sharding=self.sharding,
                                      **self.overrides)

        self._sample = jax.jit(sample, out_shardings=self.sharding)

    def __call__(self, params, extra, cond: dict | None = None, num: int | None = None,
                 seed: int = 0, step: int | None = None) -> np.ndarray:
        """uint8 samples [num, H, W, C] for host condition arrays ``cond`` ({'label': [n]} or
        {'tokens': [n, L]}; None or {} with ``num`` for unconditional sampling).

        A NaN or infinite sample raises ``NonFiniteError`` (naming the checkpoint ``step``
        when given) as soon as its batch is fetched, never grey pixels."""
        cond = {k: np.asarray(v) for k, v in (cond or {}).items()}
        if num is None:
            if not cond:
                raise ValueError("Generator: give conditions or num.")
            num = len(next(iter(cond.values())))
        rng = jax.random.PRNGKey(seed)
        out = []
        with scope(self.mesh, self.rules):
            for start in range(0, num, self.batch_size):
                index = np.arange(start, start + self.batch_size, dtype=np.int32)
                c = {k: _put(_chunk(v, start, self.batch_size), self.sharding) for k, v in cond.items()}
                x = _fetch(self._sample(params, extra, c, _put(index, self.sharding), rng))
                self._check_finite(x[:num - start], start, num, step)
                out.append(to_uint8(x))
        return np.concatenate(out)[:num]

    def _check_finite(self, x: np.ndarray, start: int, num: int, step) -> None:
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if finite.all():
            return
        at = "" if step is None else f" at step {int(step)}"
        raise NonFiniteError(
            f"{int((~finite).sum())} of {len(x)} samples (#{start}..{start + len(x) - 1} of {num}) "
            f"are NaN or infinite{at}: the model's {'EMA ' if self.use_ema else ''}params or the "
            f"sampler settings {self.overrides} give non-finite values; use an earlier checkpoint, "
            "or a smaller guidance_scale.")


class Classifier:
    """A trained classifier (an objective with ``predict``) scoring uint8 images.

    Images go through ``pp_eval`` (the classifier config's eval transform, so their
    normalisation matches what it was trained on), then ``predict`` on its own mesh.
    """

    def __init__(self, objective, mesh, rules, params, extra, pp_eval: str, batch_size: int,
                 num_classes: int):
        if not supports(objective, "predict"):
            raise ValueError(f"objective {objective.config.objective.name!r} has no predict(); "
                             "train the classifier with the 'supervised' objective.")
        self.objective, self.mesh, self.rules = objective, mesh, rules
        self.params, self.extra = params, extra
        self.transform = transforms.parse(pp_eval)
        self.batch_size = padded_batch_size(batch_size, mesh)
        self.sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
        self.num_classes = int(num_classes)
        self._predict = jax.jit(lambda p, e, x: objective.predict(p, e, x).argmax(-1),
                                out_shardings=self.sharding)

    def preprocess(self, images: np.ndarray, labels=None) -> np.ndarray:
        """uint8 [N, H, W, C] -> the model's input, through the eval transform."""
        labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels)
        rng = np.random.default_rng(0)
        return np.stack([np.asarray(self.transform({"image": img, "label": y}, rng)["image"])
                         for img, y in zip(images, labels)])

    def classify(self, images: np.ndarray, labels=None) -> np.ndarray:
        """Predicted labels [N] of uint8 images [N, H, W, C]."""
        return map_batches(lambda x: self._predict(self.params, self.extra, x),
                           self.preprocess(images, labels), self.batch_size, self.sharding,
                           self.mesh, self.rules)

    def accuracy(self, source) -> float:
        """Top-1 accuracy on a labelled random-access source of raw examples (padding excluded)."""
        it = pipeline.make_eval_iterator(source, global_batch_size=self.batch_size,
                                         transform=self.transform)
        correct = count = 0
        with scope(self.mesh, self.rules):
            for local in it:
                valid = np.asarray(local["_valid"])
                arrays = {k: np.asarray(local[k]) for k in ("image", "label")}
                arrays["label"] = arrays["label"].astype(np.int32)
                batch = pipeline.global_batch(arrays, self.mesh)
                pred = _fetch(self._predict(self.params, self.extra, batch["image"]))
                labels = _fetch(batch["label"])
                if jax.process_count() > 1:
                    valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True))
                correct += int(((pred == labels) & valid).sum())
                count += int(valid.sum())
        return correct / max(count, 1)


def check_classifier_workdir(workdir: str, num_classes: int) -> dict:
    """The classifier workdir's saved config (a dict); ValueError if it is missing or its
    number of classes differs from ``num_classes`` (the generator's)."""
    config = _classifier_config(workdir)
    theirs = int((config.get("model") or {}).get("num_classes") or 0)
    if theirs != int(num_classes):
        raise ValueError(
            f"classifier_workdir {os.path.abspath(workdir)} classifies {theirs} classes but the "
            f"diffusion model generates {num_classes}; train the classifier on the same dataset.")
    return config


def _classifier_config(workdir: str) -> dict:
    """The classifier workdir's saved config.json; FileNotFoundError naming the fix."""
    from etils import epath
    if "://" not in str(workdir):
        workdir = os.path.abspath(os.path.expanduser(workdir))
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"classifier_workdir {workdir} has no config.json: train a classifier "
            "first (python launch/train.py --config=configs/supervised.py --workdir=DIR).")
    return json.loads(path.read_text())


def _num_classes(objective, ev) -> int:
    """The classes sampled: a class-conditional objective's own; for a text-conditional one,
    the classifier's (``classifier_workdir``'s saved ``model.num_classes``)."""
    if getattr(objective, "conditioning", None) != "text":
        return int(objective.num_classes)
    return int((_classifier_config(ev["classifier_workdir"]).get("model") or {}).get("num_classes") or 0)


def accuracy_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int,
                     class_names=None, per_class: bool = True) -> dict:
    """{'accuracy': fraction of ``pred == labels``, 'accuracy_<class>': per conditioning class}."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    out = {"accuracy": float((pred == labels).mean())}
    if per_class:
        for c in range(num_classes):
            sel = labels == c
            if sel.any():
                out[f"accuracy_{class_key(c, class_names)}"] = float((pred[sel] == c).mean())
    return out


def class_key(c: int, class_names=None) -> str:
    """A metric-name-safe name of class ``c`` ('circle', or 'class3' without names)."""
    if class_names and c < len(class_names):
        name = "".join(ch if ch.isalnum() else "_" for ch in str(class_names[c]).lower()).strip("_")
        if name:
            return name
    return f"class{c}"


@registry.register("generation")
class GenerationEvaluator(common.Evaluator):
    """``eval/<name>_accuracy``: a classifier trained with the ``supervised`` objective in
    ``classifier_workdir`` scores ``samples_per_class`` (default 8) class-conditional EMA
    samples per class (seed ``seed``, default 0; sampler settings among ``SAMPLER_KEYS``);
    per class ``eval/<name>_accuracy_<class>`` (``per_class``, default with <= 100 classes),
    and ``eval/<name>_classifier_real_accuracy`` on real images of ``split`` (``examples``).

    A text-conditional objective (``conditioning='text'``: text-to-image diffusion, DALL-E) is
    prompted with class names instead: ``prompt`` (default ``'a photo of a {}.'``) filled with
    each of the dataset's class names, tokenized by ``config.data.tokenize``; the classifier's
    classes are the dataset's. A generator with an image tokenizer (``reconstruct``: DALL-E)
    also logs ``eval/<name>_classifier_recon_accuracy``: the classifier on real images passed
    through that tokenizer (up to 512), the ceiling of its samples. ``temperature`` / ``top_k`` / ``top_p`` / ``guidance_scale``
    reach an autoregressive sampler (DALL-E)."""

    fields = tuple(dict.fromkeys(("classifier_workdir", "samples_per_class", "seed", "per_class", "prompt")
                                 + AR_KEYS + SAMPLER_KEYS))
    random_init = False
    sharded_batches = False  # the generator rounds batch_size up to the data-parallel size

    @classmethod
    def check_options(cls, where, ev, config, objective):
        """A class-conditional generator and a matching classifier, before training."""
        conditioning = getattr(objective, "conditioning", None)
        if not supports(objective, "generate") or conditioning not in ("class", "text"):
            raise ConfigError(f"{where}: type 'generation' needs a class- or text-conditional "
                              f"generator, got {config.objective.name!r} "
                              f"(conditioning {conditioning!r}).")
        if not ev.get("classifier_workdir"):
            raise ConfigError(f"{where}: type 'generation' needs classifier_workdir=DIR "
                              "(a workdir trained with configs/supervised.py).")
        if ev.get("samples_per_class") is not None:
            common.check_int(where, "samples_per_class", ev["samples_per_class"], 1)
        prompt = ev.get("prompt", None)
        if prompt is not None and (conditioning != "text" or str(prompt).count("{}") != 1):
            raise ConfigError(f"{where}: prompt={prompt!r} needs a text-conditional generator and "
                              "exactly one '{}' for the class name (e.g. 'a photo of a {}.').")
        try:
            if hasattr(objective, "schedule"):
                check_sampler(sampler_overrides(ev), objective.schedule.num_timesteps)
            else:  # an autoregressive sampler (DALL-E)
                check_ar_sampler({k: ev[k] for k in AR_KEYS if ev.get(k) is not None})
            check_classifier_workdir(ev["classifier_workdir"], _num_classes(objective, ev))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def __init__(self, name, ev, ctx):
        super().__init__(name, ev, ctx)
        self._generator = None

    def _classifier(self, image_shape):
        """The classifier of ``classifier_workdir``, restored once per run onto the mesh's devices."""
        key = ("classifier", os.path.abspath(os.path.expanduser(self.ev["classifier_workdir"])))
        if key not in self.ctx.cache:
            if self.ctx.load_classifier is None:
                raise ConfigError(f"{self.where}: this run cannot restore classifiers "
                                  "(no load_classifier in the eval context).")
            self.ctx.cache[key] = self.ctx.load_classifier(
                key[1], _num_classes(self.ctx.objective, self.ev), image_shape,
                devices=list(self.ctx.mesh.devices.flat))[0]
        return self.ctx.cache[key]

    def run(self, state, step, writer):
        """Classifier accuracy on ``samples_per_class`` EMA samples per class, and on real images."""
        ctx, ev = self.ctx, self.ev
        if self._generator is None:
            overrides = sampler_overrides(ev)
            if not hasattr(ctx.objective, "schedule"):  # an autoregressive sampler (DALL-E)
                overrides = {k: ev[k] for k in AR_KEYS if ev.get(k) is not None}
            self._generator = Generator(ctx.objective, ctx.mesh, ctx.rules, self.batch_size, **overrides)
        generator = self._generator
        classifier = self._classifier(generator.image_shape)
        num_classes = _num_classes(ctx.objective, ev)
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), int(ev.get("samples_per_class", 8)))
        try:
            names = self.class_names()
        except Exception:  # noqa: BLE001 - names only label the per-class metrics
            names = None
        if getattr(ctx.objective, "conditioning", None) == "text":
            if not names or len(names) < num_classes:
                raise ConfigError(f"{self.where}: a text-conditional generator is prompted with class "
                                  f"names, and dataset {self.dataset!r} has none for {num_classes} classes.")
            from fmjax.data.text_ops import tokenize_texts
            texts = [str(ev.get("prompt", None) or "a photo of a {}.").format(n) for n in names[:num_classes]]
            cond = {"tokens": tokenize_texts(ctx.config, texts)[labels]}
        else:
            cond = {"label": labels}
        images = generator(state.params, state.extra, cond, seed=ev.get("seed", 0),
                           step=int(jax.device_get(state.step)))
        pred = classifier.classify(images, labels)
        out = accuracy_metrics(pred, labels, num_classes, names,
                               per_class=ev.get("per_class", num_classes <= 100))
        key = ("real_accuracy", os.path.abspath(os.path.expanduser(ev["classifier_workdir"])),
               self.dataset, self.split, self.examples)
        if key not in ctx.cache:
            ctx.cache[key] = classifier.accuracy(self.source())
        out["classifier_real_accuracy"] = ctx.cache[key]
        if supports(ctx.objective, "reconstruct"):
            out["classifier_recon_accuracy"] = self._recon_accuracy(state, classifier, generator)
        return out

    def _recon_accuracy(self, state, classifier, generator, limit: int = 512) -> float:
        """The classifier's accuracy on real images of ``split`` passed through the generator's
        own image tokenizer (``objective.reconstruct``; DALL-E's dVAE): the most its samples
        can score. Images of another size than the model's are skipped (NaN)."""
        src = self.source()
        n = min(len(src), limit)
        examples = [src[i] for i in range(n)]
        images = np.stack([np.asarray(e["image"]) for e in examples])
        labels = np.asarray([int(e["label"]) for e in examples])
        if images.shape[1:] != tuple(generator.image_shape):
            return float("nan")
        if getattr(self, "_recon_fn", None) is None:
            self._recon_fn = jax.jit(lambda p, e, x: self.ctx.objective.reconstruct(p, e, x),
                                     out_shardings=generator.sharding)
        rec = map_batches(lambda x: self._recon_fn(state.params, state.extra, x),
                          images.astype(np.float32) / 255.0, generator.batch_size,
                          generator.sharding, self.ctx.mesh, self.ctx.rules)
        rec8 = np.round(np.clip(np.nan_to_num(rec), 0.0, 1.0) * 255.0).astype(np.uint8)
        return float((classifier.classify(rec8, labels) == labels).mean())
