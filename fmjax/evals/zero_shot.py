"""Zero-shot classification with prompt ensembles (CLIP-style), on precomputed embeddings.

``classifier_weights`` averages the L2-normalised text embeddings of every
(template x class name) prompt per class and re-normalises, as in CLIP's ImageNet
zero-shot notebook; ``zero_shot_accuracy`` scores L2-normalised image embeddings
against those weights.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


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
