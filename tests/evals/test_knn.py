"""Tests of the weighted kNN evaluator against a NumPy brute force."""
import numpy as np
import pytest

from fmjax.evals.knn import knn_classify, knn_scores


def _brute_force(train, train_y, test, test_y, num_classes, k, temperature):
    """Plain NumPy DINO kNN; ties in the class ranking go to lower index."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k = min(k, len(train))
    top = min(5, num_classes)
    top1 = top5 = 0
    all_scores = []
    for x, y in zip(test, test_y):
        sim = train @ x
        idx = np.argsort(-sim, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in idx:
            scores[train_y[i]] += np.exp(sim[i] / temperature)
        ranked = np.argsort(-scores, kind="stable")
        top1 += ranked[0] == y
        top5 += y in ranked[:top]
        all_scores.append(scores)
    n = len(test)
    return top1 / n, top5 / n, np.array(all_scores)


@pytest.mark.parametrize("k,batch_size", [(20, 64), (7, 1000), (500, 33)])
def test_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(0)
    num_classes = 10
    train = rng.normal(size=(300, 16)).astype(np.float32)
    train_y = rng.integers(0, num_classes, 300)
    test = rng.normal(size=(150, 16)).astype(np.float32)
    test_y = rng.integers(0, num_classes, 150)
    # A weak signal so accuracies are neither 0 nor 1.
    train[np.arange(300), train_y] += 1.0
    test[np.arange(150), test_y] += 1.0
    want1, want5, want_scores = _brute_force(
        train, train_y, test, test_y, num_classes, k, 0.07)
    got = knn_classify(train, train_y, test, test_y, num_classes, k=k,
                       batch_size=batch_size)
    assert isinstance(got["top1"], float) and isinstance(got["top5"], float)
    assert got["top1"] == pytest.approx(want1)
    assert got["top5"] == pytest.approx(want5)
    assert 0.0 < got["top1"] < 1.0
    scores = knn_scores(train, train_y, test, num_classes, k=k,
                        batch_size=batch_size)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-6)


def test_separated_clusters_near_perfect():
    rng = np.random.default_rng(1)
    num_classes, dim = 5, 32
    centers = rng.normal(size=(num_classes, dim)) * 5.0
    train_y = np.repeat(np.arange(num_classes), 40)
    test_y = np.repeat(np.arange(num_classes), 20)
    train = centers[train_y] + rng.normal(size=(len(train_y), dim))
    test = centers[test_y] + rng.normal(size=(len(test_y), dim))
    got = knn_classify(train, train_y, test, test_y, num_classes)
    assert got["top1"] >= 0.99
    assert got["top5"] == 1.0  # 5 classes: top-5 always contains the label


def test_random_labels_near_chance():
    rng = np.random.default_rng(2)
    num_classes = 10
    train = rng.normal(size=(1000, 32))
    test = rng.normal(size=(1000, 32))
    got = knn_classify(train, rng.integers(0, num_classes, 1000), test,
                       rng.integers(0, num_classes, 1000), num_classes)
    assert abs(got["top1"] - 0.1) < 0.05
    assert abs(got["top5"] - 0.5) < 0.1


def test_k_larger_than_train_set_is_clamped():
    train = np.eye(3, dtype=np.float32)
    test = np.eye(3, dtype=np.float32) + 0.01
    labels = np.array([0, 1, 2])
    got = knn_classify(train, labels, test, labels, num_classes=3, k=20)
    assert got == {"top1": 1.0, "top5": 1.0}
