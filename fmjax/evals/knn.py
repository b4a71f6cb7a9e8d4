"""Weighted k-nearest-neighbour classification on frozen features.

Follows the DINO reference (``eval_knn.py``): features are L2-normalised, the
similarity is the cosine (a dot product of unit vectors), each test example
looks up its ``k`` most similar training examples, each neighbour votes for
its label with weight ``exp(sim / T)``, and the class scores are the summed
votes. Top-1 / top-5 accuracy are read off the ranked class scores (ties are
broken towards the lower class index).

The similarity matrix is computed in chunks of ``batch_size`` test examples by
one jitted function (the last chunk is padded, so it compiles once), so memory
stays at ``batch_size x num_train`` whatever the size of the test set.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.evals import common, registry


def l2_normalize(x, axis=-1, eps=1e-12):
    """Divides ``x`` by its L2 norm along ``axis`` (like ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "top"))
def _knn_chunk(train_feats, train_labels, feats, labels, valid, *, k,
               num_classes, temperature, top):
    """Counts top-1 / top-``top`` hits for one chunk of test examples.

    Args:
        train_feats: [M, D] L2-normalised training features.
        train_labels: [M] int training labels.
        feats: [B, D] L2-normalised test features.
        labels: [B] int test labels.
        valid: [B] bool, False on padding rows.
        k: number of neighbours (<= M).
        num_classes: number of classes.
        temperature: softmax-like temperature of the vote weights.
        top: the "top-5" cut-off (<= num_classes).

    Returns:
        (top1_hits, topn_hits, class_scores) where hits are int32 scalars.
    """
    sim = feats @ train_feats.T                                   # [B, M]
    dist, idx = jax.lax.top_k(sim, k)                             # [B, k]
    neighbours = train_labels[idx]                                # [B, k]
    weights = jnp.exp(dist / temperature)                         # [B, k]
    onehot = jax.nn.one_hot(neighbours, num_classes, dtype=weights.dtype)
    scores = jnp.sum(onehot * weights[..., None], axis=1)         # [B, C]
    _, preds = jax.lax.top_k(scores, top)                         # [B, top]
    correct = preds == labels[:, None]
    top1 = jnp.sum(correct[:, 0] & valid)
    topn = jnp.sum(jnp.any(correct, axis=1) & valid)
    return top1.astype(jnp.int32), topn.astype(jnp.int32), scores


def knn_scores(train_feats, train_labels, test_feats, num_classes, k=20,
               temperature=0.07, batch_size=1024):
    """Returns the [N_test, num_classes] weighted vote scores as NumPy."""
    labels = np.zeros((np.shape(test_feats)[0],), np.int32)
    return _run(train_feats, train_labels, test_feats, labels, num_classes, k,
                temperature, batch_size, want_scores=True)[2]


def _run(train_feats, train_labels, test_feats, test_labels, num_classes, k,
         temperature, batch_size, want_scores=False):
    """Shared driver: chunks the test set and accumulates hit counts."""
    train_feats = jnp.asarray(train_feats, jnp.float32)
    test_feats = np.asarray(test_feats, np.float32)
    train_labels = jnp.asarray(train_labels, jnp.int32).reshape(-1)
    test_labels = np.asarray(test_labels, np.int32).reshape(-1)
    num_train, num_test = train_feats.shape[0], test_feats.shape[0]
    if num_train == 0:
        raise ValueError("knn_classify needs at least one training example.")
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError("train_feats and train_labels differ in length.")
    if test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("test_feats and test_labels differ in length.")
    k = int(min(k, num_train))
    top = int(min(5, num_classes))
    train_feats = l2_normalize(train_feats)
    chunk = int(max(1, min(batch_size, num_test)))
    top1 = topn = 0
    all_scores = []
    for start in range(0, num_test, chunk):
        feats = test_feats[start:start + chunk]
        labels = test_labels[start:start + chunk]
        n = feats.shape[0]
        valid = np.arange(chunk) < n
        if n < chunk:                                  # pad: one compilation
            feats = np.pad(feats, ((0, chunk - n), (0, 0)))
            labels = np.pad(labels, (0, chunk - n))
        h1, hn, scores = _knn_chunk(
            train_feats, train_labels, l2_normalize(jnp.asarray(feats)),
            jnp.asarray(labels), jnp.asarray(valid), k=k,
            num_classes=int(num_classes), temperature=float(temperature),
            top=top)
        top1 += int(h1)
        topn += int(hn)
        if want_scores:
            all_scores.append(np.asarray(scores)[:n])
    scores = (np.concatenate(all_scores) if all_scores
              else np.zeros((0, num_classes), np.float32))
    return top1, topn, scores


def knn_classify(train_feats, train_labels, test_feats, test_labels,
                 num_classes, k=20, temperature=0.07, batch_size=1024):
    """Weighted kNN accuracy of frozen features (DINO protocol).

    Args:
        train_feats: [M, D] array of training features (any float dtype).
        train_labels: [M] int labels in [0, num_classes).
        test_feats: [N, D] array of test features.
        test_labels: [N] int labels.
        num_classes: number of classes.
        k: number of neighbours; clamped to M.
        temperature: vote weight is ``exp(cosine_similarity / temperature)``.
        batch_size: test examples per jitted chunk (bounds memory to
            ``batch_size * M`` similarities).

    Returns:
        ``{"top1": float, "top5": float}`` accuracies in [0, 1]; top5 counts
        the top ``min(5, num_classes)`` classes.
    """
    num_test = int(np.shape(test_feats)[0])
    if num_test == 0:
        return {"top1": 0.0, "top5": 0.0}
    top1, topn, _ = _run(train_feats, train_labels, test_feats, test_labels,
                         num_classes, k, temperature, batch_size)
    return {"top1": top1 / num_test, "top5": topn / num_test}


@registry.register("knn")
class KnnEvaluator(common.Evaluator):
    """``eval/<name>_top1`` / ``_top5``: weighted kNN of the ``split`` features against the
    ``train_split`` features (``k``, default 20; ``temperature``, default 0.07)."""

    fields = ("k", "temperature")
    train_side = True

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "k" in ev:
            common.check_int(where, "k", ev["k"], 1)
        if "temperature" in ev:
            common.check_number(where, "temperature", ev["temperature"])

    def run(self, state, step, writer):
        train_feats, train_labels = self.features(state, train=True)
        feats, labels = self.features(state)
        num_classes = int(max(train_labels.max(), labels.max()) + 1)
        return knn_classify(train_feats, train_labels, feats, labels, num_classes,
                            k=self.ev.get("k", 20), temperature=self.ev.get("temperature", 0.07))
