"""The few-shot ridge regression (fmjax/evals/fewshot.py) against a plain NumPy solution."""
import numpy as np
import pytest

from fmjax.evals import fewshot


def _reference_weights(x, y, num_classes, l2):
    """Whiten with the training mean / std (+1e-5), append the bias feature, solve the ridge
    normal equations directly."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    xb = np.concatenate([(x - mean) / std, np.full((len(x), 1), fewshot.BIAS_CONSTANT)], axis=1)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(xb.T @ xb + l2 * np.eye(xb.shape[1]), xb.T @ targets)
    return w, mean, std


@pytest.mark.parametrize("n, dim", [(200, 16), (12, 40)])  # primal (N >= D+1) and dual (N < D+1)
@pytest.mark.parametrize("l2", [2.0 ** 10, 0.5])
def test_ridge_matches_numpy_closed_form(n, dim, l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)) * rng.uniform(0.1, 5, size=dim) + rng.normal(size=dim)
    y = rng.integers(0, 4, n)
    cache = fewshot.precompute_cache(x, y, 4)
    w = fewshot.ridge_weights(cache, l2)
    w_ref, mean, std = _reference_weights(x, y, 4, l2)
    np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-9)
    x_test = rng.normal(size=(50, dim))
    xb = np.concatenate([(x_test - mean) / std, np.full((50, 1), fewshot.BIAS_CONSTANT)], axis=1)
    np.testing.assert_array_equal(fewshot.predict(cache, w, x_test), np.argmax(xb @ w_ref, axis=1))


def test_shots_are_the_first_of_a_seeded_permutation_per_class():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 2, 1, 0])
    sel = fewshot.select_shots(labels, 3, (1, 2, 5), seed=7)
    rng = np.random.default_rng(7)  # big_vision's draw, class by class
    perms = [rng.permutation(np.where(labels == c)[0]) for c in range(3)]
    for n in (1, 2, 5):
        np.testing.assert_array_equal(sel[n], np.concatenate([p[:n] for p in perms]))
    assert len(sel[5]) == 5 + 4 + 3  # classes 1 and 2 have fewer than 5 examples: all are used
    assert set(sel[1]) <= set(sel[2]) <= set(sel[5])  # nested, as in big_vision
    again = fewshot.select_shots(labels, 3, (1, 2, 5), seed=7)
    assert all(np.array_equal(sel[n], again[n]) for n in sel)
    assert not np.array_equal(fewshot.select_shots(labels, 3, (5,), seed=8)[5], sel[5])


def test_fewshot_lsr_is_the_seed_mean_of_the_closed_form():
    rng = np.random.default_rng(1)
    centers = 3 * rng.normal(size=(5, 8))
    train_y = rng.integers(0, 5, 300)
    test_y = rng.integers(0, 5, 100)
    train_x = centers[train_y] + rng.normal(size=(300, 8))
    test_x = centers[test_y] + rng.normal(size=(100, 8))
    out = fewshot.fewshot_lsr(train_x, train_y, test_x, test_y, 5, shots=(1, 5), l2_reg=1.0, num_seeds=2)
    assert sorted(out) == ["1shot_top1", "5shot_top1"]
    for n in (1, 5):
        accs = []
        for seed in range(2):
            idx = fewshot.select_shots(train_y, 5, (n,), seed)[n]
            w, mean, std = _reference_weights(train_x[idx], train_y[idx], 5, 1.0)
            xb = np.concatenate([(test_x - mean) / std, np.full((100, 1), fewshot.BIAS_CONSTANT)], 1)
            accs.append(np.mean(np.argmax(xb @ w, 1) == test_y))
        assert out[f"{n}shot_top1"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert out["5shot_top1"] > 0.9  # separated clusters
    chance = fewshot.fewshot_lsr(train_x, rng.permutation(train_y), test_x, test_y, 5, shots=(5,))
    assert chance["5shot_top1"] < 0.5
