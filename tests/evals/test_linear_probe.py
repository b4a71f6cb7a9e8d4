"""Tests of the linear probe on frozen features."""
import numpy as np

from fmjax.evals.linear_probe import linear_probe


def _separable(seed, n_train=1000, n_test=400, dim=64, num_classes=10):
    """Linearly separable data: labels are the argmax of a random projection."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, num_classes))
    # Features with an offset and uneven scales, to exercise standardisation.
    scale = rng.uniform(0.1, 10.0, size=dim)
    x = rng.normal(size=(n_train + n_test, dim))
    y = np.argmax(x @ w, axis=1)
    x = x * scale + 3.0
    return (x[:n_train].astype(np.float32), y[:n_train],
            x[n_train:].astype(np.float32), y[n_train:], num_classes)


def test_separable_data_high_accuracy():
    xtr, ytr, xte, yte, c = _separable(0, n_train=2000, dim=32,
                                       num_classes=5)
    got = linear_probe(xtr, ytr, xte, yte, c)
    assert isinstance(got["top1"], float)
    assert got["train_top1"] >= 0.95, got
    assert got["top1"] >= 0.9, got


def test_deterministic_given_seed():
    xtr, ytr, xte, yte, c = _separable(1, n_train=300, n_test=100, dim=16,
                                       num_classes=4)
    kw = dict(steps=200, batch_size=64)
    a = linear_probe(xtr, ytr, xte, yte, c, seed=3, **kw)
    b = linear_probe(xtr, ytr, xte, yte, c, seed=3, **kw)
    assert a == b
    assert a["top1"] > 0.8


def test_without_standardize_runs():
    xtr, ytr, xte, yte, c = _separable(2, n_train=200, n_test=50, dim=8,
                                       num_classes=3)
    got = linear_probe(xtr / 10.0, ytr, xte / 10.0, yte, c, steps=100,
                       standardize=False)
    assert 0.0 <= got["top1"] <= 1.0
    assert 0.0 <= got["train_top1"] <= 1.0
