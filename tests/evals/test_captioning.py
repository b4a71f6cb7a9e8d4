"""The captioning metrics (fmjax/evals/captioning.py) against transcriptions of the COCO
caption scorers, and the ``captioning`` evaluator end to end with fake captioners."""
import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fmjax.data.registry import register_source
from fmjax.data.tokenizer import get_tokenizer
from fmjax.errors import ConfigError
from fmjax.evals import captioning as cap
from fmjax.parallel import mesh as mesh_lib
from fmjax.parallel import rules as rules_lib
from fmjax.train import validate
from fmjax.train.evaluate import Evaluator


# -- upstream, transcribed (Python 2 -> 3: iteritems -> items, xrange -> range; the parts the
# scores use, unchanged otherwise) -------------------------------------------------------------
# tylin/coco-caption @ 3a9afb2682141a03e1cdc02b0df6770d2c884f6f, pycocoevalcap/bleu/bleu_scorer.py
# (precook, cook_refs, cook_test, BleuScorer.compute_score) with bleu.py's option='closest'.
def _bleu_precook(s, n=4):
    words = s.split()
    counts = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return (len(words), counts)


def _bleu_cook_refs(refs, n=4):
    reflen, maxcounts = [], {}
    for ref in refs:
        rl, counts = _bleu_precook(ref, n)
        reflen.append(rl)
        for (ngram, count) in counts.items():
            maxcounts[ngram] = max(maxcounts.get(ngram, 0), count)
    return (reflen, maxcounts)


def _bleu_cook_test(test, cooked, n=4):
    reflen, refmaxcounts = cooked
    testlen, counts = _bleu_precook(test, n)
    result = {"reflen": reflen, "testlen": testlen,
              "guess": [max(0, testlen - k + 1) for k in range(1, n + 1)], "correct": [0] * n}
    for (ngram, count) in counts.items():
        result["correct"][len(ngram) - 1] += min(refmaxcounts.get(ngram, 0), count)
    return result


def upstream_bleu(tests, refs, n=4):
    """Bleu(4).compute_score's corpus scores [BLEU-1, .., BLEU-4] ('closest' reference length)."""
    ctest = [_bleu_cook_test(t, _bleu_cook_refs(r, n), n) for t, r in zip(tests, refs)]
    small, tiny = 1e-9, 1e-15
    _testlen = _reflen = 0
    totalcomps = {"testlen": 0, "reflen": 0, "guess": [0] * n, "correct": [0] * n}
    for comps in ctest:
        testlen = comps["testlen"]
        _testlen += testlen
        reflen = min((abs(l - testlen), l) for l in comps["reflen"])[1]  # _single_reflen 'closest'
        _reflen += reflen
        for key in ["guess", "correct"]:
            for k in range(n):
                totalcomps[key][k] += comps[key][k]
    bleus, bleu = [], 1.
    for k in range(n):
        bleu *= float(totalcomps["correct"][k] + tiny) / (totalcomps["guess"][k] + small)
        bleus.append(bleu ** (1. / (k + 1)))
    ratio = (_testlen + tiny) / (_reflen + small)
    if ratio < 1:
        for k in range(n):
            bleus[k] *= math.exp(1 - 1 / ratio)
    return bleus


# vrama91/cider @ f281464c60d496b8fabb89a7a8c120f655a3a2bd, pyciderevalcap/ciderD/ciderD_scorer.py
# (precook, CiderScorer.compute_doc_freq / compute_cider / compute_score, df_mode='corpus').
def _cider_precook(s, n=4):
    words = s.split()
    counts = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def upstream_cider_d(tests, refs, n=4, sigma=6.0):
    """CiderD(df='corpus').compute_score: (corpus score, per-image scores)."""
    crefs = [[_cider_precook(r, n) for r in rs] for rs in refs]
    ctest = [_cider_precook(t, n) for t in tests]
    document_frequency = defaultdict(float)
    for rs in crefs:
        for ngram in set([ngram for ref in rs for (ngram, count) in ref.items()]):
            document_frequency[ngram] += 1
    assert len(ctest) >= max(document_frequency.values())
    ref_len = np.log(float(len(crefs)))

    def counts2vec(cnts):
        vec = [defaultdict(float) for _ in range(n)]
        length = 0
        norm = [0.0 for _ in range(n)]
        for (ngram, term_freq) in cnts.items():
            df = np.log(max(1.0, document_frequency[ngram]))
            m = len(ngram) - 1
            vec[m][ngram] = float(term_freq) * (ref_len - df)
            norm[m] += pow(vec[m][ngram], 2)
            if m == 1:
                length += term_freq
        norm = [np.sqrt(x) for x in norm]
        return vec, norm, length

    def sim(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref):
        delta = float(length_hyp - length_ref)
        val = np.array([0.0 for _ in range(n)])
        for m in range(n):
            for (ngram, count) in vec_hyp[m].items():
                val[m] += min(vec_hyp[m][ngram], vec_ref[m][ngram]) * vec_ref[m][ngram]
            if (norm_hyp[m] != 0) and (norm_ref[m] != 0):
                val[m] /= (norm_hyp[m] * norm_ref[m])
            assert not math.isnan(val[m])
            val[m] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, rs in zip(ctest, crefs):
        vec, norm, length = counts2vec(test)
        score = np.array([0.0 for _ in range(n)])
        for ref in rs:
            vec_ref, norm_ref, length_ref = counts2vec(ref)
            score += sim(vec, vec_ref, norm, norm_ref, length, length_ref)
        score_avg = np.mean(score)
        score_avg /= len(rs)
        score_avg *= 10.0
        scores.append(score_avg)
    return np.mean(np.array(scores)), np.array(scores)


def _ptb(s):
    """The stand-in for pycocoevalcap's PTB tokenisation: what its scorers split on spaces."""
    return " ".join(cap.tokenize_caption(s))


def _upstream(cands, refs):
    tc, tr = [_ptb(c) for c in cands], [[_ptb(r) for r in rs] for rs in refs]
    return upstream_bleu(tc, tr)[3], upstream_cider_d(tc, tr)


WORDS = ["a", "the", "red", "blue", "green", "circle", "square", "star", "on", "left", "of",
         "right", "small", "large", "above", "below", "and", "two", "shapes"]


def _random_set(seed, n_images=40, max_refs=4, min_len=0, max_len=14):
    rng = np.random.default_rng(seed)

    def sentence(base=None):
        if base is not None and rng.uniform() < 0.6:  # a noisy copy of the reference
            words = [w if rng.uniform() < 0.75 else str(rng.choice(WORDS)) for w in base.split()]
            if rng.uniform() < 0.3:
                words = words[:int(rng.integers(len(words) + 1))]
            return " ".join(words)
        words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(min_len, max_len + 1)))]
        if words and rng.uniform() < 0.5:  # punctuation and case the tokenizer must drop
            words[0] = words[0].capitalize()
            words[-1] += rng.choice([".", ",", "!", "?"])
        return " ".join(words)

    refs = [[sentence() for _ in range(int(rng.integers(1, max_refs + 1)))] for _ in range(n_images)]
    cands = [sentence(rs[0]) for rs in refs]
    return cands, refs


# -- (a) the metrics against the transcriptions ----------------------------------------------
def test_tokenizer_lowercases_and_drops_punctuation():
    assert cap.tokenize_caption("A small Red circle, on the LEFT.") == \
        ["a", "small", "red", "circle", "on", "the", "left"]
    assert cap.tokenize_caption("two shapes: a star-shaped thing; don't!") == \
        ["two", "shapes", "a", "star-shaped", "thing", "don't"]
    assert cap.tokenize_caption(" ... ") == []


@pytest.mark.parametrize("seed, max_refs", [(0, 1), (1, 4), (2, 5)])
def test_metrics_equal_the_transcribed_scorers(seed, max_refs):
    cands, refs = _random_set(seed, max_refs=max_refs)
    want_bleu, (want_cider, want_per_image) = _upstream(cands, refs)
    # The same float operations in the same order: equal to the last bit.
    assert cap.bleu4(cands, refs) == want_bleu
    np.testing.assert_array_equal(cap.cider_d_scores(cands, refs), want_per_image)
    assert cap.cider_d(cands, refs) == want_cider
    assert 0.0 < cap.bleu4(cands, refs) < 1.0 and 0.0 < cap.cider_d(cands, refs) < 10.0


def test_metrics_equal_upstream_numbers():
    """Numbers from the upstream code itself, run once without Java on the same tokens (see
    _ptb): salaniz/pycocoevalcap @ ad63453cfab57a81a02b2949b17a91fab1c3df77 (pycocoevalcap 1.2,
    Python 3) bleu/bleu.py Bleu(4).compute_score(gts, res)[0][3], and vrama91/cider @
    f281464c60d496b8fabb89a7a8c120f655a3a2bd ciderD_scorer.py (iteritems -> items, xrange ->
    range) CiderScorer(n=4) += (test, refs) per image, compute_score('corpus')."""
    cands = ["a red circle on the left.", "a blue square", "",
             "two shapes: a green star and a red ring above a blue heart",
             "a small red circle on the left of a star", "the the the the the"]
    refs = [["A red circle on the left.", "a large red circle at the left"],
            ["a blue square above a green star."], ["a ring."],
            ["Two shapes: a green star and a red ring.", "a green star next to a red ring",
             "there is a green star"],
            ["a small red circle on the right of a star."],
            ["the large blue square in the center.", "a blue square"]]
    assert cap.bleu4(cands, refs) == pytest.approx(0.6558857187304425, rel=1e-14)
    assert cap.cider_d(cands, refs) == pytest.approx(2.9778630358092446, rel=1e-14)
    np.testing.assert_allclose(cap.cider_d_scores(cands, refs),
                               [6.287835674480757, 2.7112403240846747, 0.0, 2.6543143061743946,
                                6.024217942570917, 0.18956996754472347], rtol=1e-14)
    assert _upstream(cands, refs)[0] == cap.bleu4(cands, refs)


def test_bleu4_by_hand():
    # p_n = 4/5, 3/4, 2/3, 1/2 -> (1/5)^(1/4); brevity penalty exp(1 - 6/5).
    got = cap.bleu4(["a b c d e"], [["a b c d f g"]])
    assert got == pytest.approx(0.2 ** 0.25 * math.exp(-0.2), rel=1e-8)
    # 'closest' reference length: 5 words is closer to the 4-word candidate than 9 (so no
    # brevity penalty beyond exp(1 - 5/4)); all n-grams match the first reference.
    got = cap.bleu4(["w x y z"], [["w x y z q", "q q q q q q q q q"]])
    assert got == pytest.approx(math.exp(1 - 5 / 4), rel=1e-8)
    assert cap.bleu4(["the cat sat on the mat"], ["The cat sat on the mat."]) == pytest.approx(1.0)


def test_cider_d_of_identical_captions():
    refs = ["a red circle on the left", "a blue square above a star", "two green stars and a ring"]
    # Every n = 1..4 has a non-zero tf-idf vector: each image scores 10 * 4/4.
    np.testing.assert_allclose(cap.cider_d_scores(refs, [[r] for r in refs]), 10.0, rtol=1e-12)
    # Three words: no 4-gram, so 10 * 3/4.
    short = ["red circle left", "blue square above", "green star below"]
    assert cap.cider_d(short, [[r] for r in short]) == pytest.approx(7.5, rel=1e-12)
    # An n-gram in every image's references weighs log(N) - log(N) = 0; one image: all zero.
    assert cap.cider_d(["a red circle"], [["a red circle"]]) == 0.0
    same = ["a red circle", "a red circle"]
    assert cap.cider_d(same, [[r] for r in same]) == 0.0


# -- (b) edge cases ----------------------------------------------------------------------------
def test_empty_candidates():
    cands, refs = _random_set(3, min_len=2)
    cands[0] = cands[5] = ""
    cands[7] = " .,; "
    want_bleu, (want_cider, per_image) = _upstream(cands, refs)
    got = cap.cider_d_scores(cands, refs)
    assert got[0] == got[5] == got[7] == 0.0
    np.testing.assert_allclose(got, per_image, rtol=1e-12, atol=1e-15)
    assert cap.bleu4(cands, refs) == pytest.approx(want_bleu, rel=1e-12)
    assert cap.bleu4(["", ""], [["a b"], ["c d"]]) == 0.0
    assert cap.cider_d(["", ""], [["a b"], ["c d"]]) == 0.0


def test_candidates_longer_than_references():
    refs = [["a red circle on the left"], ["a blue square above a star"], ["two green stars"]]
    exact = [r[0] for r in refs]
    longer = [r[0] + " and a small green heart in the center of it" for r in refs]
    want_bleu, (want_cider, _) = _upstream(longer, refs)
    assert cap.bleu4(longer, refs) == pytest.approx(want_bleu, rel=1e-12)
    assert cap.cider_d(longer, refs) == pytest.approx(want_cider, rel=1e-12)
    # No brevity penalty, but the extra words lower the precisions and the gaussian length
    # penalty exp(-delta^2 / 72) lowers CIDEr-D.
    assert cap.bleu4(longer, refs) < cap.bleu4(exact, refs)
    assert 0 < cap.cider_d(longer, refs) < cap.cider_d(exact, refs) * math.exp(-10 ** 2 / 72) + 1e-9
    # Clipping: repeating a reference's words does not pay.
    doubled = [r[0] + " " + r[0] for r in refs]
    assert cap.cider_d(doubled, refs) < cap.cider_d(exact, refs)
    assert cap.cider_d(doubled, refs) == pytest.approx(_upstream(doubled, refs)[1][0], rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        cap.bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference caption"):
        cap.cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no candidate captions"):
        cap.cider_d([], [])
    # One string is one reference (not a list of characters).
    assert cap.cider_d(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(10.0)


def test_nearest_neighbours_cosine_and_ties():
    keys = np.array([[1, 0], [0, 2], [0, 5], [1, 1]], np.float32)
    queries = np.array([[3, 0], [0, 1], [1, 1.2], [-1, 0]], np.float32)
    np.testing.assert_array_equal(cap.nearest_neighbours(queries, keys, chunk=3), [0, 1, 3, 1])


def test_reference_texts_gathered_over_processes(monkeypatch):
    """Two simulated processes holding the same share: texts of any byte length survive the
    padded uint8 gather, in process order."""
    monkeypatch.setattr(cap.jax, "process_count", lambda: 2)
    monkeypatch.setattr(cap.multihost_utils, "process_allgather",
                        lambda x, tiled: np.concatenate([np.asarray(x)] * 2))
    texts = ["a red circle.", "", "caf\u00e9 \u2014 \u00fcber" + cap._SEP + "second reference"]
    assert cap._gather_texts(texts) == texts + texts
    assert cap.reference_list(np.array(["a", "b"])) == ["a", "b"]
    assert cap.reference_list(b"caf\xc3\xa9") == ["caf\u00e9"]


# -- (c) the evaluator end to end ----------------------------------------------------------------
COLORS, SHAPES = ("red", "green", "blue"), ("circle", "square")
WHERE = ("on the left", "on the right", "at the top", "at the bottom")
SIZES = {"train": 48, "validation": 24}


def _scene(split, i):
    rng = np.random.default_rng([list(SIZES).index(split), i])
    return int(rng.integers(3)), int(rng.integers(2)), int(rng.integers(4))


def _caption(c, k, p):
    return f"A {COLORS[c]} {SHAPES[k]} {WHERE[p]}."


class _Scenes:
    """Images whose first pixel holds (colour, shape, position); one caption each."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return SIZES[self.split]

    def __getitem__(self, i):
        c, k, p = _scene(self.split, i)
        image = np.zeros((8, 8, 3), np.uint8)
        image[0, 0] = (c, k, p)
        image[1:] = 40 * (c + 1)
        return {"image": image, "label": c * 2 + k, "caption": _caption(c, k, p)}


@register_source("captest")
def _captest(name, split, data_dir, **options):
    return _Scenes(split)


class FakeCaptioner:
    """``features``: a one-hot of (colour, shape), so a nearest train image can be at another
    position; ``caption``: the ids (after sot) of the true caption, or of ``garbage``."""

    def __init__(self, config, garbage=None):
        self.config = config
        d = config.data.tokenize
        tok = get_tokenizer(d.tokenizer, vocab_size=d.get("vocab_size"))
        texts = [garbage or _caption(c, k, p) for c in range(3) for k in range(2) for p in range(4)]
        self.table = jnp.asarray(tok(texts, d.context_length)[:, 1:])

    def features(self, params, extra, images):
        x = images[:, 0, 0].astype(jnp.int32)
        return jax.nn.one_hot(x[:, 0] * 2 + x[:, 1], 6)

    def caption(self, params, extra, images):
        x = images[:, 0, 0].astype(jnp.int32)
        return self.table[(x[:, 0] * 2 + x[:, 1]) * 4 + x[:, 2]]


class _Writer:
    def __init__(self):
        self.images = {}

    def write_image(self, step, name, image):
        self.images[name] = np.asarray(image)


def _config(tokenizer="bytes", **ev):
    tok = dict(context_length=40, tokenizer=tokenizer)
    if tokenizer == "words":
        tok["vocab_size"] = 2048
    return ml_collections.ConfigDict(dict(
        seed=0, batch_size=8, eval_every=0, eval_at_start=True, sharding="fsdp",
        mesh=dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1),
        objective=dict(name="fake_captioner"),
        data=dict(name="captest", data_dir="", pp_eval="keep('image', 'label')", tokenize=tok),
        evals=dict(cap=dict(type="captioning", **ev))))


def _evaluate(config, objective, devices=None):
    mesh = mesh_lib.make_mesh(config.mesh, devices or jax.devices())
    evaluator = Evaluator(config, objective, mesh, rules_lib.get_rules(config.sharding))
    writer = _Writer()
    state = types.SimpleNamespace(params={}, extra={})
    metrics = evaluator.run(["cap"], state, writer, 3)
    return metrics, evaluator.evaluators["cap"], writer


@pytest.mark.parametrize("tokenizer", ["bytes", "words"])
def test_perfect_captions_beat_the_nearest_neighbour_baseline(tokenizer):
    config = _config(tokenizer, examples=20, train_examples=40, show=3)
    metrics, ev, writer = _evaluate(config, FakeCaptioner(config))
    val = [_scene("validation", i) for i in range(20)]
    train = [_scene("train", j) for j in range(40)]
    refs = [[_caption(*s)] for s in val]
    # The first train image with the same colour and shape (the one-hot features tie).
    nn = [_caption(*next(t for t in train if t[:2] == s[:2])) for s in val]
    # The bytes tokenizer gives the text back as it was; 'words' lower-cases it.
    generated = [r[0] if tokenizer == "bytes" else r[0].lower() for r in refs]
    assert ev.last == dict(generated=generated, nn=nn, references=refs)
    assert metrics == {"eval/cap_cider": cap.cider_d(generated, refs),
                       "eval/cap_bleu4": cap.bleu4(generated, refs),
                       "eval/cap_nn_cider": cap.cider_d(nn, refs),
                       "eval/cap_nn_bleu4": cap.bleu4(nn, refs)}
    assert metrics["eval/cap_cider"] == pytest.approx(10.0)
    assert metrics["eval/cap_bleu4"] == pytest.approx(1.0)
    assert 0.5 < metrics["eval/cap_nn_cider"] < 9.0 and 0.2 < metrics["eval/cap_nn_bleu4"] < 0.99
    pic = writer.images["cap_examples"]
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3 and pic.shape[0] >= 3 * 64


def test_garbage_captions_score_zero():
    config = _config(examples=16, train_examples=24, show=0)
    metrics, ev, writer = _evaluate(config, FakeCaptioner(config, garbage="zzz qqq xyzzy plugh."),
                                    devices=jax.devices()[:2])
    assert ev.last["generated"] == ["zzz qqq xyzzy plugh."] * 16
    assert metrics["eval/cap_cider"] == 0.0 and metrics["eval/cap_bleu4"] < 1e-3
    assert metrics["eval/cap_nn_cider"] > 1.0
    assert writer.images == {}


def test_missing_caption_hook_is_a_one_line_config_error():
    config = _config()
    objective = FakeCaptioner(config)
    objective.caption = None
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    with pytest.raises(ConfigError) as e:
        validate.check_evals(config, objective, mesh)
    assert str(e.value) == ("config.evals.cap: objective 'fake_captioner' has no caption hook "
                            "(caption(params, extra, images) -> token ids).")


@pytest.mark.parametrize("tokenizer, ev, expected", [
    ("bytes", dict(show=-1), "config.evals.cap.show=-1; it must be an integer >= 0 (0: no picture)."),
    ("bytes", dict(vocabulary="shapes"), "config.evals.cap.vocabulary: only the 'words' tokenizer needs one"),
    ("words", dict(vocabulary="coco"), "config.evals.cap.vocabulary='coco'; it must be 'shapes' or a"),
    ("words", dict(vocabulary=["red", "circle"]), None),
])
def test_bad_options_are_one_line_config_errors(tokenizer, ev, expected):
    config = _config(tokenizer, **ev)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    if expected is None:  # a valid list of words
        validate.check_evals(config, FakeCaptioner(config), mesh)
        return
    with pytest.raises(ConfigError) as e:
        validate.check_evals(config, FakeCaptioner(config), mesh)
    assert "\n" not in str(e.value) and str(e.value).startswith(expected), str(e.value)
