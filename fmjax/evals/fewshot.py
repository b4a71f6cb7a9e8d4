"""Few-shot classification by closed-form ridge regression on frozen features (``fewshot``).

A transcription of big_vision's ``big_vision/evaluators/fewshot_lsr.py``
(github.com/google-research/big_vision, file as of commit 1475d53dd8c4cae31aa4ae612b2c7bcd1555171e,
read at 0127fb6b337ee2a27bf4e54dea79cff176527356), with the defaults of its
``big_vision/configs/common_fewshot.py`` (``shots=(1, 5, 10, 25)``, ``l2_reg=2**10``,
``num_seeds=3``):

1. Features of the whole train split (here: its first ``train_examples``) and test split.
2. For each seed ``s`` in ``range(num_seeds)``: ``rng = np.random.default_rng(s)``, and per
   class ``c`` (in order) ``rng.permutation(np.where(train_labels == c)[0])``; the ``n``-shot
   training set is the first ``n`` of every class's permutation (fewer where a class has
   fewer; so the 1-shot set is inside the 5-shot set of the same seed).
3. On those ``N`` examples: standardise every feature by their mean and (biased) std, plus
   1e-5 on the std; append a constant feature 100 (a bias, almost unregularised); targets
   ``2 * one_hot(label) - 1``.
4. Ridge regression ``W = (X^T X + l2 I)^-1 X^T Y`` (``D + 1 <= N``) or its dual
   ``X^T (X X^T + l2 I)^-1 Y`` (``D + 1 > N``), both through one eigendecomposition, as in
   big_vision (``l2_reg`` is fixed: big_vision solves for one constant, its code is written
   so that several values could reuse the eigendecomposition).
5. Test features standardised with the training mean / std, the bias appended; accuracy of
   ``argmax(X_test W)``.

big_vision logs every seed (``<dataset>_<n>shot-seed-<s>``); fmjax logs the mean over seeds,
``eval/<name>_<n>shot_top1``. The linear algebra runs in float64 NumPy on the host (big_vision:
float32 jax pinned to the CPU), identically on every process.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fmjax.errors import ConfigError
from fmjax.evals import common, registry

BIAS_CONSTANT = 100.0
SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10
NUM_SEEDS = 3


def select_shots(labels: np.ndarray, num_classes: int, shots: Sequence[int], seed: int) -> dict:
    """``{n: indices of the n-shot training set}`` for one seed (big_vision's selection)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    class_indices = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return {n: np.concatenate([idx[:n] for idx in class_indices]).astype(np.int64) for n in shots}


def precompute_cache(x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Whitening statistics and the eigendecomposition that solves the ridge for any l2.

    With ``x`` (N, D+1) after whitening and the bias column, ``y`` (N, C) in {-1, 1}:
    ``N >= D+1``: ``eigh(x^T x) = q diag(e) q^T``, lhs ``q``, rhs ``q^T x^T y``;
    otherwise ``eigh(x x^T)``, lhs ``x^T q``, rhs ``q^T y``; then
    ``W = lhs diag(1 / (e + l2)) rhs``.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    x = (x - mean) / std
    x = np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    y = 2.0 * np.eye(num_classes)[np.asarray(y).reshape(-1)] - 1.0
    num_points, dim = x.shape
    if num_points >= dim:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    return {"eigs": eigs, "rhs": rhs, "lhs": lhs, "mean": mean, "std": std}


def ridge_weights(cache: dict, l2_reg: float) -> np.ndarray:
    """(D+1, C) weights of the ridge regression (the last row multiplies the bias feature)."""
    scaling = (1.0 / (cache["eigs"] + l2_reg)).reshape(1, -1)
    return (cache["lhs"] * scaling) @ cache["rhs"]


def predict(cache: dict, w: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Predicted classes of test features (whitened by the training statistics)."""
    x = (np.asarray(x_test, np.float64) - cache["mean"]) / cache["std"]
    x = np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return np.argmax(x @ w, axis=1)


def fewshot_lsr(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                shots: Sequence[int] = SHOTS, l2_reg: float = L2_REG,
                num_seeds: int = NUM_SEEDS) -> dict:
    """``{"<n>shot_top1": test accuracy averaged over seeds 0 .. num_seeds - 1}`` for each n."""
    train_feats = np.asarray(train_feats)
    train_labels = np.asarray(train_labels).reshape(-1)
    test_labels = np.asarray(test_labels).reshape(-1)
    if train_feats.shape[0] == 0:
        raise ValueError("fewshot_lsr needs at least one training example.")
    accs = {n: [] for n in shots}
    for seed in range(int(num_seeds)):
        for n, idx in select_shots(train_labels, num_classes, shots, seed).items():
            cache = precompute_cache(train_feats[idx], train_labels[idx], num_classes)
            pred = predict(cache, ridge_weights(cache, l2_reg), test_feats)
            accs[n].append(float(np.mean(pred == test_labels)) if test_labels.size else 0.0)
    return {f"{n}shot_top1": float(np.mean(v)) for n, v in accs.items()}


@registry.register("fewshot")
class FewshotEvaluator(common.Evaluator):
    """``eval/<name>_<n>shot_top1`` for each ``n`` in ``shots`` (default 1, 5, 10, 25): ridge
    regression (``l2_reg``, default 2**10) on ``n`` ``train_split`` features per class, scored
    on the ``split`` features, averaged over ``num_seeds`` (default 3) draws of the shots."""

    fields = ("shots", "l2_reg", "num_seeds")
    train_side = True

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "shots" in ev:
            shots = ev["shots"]
            if (isinstance(shots, (str, bytes)) or not hasattr(shots, "__len__") or not len(shots)
                    or not all(common.is_int(n) and n >= 1 for n in shots)):
                raise ConfigError(f"{where}.shots={shots!r}; it must be a non-empty list of integers "
                                  ">= 1 (shots per class), e.g. (1, 5, 10, 25).")
        if "l2_reg" in ev:
            common.check_number(where, "l2_reg", ev["l2_reg"])
        if "num_seeds" in ev:
            common.check_int(where, "num_seeds", ev["num_seeds"], 1)

    def run(self, state, step, writer):
        train_feats, train_labels = self.features(state, train=True)
        feats, labels = self.features(state)
        return fewshot_lsr(train_feats, train_labels, feats, labels,
                           self.num_classes(train_labels, labels),
                           shots=tuple(self.ev.get("shots", SHOTS)),
                           l2_reg=float(self.ev.get("l2_reg", L2_REG)),
                           num_seeds=int(self.ev.get("num_seeds", NUM_SEEDS)))
