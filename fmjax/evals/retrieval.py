"""Image-text retrieval recall@K on paired embeddings (image i <-> caption i)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fmjax.evals import common, registry


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``i2t_r@k``: the paired caption is among the k captions nearest the image; ``t2i_r@k``
    the converse. Embeddings are L2-normalised here; pairs share an index."""
    img = np.asarray(image_embeds, np.float32)
    txt = np.asarray(text_embeds, np.float32)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    sim = img @ txt.T
    n = sim.shape[0]
    # Rank of the true pair = number of candidates scoring strictly higher.
    true = np.diag(sim)
    rank_i2t = (sim > true[:, None]).sum(axis=1)
    rank_t2i = (sim > true[None, :]).sum(axis=0)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((rank_i2t < k).mean())
        out[f"t2i_r@{k}"] = float((rank_t2i < k).mean())
    out["chance_r@1"] = 1.0 / n
    return out


@registry.register("retrieval")
class RetrievalEvaluator(common.Evaluator):
    """``eval/<name>_i2t_r@k`` / ``_t2i_r@k`` (k = 1, 5, 10) and ``_chance_r@1`` over the
    image-caption pairs of ``split`` (its pipeline gives ``image`` and ``tokens``)."""

    requires = {"text_features": "text tower"}

    def run(self, state, step, writer):
        img, _, txt = self.features(state, with_text=True)
        return retrieval_recall(img, txt)
