"""Captioning quality: CIDEr-D and BLEU-4 of generated captions, beside a nearest-neighbour
caption baseline (issue 20; CoCa's gate is a CIDEr above the baseline's).

The metrics are those of the COCO caption evaluation, in pure Python (no Java):

``bleu4``: corpus BLEU-4 as pycocoevalcap's ``Bleu(4)`` (``bleu/bleu_scorer.py``,
``compute_score(option='closest')``). Over all images i, with c_i the candidate and R_i its
references (token lists)::

    correct_n = sum_i sum_{g n-gram of c_i} min(count(g, c_i), max_{r in R_i} count(g, r))
    guess_n   = sum_i max(0, |c_i| - n + 1)
    p_n       = (correct_n + 1e-15) / (guess_n + 1e-9)
    c = sum_i |c_i|,   r = sum_i |r*_i|  (r*_i: the reference of R_i closest in length to
                                          c_i, the shorter one on a tie)
    BLEU-4    = (p_1 p_2 p_3 p_4) ** (1/4) * (exp(1 - (r + 1e-9) / (c + 1e-15)) if c < r else 1)

``cider_d``: CIDEr-D (Vedantam et al. 2015) as vrama91's ``CiderD`` (``pyciderevalcap/ciderD/
ciderD_scorer.py``, n=4, sigma=6, ``df='corpus'``): document frequencies come from the
references of the evaluated set. With N images and df(g) the number of images whose
references hold the n-gram g, a sentence s is, per n, the tf-idf vector::

    v_n(s)[g] = count(g, s) * (log N - log max(1, df(g)))     (g an n-gram of s)

and, with l(s) the number of bigrams of s (``len(s) - 1``, 0 when empty: upstream's
``length`` counts the n == 1 index, i.e. bigrams; it differs from the word count only
against an empty sentence)::

    sim_n(c, s) = exp(-(l(c) - l(s))**2 / (2 sigma**2))
                  * sum_g min(v_n(c)[g], v_n(s)[g]) * v_n(s)[g] / (|v_n(c)| |v_n(s)|)
                  (not divided when a norm is 0)
    CIDEr-D(c_i, R_i) = 10 * mean_{n=1..4} (1/|R_i|) sum_{s in R_i} sim_n(c_i, s)
    cider_d = mean_i CIDEr-D(c_i, R_i)

A candidate equal to its single reference scores 10 * (the fraction of n = 1..4 for which
its tf-idf vector is not zero), e.g. 10 for captions of 4 words or more, 7.5 for three;
n-grams in every image's references weigh 0 (so a one-image set scores 0).

Tokenisation: pycocoevalcap runs Stanford's PTB tokenizer (``-lowerCase``, Java) and drops
the punctuation tokens; ``tokenize_caption`` stands in for it without Java: lower-case, the
words are the runs of letters and digits (joined across an inner ``'`` or ``-``), every other
character separates words and is dropped. On the shapes captions (letters, spaces, ``.``,
``,``, ``:``) the two agree; elsewhere PTB differs in splitting clitics ("don't" ->
"do n't") and keeping symbols such as ``&``, ``$``, ``%`` as tokens.

The ``captioning`` eval type scores the objective's ``caption`` hook on the first
``examples`` images of ``split`` against their raw ``caption`` strings (see
``CaptioningEvaluator``).
"""
from __future__ import annotations

import collections
import logging
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.data import pipeline
from fmjax.errors import ConfigError
from fmjax.evals import common, registry

CAPTION_KEY = "caption"
_REFS_KEY = "_references"   # the raw captions, carried through the eval pipeline
_SEP = "\x1e"               # joins an image's references into one string (ASCII record separator)
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
N, SIGMA = 4, 6.0


# -- metrics ----------------------------------------------------------------------------------
def tokenize_caption(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation dropped (the PTB tokenizer's stand-in; see the
    module docstring)."""
    return _WORD.findall(str(text).lower())


def _ngrams(words: Sequence[str], n: int = N) -> collections.Counter:
    """Counts of the 1..n-grams of ``words`` (tuples), in upstream's order (by n, then start)."""
    counts = collections.Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _pairs(candidates, references) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenised candidates and references; ValueErrors for mismatched or empty inputs."""
    candidates, references = list(candidates), list(references)
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists.")
    if not candidates:
        raise ValueError("no candidate captions to score.")
    refs = []
    for i, r in enumerate(references):
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise ValueError(f"image {i} has no reference caption.")
        refs.append([tokenize_caption(s) for s in r])
    return [tokenize_caption(c) for c in candidates], refs


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of ``candidates[i]`` against ``references[i]`` (a list of strings, or one
    string), as pycocoevalcap's ``Bleu(4)`` (see the module docstring)."""
    cands, refs = _pairs(candidates, references)
    small, tiny = 1e-9, 1e-15
    testlen = reflen = 0
    guess, correct = [0] * N, [0] * N
    for words, ref_words in zip(cands, refs):
        maxcounts: dict = {}
        for r in ref_words:
            for g, count in _ngrams(r).items():
                maxcounts[g] = max(maxcounts.get(g, 0), count)
        testlen += len(words)
        reflen += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for k in range(1, N + 1):
            guess[k - 1] += max(0, len(words) - k + 1)
        for g, count in _ngrams(words).items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), count)
    score = 1.0
    for k in range(N):
        score *= float(correct[k] + tiny) / (guess[k] + small)
    score = score ** (1.0 / N)
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return float(score)


def cider_d_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   sigma: float = SIGMA) -> np.ndarray:
    """Per-image CIDEr-D of ``candidates[i]`` against ``references[i]`` (document frequencies
    from all the references given), as vrama91's ``CiderD`` (see the module docstring)."""
    cands, refs = _pairs(candidates, references)
    cand_counts = [_ngrams(w) for w in cands]
    ref_counts = [[_ngrams(r) for r in rs] for rs in refs]
    df = collections.Counter()
    for rs in ref_counts:
        df.update({g for r in rs for g in r})
    ref_len = np.log(float(len(ref_counts)))

    def vec(counts):
        v, norm, length = [{} for _ in range(N)], [0.0] * N, 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (ref_len - np.log(max(1.0, float(df.get(g, 0)))))
            norm[k] += pow(v[k][g], 2)
            if k == 1:  # upstream's length: the bigram count
                length += tf
        return v, [np.sqrt(x) for x in norm], length

    scores = []
    for counts, rs in zip(cand_counts, ref_counts):
        v_c, norm_c, len_c = vec(counts)
        score = np.zeros(N)
        for r in rs:
            v_r, norm_r, len_r = vec(r)
            delta = float(len_c - len_r)
            val = np.zeros(N)
            for k in range(N):
                for g, x in v_c[k].items():
                    y = v_r[k].get(g, 0.0)
                    val[k] += min(x, y) * y
                if norm_c[k] != 0 and norm_r[k] != 0:
                    val[k] /= norm_c[k] * norm_r[k]
                val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
            score += val
        scores.append(np.mean(score) / len(rs) * 10.0)
    return np.array(scores, np.float64)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]],
            sigma: float = SIGMA) -> float:
    """Corpus CIDEr-D: the mean of ``cider_d_scores`` (see the module docstring)."""
    return float(np.mean(cider_d_scores(candidates, references, sigma)))


def nearest_neighbours(queries: np.ndarray, keys: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query row, the index of the most cosine-similar key row (ties: the lowest)."""
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    q, k = unit(queries), unit(keys)
    if not len(k):
        raise ValueError("nearest_neighbours needs at least one key.")
    out = [np.argmax(q[i:i + chunk] @ k.T, axis=1) for i in range(0, len(q), chunk)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


# -- text through the pipeline ----------------------------------------------------------------
def reference_list(value) -> list[str]:
    """An example's ``caption``: one string (bytes decoded) or a sequence of them -> list."""
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        values = [value]
    else:
        values = list(np.asarray(value, dtype=object).reshape(-1))
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class WithReferences:
    """The eval pipeline, plus the example's raw ``caption`` (before any op) as one string
    (several references joined by ``_SEP``) under ``_references``. Picklable."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, example, rng):
        refs = _SEP.join(reference_list(example[CAPTION_KEY]))
        out = dict(self.transform(example, rng))
        out[_REFS_KEY] = refs
        return out


def _gather_texts(texts: list[str]) -> list[str]:
    """Every process's ``texts`` (one global batch's share), concatenated in process order."""
    if jax.process_count() == 1:
        return texts
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    data = [t.encode("utf-8") for t in texts]
    width = int(gather(np.array([max(map(len, data), default=0)], np.int32)).max())
    arr = np.zeros((len(data), max(width, 1)), np.uint8)
    for i, d in enumerate(data):
        arr[i, :len(d)] = np.frombuffer(d, np.uint8)
    arr, lens = gather(arr), gather(np.array([len(d) for d in data], np.int32))
    return [bytes(a[:n]).decode("utf-8") for a, n in zip(arr, lens)]


def caption_tokenizer(config, vocabulary=None):
    """The tokenizer of ``config.data.tokenize`` (default 'bytes'), able to decode: the
    'words' tokenizer gets ``vocabulary`` (default ``'shapes'``) to map buckets to words."""
    from fmjax.data.text_ops import tokenize
    from fmjax.data.tokenizer import WordHashTokenizer
    tok = tokenize(**dict(config.data.get("tokenize") or {})).tokenizer
    if isinstance(tok, WordHashTokenizer) and tok.vocabulary is None:
        tok = WordHashTokenizer(tok.vocab_size, vocabulary=vocabulary or "shapes")
    return tok


# -- the example picture ----------------------------------------------------------------------
def caption_picture(images: Sequence[np.ndarray], texts: Sequence[Sequence[str]],
                    size: int = 64, max_chars: int = 120) -> np.ndarray:
    """uint8 HxWx3 picture: one row per example, its image (resized to ``size``) then its
    lines of text (each cut to ``max_chars``), black on white."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    pad, line_h = 4, 16
    rows = [[t if len(t) <= max_chars else t[:max_chars - 1] + "\u2026" for t in lines]
            for lines in texts]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((measure.textlength(t, font=font) for lines in rows for t in lines), default=0)
    row_h = max(size, max((len(lines) for lines in rows), default=0) * line_h)
    width = int(size + 3 * pad + text_w + 1)
    canvas = Image.new("RGB", (width, pad + len(rows) * (row_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (img, lines) in enumerate(zip(images, rows)):
        y = pad + i * (row_h + pad)
        pic = np.asarray(img)
        pic = Image.fromarray(pic[..., 0] if pic.ndim == 3 and pic.shape[-1] == 1 else pic)
        canvas.paste(pic.convert("RGB").resize((size, size), Image.NEAREST), (pad, y))
        for j, t in enumerate(lines):
            draw.text((size + 2 * pad, y + j * line_h), t, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, np.uint8)


# -- the eval type ----------------------------------------------------------------------------
@registry.register("captioning")
class CaptioningEvaluator(common.Evaluator):
    """``eval/<name>_cider`` / ``_bleu4``: CIDEr-D and BLEU-4 (module docstring) of the
    objective's ``caption(params, extra, images) -> int (B, L)`` (greedy token ids after the
    start token, ending at the end-of-text token or padded), decoded with the tokenizer of
    ``config.data.tokenize``, against the raw ``caption`` of each of the first ``examples``
    images of ``split`` (a string or a list of reference strings; the pipeline ``pp`` only
    makes the images). ``_nn_cider`` / ``_nn_bleu4``: the same for the baseline that gives
    each image the (first) caption of its nearest ``train_split`` image (of the first
    ``train_examples``), by the cosine similarity of the objective's ``features``.

    ``vocabulary``: the 'words' tokenizer's decode vocabulary, ``'shapes'`` (default) or a
    list of words. ``show``: the first N images (default 8; 0: none) with the model's, the
    baseline's and the reference captions go to ``DIR/images/<name>_examples_<step>.png``
    (and TensorBoard); the first 4 are logged at INFO.
    """

    fields = ("vocabulary", "show")
    train_side = True
    requires = {"caption": "caption hook (caption(params, extra, images) -> token ids)",
                "features": "features hook (image embeddings, for the nearest-neighbour baseline)"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "show" in ev:
            common.check_int(where, "show", ev["show"], 0, " (0: no picture)")
        vocab = ev.get("vocabulary")
        if vocab is not None:
            name = dict(config.data.get("tokenize") or {}).get("tokenizer", "bytes")
            if name != "words":
                raise ConfigError(f"{where}.vocabulary: only the 'words' tokenizer needs one "
                                  f"(config.data.tokenize.tokenizer={name!r}); drop it.")
            ok = vocab == "shapes" or (not isinstance(vocab, str) and len(vocab) > 0
                                       and all(isinstance(w, str) and w for w in vocab))
            if not ok:
                raise ConfigError(f"{where}.vocabulary={vocab!r}; it must be 'shapes' or a "
                                  "non-empty list of words.")

    @classmethod
    def check_data(cls, name, ev, config):
        super().check_data(name, ev, config)
        try:
            caption_tokenizer(config, ev.get("vocabulary"))
        except (ValueError, TypeError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"config.data.tokenize: {' '.join(str(e).split())}") from None

    def __init__(self, name, ev, ctx):
        super().__init__(name, ev, ctx)
        self._tokenizer = None
        self.last: dict = {}  # the last run's captions: generated, nn, references (lists)

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = caption_tokenizer(self.ctx.config, self.ev.get("vocabulary"))
        return self._tokenizer

    def generate(self, state) -> tuple[np.ndarray, list[list[str]]]:
        """(generated ids [N, L], reference captions [N]) over the eval split, in order."""
        source = self.source()
        if CAPTION_KEY not in source[0]:
            raise ConfigError(f"{self.where}: the examples of {self.dataset!r} {self.split!r} have no "
                              f"{CAPTION_KEY!r} (keys: {sorted(source[0])}); captioning needs "
                              "an image-caption dataset.")
        ctx, multi = self.ctx, jax.process_count() > 1
        caption_fn = ctx.jit("caption")
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        it = pipeline.make_eval_iterator(source, global_batch_size=self.batch_size,
                                         transform=WithReferences(self.transform), pp_key=self.pp_key)
        ids, refs = [], []
        with ctx.scope():
            for local in it:
                valid = np.asarray(local.pop("_valid"))
                texts = _gather_texts([str(t) for t in np.asarray(local.pop(_REFS_KEY)).reshape(-1)])
                image = np.asarray(local["image"])
                image = image.astype(jax.dtypes.canonicalize_dtype(image.dtype))
                batch = pipeline.global_batch({"image": image}, ctx.mesh)
                out = gather(caption_fn(state.params, state.extra, batch["image"]))
                if out.ndim != 2 or out.dtype.kind not in "iu":
                    raise ValueError(f"the objective's caption hook gave {out.dtype} {out.shape}; it "
                                     "must give integer token ids (B, L).")
                v = gather(valid) if multi else valid
                ids.append(out[v])
                refs += [t.split(_SEP) for t, keep in zip(texts, v) if keep]
        return np.concatenate(ids), refs

    def run(self, state, step, writer):
        tok = self.tokenizer()
        ids, refs = self.generate(state)
        generated = [tok.decode(row) for row in ids]
        feats, _ = self.features(state)
        train_feats, _ = self.features(state, train=True)
        if len(feats) != len(refs):
            raise ValueError(f"{len(feats)} image features for {len(refs)} captions of {self.split!r}.")
        nn = nearest_neighbours(feats, train_feats, chunk=max(1, int(self.batch_size)))
        train = self.source(train=True)
        nn_text = {j: reference_list(train[j][CAPTION_KEY])[0] for j in sorted(set(nn.tolist()))}
        baseline = [nn_text[j] for j in nn.tolist()]
        self.last = dict(generated=generated, nn=baseline, references=refs)
        out = {"cider": cider_d(generated, refs), "bleu4": bleu4(generated, refs),
               "nn_cider": cider_d(baseline, refs), "nn_bleu4": bleu4(baseline, refs)}
        log = logging.getLogger(__name__)
        for i in range(min(4, len(generated))):
            log.info("%s step %d image %d: %r (nn: %r; reference: %r)", self.name, int(step), i,
                     generated[i], baseline[i], refs[i][0])
        show = min(int(self.ev.get("show", 8)), len(generated))
        if show:
            source = self.source()
            images = [source[i]["image"] for i in range(show)]
            texts = [[f"model: {generated[i]}", f"nn: {baseline[i]}",
                      f"reference: {' | '.join(refs[i])}"] for i in range(show)]
            writer.write_image(step, f"{self.name}_examples", caption_picture(images, texts))
        return out
