"""Zero-shot classifier weights and retrieval recall against brute-force definitions."""
import numpy as np

from fmjax.evals import retrieval, zero_shot


def test_zero_shot_prompt_ensemble_and_accuracy():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    table = {}

    def embed(texts):
        out = []
        for t in texts:
            cls = int(t.split()[-1])
            table.setdefault(t, centers[cls] + 0.3 * rng.normal(size=16))
            out.append(table[t])
        return np.stack(out)

    names = ["0", "1", "2", "3"]
    templates = ["a photo of {}", "a drawing of {}", "{}"]
    assert zero_shot.prompts(names, templates)[:3] == ["a photo of 0", "a drawing of 0", "0"]
    w = zero_shot.classifier_weights(embed, names, templates)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    labels = rng.integers(0, 4, 200)
    images = centers[labels] + 0.3 * rng.normal(size=(200, 16))
    acc = zero_shot.zero_shot_accuracy(images, labels, w)
    assert acc["top1"] > 0.95 and acc["top5"] == 1.0
    shuffled = zero_shot.zero_shot_accuracy(images, rng.permutation(labels), w)
    assert shuffled["top1"] < 0.5


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(50, 8))
    txt = img + 1.5 * rng.normal(size=(50, 8))
    out = retrieval.retrieval_recall(img, txt)
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = a @ b.T
    for k in (1, 5, 10):
        i2t = np.mean([i in np.argsort(-sim[i])[:k] for i in range(50)])
        t2i = np.mean([j in np.argsort(-sim[:, j])[:k] for j in range(50)])
        assert out[f"i2t_r@{k}"] == i2t and out[f"t2i_r@{k}"] == t2i
    assert retrieval.retrieval_recall(img, img)["i2t_r@1"] == 1.0
