"""Zero-shot classification with prompt ensembles (CLIP-style), on precomputed embeddings.

``classifier_weights`` averages the L2-normalised text embeddings of every
(template x class name) prompt per class and re-normalises, as in CLIP's ImageNet
zero-shot notebook; ``zero_shot_accuracy`` scores L2-normalised image embeddings
against those weights.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fmjax.data import sources
from fmjax.errors import ConfigError
from fmjax.evals import common, registry


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: class 0 with every template, then class 1, ..."""
    return [t.format(c) for c in class_names for t in templates]


def classifier_weights(embed_texts: Callable[[list[str]], np.ndarray],
                       class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, D] zero-shot classifier from ``embed_texts(list of prompts) -> [N, D]``."""
    emb = _normalize(np.asarray(embed_texts(prompts(class_names, templates)), np.float32))
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return _normalize(emb)


def zero_shot_accuracy(image_embeds: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    logits = _normalize(np.asarray(image_embeds, np.float32)) @ weights.T
    order = np.argsort(-logits, axis=1)
    labels = np.asarray(labels)
    return {f"top{k}": float((order[:, :min(k, weights.shape[0])] == labels[:, None]).any(1).mean())
            for k in ks}


DEFAULT_TEMPLATES = ("a photo of a {}.",)


@registry.register("zero_shot")
class ZeroShotEvaluator(common.Evaluator):
    """``eval/<name>_top1`` / ``_top5``: the ``split`` images against text classifiers made
    from the class names (``class_names``, a list, or ``classnames_file``, one name a line;
    default: the dataset's own names) x prompt templates (``templates``, a list, or
    ``templates_file``, one template a line; each holds ``{}``; default
    ``["a photo of a {}."]``), through the objective's ``text_features``."""

    fields = ("class_names", "classnames_file", "templates", "templates_file")
    requires = {"text_features": "text tower"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        for a, b in (("class_names", "classnames_file"), ("templates", "templates_file")):
            if ev.get(a) and ev.get(b):
                raise ConfigError(f"{where}: give {a} or {b}, not both.")
        for key in ("classnames_file", "templates_file"):
            if ev.get(key) is not None:
                common.check_str(where, key, ev[key])
        for key in ("class_names", "templates"):
            value = ev.get(key)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{where}.{key}={value!r}; it must be a list of strings.")
        _check_templates(where + ".templates", ev.get("templates") or ())

    @classmethod
    def check_data(cls, name, ev, config):
        super().check_data(name, ev, config)
        where = f"config.evals.{name}"
        if ev.get("templates_file"):
            _check_templates(f"{where}.templates_file", _read(ev, "templates_file", where))
        names = _read(ev, "classnames_file", where) if ev.get("classnames_file") else ev.get("class_names")
        if names:
            known = sources.num_classes(ev.get("dataset") or config.data.name,
                                        ev.get("data_dir") or config.data.get("data_dir"))
            if known and len(names) != known:
                raise ConfigError(f"{where}: {len(names)} class names for a dataset of {known} classes; "
                                  "give one name per class, in label order.")

    def run(self, state, step, writer):
        feats, labels = self.features(state)
        names = self.names()
        templates = list(self.templates())
        w = classifier_weights(lambda p: self.ctx.embed_prompts(state.params, state.extra, p),
                               names, templates)
        return zero_shot_accuracy(feats, labels, w)

    def names(self) -> list[str]:
        if self.ev.get("classnames_file"):
            return _read(self.ev, "classnames_file", self.where)
        names = self.ev.get("class_names") or self.class_names()
        if not names:
            raise ConfigError(f"{self.where}: dataset {self.dataset!r} has no class names; give "
                              "class_names=[...] or classnames_file=PATH (one name a line).")
        return list(names)

    def templates(self) -> list[str]:
        if self.ev.get("templates_file"):
            return _read(self.ev, "templates_file", self.where)
        return list(self.ev.get("templates") or DEFAULT_TEMPLATES)


def _read(ev, key, where) -> list[str]:
    return common.read_lines(ev[key], f"{where}.{key}")


def _check_templates(where, templates) -> None:
    for i, t in enumerate(templates):
        try:
            ok = "\0" in t.format("\0")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{where}: template {i + 1} {t!r} must hold one '{{}}' for the class "
                              "name (and no other braces).")
