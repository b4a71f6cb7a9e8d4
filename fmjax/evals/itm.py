"""Image-text matching accuracy: does the model's ITM head tell a caption of the image from a
caption of another image?

For each validation example (image i, caption i) the evaluator scores the positive pair and
one negative pair (image i, caption j), j from the same global batch with a different label
(the shapes' shape class; a caption of the same class could describe the image too):

* ``neg``: j is the first such example after i in the (shuffled-once) split order, a
  random other caption;
* ``hard_neg``: j is the different-label caption most similar to image i by the objective's
  ITC embeddings (``features`` / ``text_features``): the negative the contrastive model finds
  hardest, as BLIP's ITM training draws them.

``eval/<name>_acc``: the accuracy over the positive and the random-negative pairs at P(match) >
0.5 (chance 0.5; issue 20's BLIP gate is >= 0.8), ``_pos_acc`` / ``_neg_acc`` the two halves,
``_hard_acc`` the same with the hard negatives (``_hard_neg_acc`` their half), ``_rank_acc`` /
``_hard_rank_acc`` how often the positive pair scores above its negative (no threshold: the
ITM head trains on one positive per two negatives, so its P(match) sits low). Examples whose
batch holds no different-label example are skipped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fmjax.errors import ConfigError
from fmjax.evals import common, registry


def match_pairs(objective, params, extra, images, tokens, labels, valid):
    """(P(match) of the positives, of the random negatives, of the hard negatives, has a
    negative), each (B,): the module docstring's pairs within one batch."""
    b = labels.shape[0]
    other = (labels[:, None] != labels[None, :]) & valid[None, :]
    offset = (jnp.arange(b)[None, :] - jnp.arange(b)[:, None]) % b   # 1 .. B-1 after i, i at 0
    first = jnp.argmin(jnp.where(other, offset, b), axis=1)
    img = objective.features(params, extra, images).astype(jnp.float32)
    txt = objective.text_features(params, extra, tokens).astype(jnp.float32)
    hard = jnp.argmax(jnp.where(other, img @ txt.T, -jnp.inf), axis=1)
    pos = objective.match_scores(params, extra, images, tokens)
    neg = objective.match_scores(params, extra, images, tokens[first])
    hard_neg = objective.match_scores(params, extra, images, tokens[hard])
    return pos, neg, hard_neg, other.any(1)


@registry.register("itm")
class ITMEvaluator(common.Evaluator):
    """``eval/<name>_acc`` etc. (module docstring) over the ``examples`` of ``split``; the
    pipeline gives ``image``, ``tokens`` and ``label``."""

    requires = {"match_scores": "match_scores hook (an image-text matching head, e.g. BLIP's)",
                "features": "features hook (image embeddings, for the hard negatives)",
                "text_features": "text tower (text embeddings, for the hard negatives)"}

    def run(self, state, step, writer):
        obj = self.ctx.objective
        fn = self.ctx.cache.get("itm_fn")
        if fn is None:
            fn = self.ctx.cache["itm_fn"] = jax.jit(
                lambda p, e, i, t, l, v: match_pairs(obj, p, e, i, t, l, v))
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        multi = jax.process_count() > 1
        outs = []
        with self.ctx.scope():
            for batch, valid in self.batches():
                missing = [k for k in ("image", "tokens", "label") if k not in batch]
                if missing:
                    raise ConfigError(f"{self.where}: its pipeline ({self.pp_key}) gives no "
                                      f"{missing}; ITM needs image, tokens and label (e.g. "
                                      "keep('image', 'label', 'tokens')).")
                v = gather(valid) if multi else valid
                res = fn(state.params, state.extra, batch["image"], batch["tokens"],
                         batch["label"], jnp.asarray(v))
                pos, neg, hard, has = (gather(x) if multi else np.asarray(x) for x in res)
                keep = v & has
                outs.append(np.stack([pos[keep], neg[keep], hard[keep]], 1))
        scores = np.concatenate(outs).astype(np.float32)
        if not len(scores):
            raise ValueError(f"{self.where}: no example of {self.split!r} has a caption of another "
                             "label in its batch; raise batch_size or examples.")
        pos_acc = float(np.mean(scores[:, 0] > 0.5))
        neg_acc = float(np.mean(scores[:, 1] <= 0.5))
        hard_neg_acc = float(np.mean(scores[:, 2] <= 0.5))
        return {"acc": (pos_acc + neg_acc) / 2, "pos_acc": pos_acc, "neg_acc": neg_acc,
                "hard_acc": (pos_acc + hard_neg_acc) / 2, "hard_neg_acc": hard_neg_acc,
                "rank_acc": float(np.mean(scores[:, 0] > scores[:, 1])),
                "hard_rank_acc": float(np.mean(scores[:, 0] > scores[:, 2]))}
