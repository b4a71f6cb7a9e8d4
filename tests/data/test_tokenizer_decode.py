"""Tokenizers that decode (issue 20): the words tokenizer with the shapes vocabulary, CLIP BPE
and GPT-2 BPE (synthetic vocab.json + merges.txt, checked against transformers'
GPT2Tokenizer built from the same files) round-trip text through ids."""
import collections
import gzip
import json
import pickle

import numpy as np
import pytest
import regex

from fmjax.data import tokenizer as tk

CORPUS = """a large red triangle on the left of a small blue circle.
The cat sat on the mat; the dog didn't. It's the best photo of 2024!
a photo of a dog, a photo of a cat, a photo of the sea at night.
café crème brûlée — naïve façade, 東京タワー at sunset, 🙂 emoji.
there are 3 red squares and 12 green triangles in the picture.
We're here, they've gone, I'm sure you'll see what he'd seen.
"""
TEXTS = [
    "a large red triangle on the left of a small blue circle.",
    "The Cat sat on THE mat.",
    "  leading spaces,\ttabs\tand\nnewlines   trailing  ",
    "It's what we're doing; they've said I'm sure you'll and he'd.",
    "café crème brûlée — naïve façade 東京タワー 🙂🙂",
    "zebra quokka xylophone: unseen words?! 1234567890 $5 & 10%",
]


def _learn_merges(words, n):
    """A tiny byte-pair learner: the n most frequent adjacent pairs, merged greedily."""
    vocab = collections.Counter(tuple(w) for w in words)
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for word, c in vocab.items():
            for p in zip(word[:-1], word[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = collections.Counter()
        for word, c in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += c
        vocab = merged
    return merges


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    byte_enc = tk.bytes_to_unicode()
    pat = regex.compile(tk._GPT2_PATTERN)
    words = ["".join(byte_enc[b] for b in t.encode("utf-8")) for t in pat.findall(CORPUS)]
    merges = _learn_merges(words, 120)
    tokens = list(byte_enc.values()) + ["".join(m) for m in merges]
    tokens = list(dict.fromkeys(tokens))
    encoder = {t: i for i, t in enumerate(tokens)}
    encoder["<|endoftext|>"] = len(encoder)
    (d / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                  encoding="utf-8")
    return d, encoder, merges


def test_words_tokenizer_decodes_the_shapes_captions():
    from fmjax.data import shapes
    tok = tk.get_tokenizer("words", vocab_size=2048, vocabulary="shapes")  # configs/clip.py
    captions = [shapes.make_caption(shapes._sample_scene(i, "train")["objects"],
                                    shapes._sample_scene(i, "train")["caption_seed"])
                for i in range(200)]
    captions += [t.format(name) for t in shapes.ZERO_SHOT_TEMPLATES for name in shapes.CLASS_NAMES]
    for caption in captions:
        ids = tok([caption], 64)[0]
        assert tok.decode(ids) == caption.lower(), caption
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.decode(tok.encode(captions[0])) == captions[0]
    # ids are those of the hash tokenizer without a vocabulary; unknown words show their bucket
    plain = tk.WordHashTokenizer(2048)
    assert plain.encode(captions[0]) == tok.encode(captions[0])
    unknown = tok.decode(tok.encode("a zebra."))
    assert unknown.startswith("a <") and unknown.endswith(">.")
    # decode stops at eot and drops sot and padding
    ids = [tok.sot_token_id] + tok.encode("a red star.") + [tok.eot_token_id] + tok.encode("blue")
    assert tok.decode(ids + [0, 0]) == "a red star."
    with pytest.raises(ValueError, match="share bucket"):
        tk.WordHashTokenizer(5, vocabulary=["red", "green", "blue", "cyan"])


@pytest.fixture(scope="module")
def clip_bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    byte_enc = tk.bytes_to_unicode()
    pat = regex.compile(tk._CLIP_PATTERN, regex.IGNORECASE)
    words = []
    for t in pat.findall(tk.whitespace_clean(CORPUS).lower()):
        chars = [byte_enc[b] for b in t.encode("utf-8")]
        words.append(tuple(chars[:-1]) + (chars[-1] + "</w>",))
    merges = _learn_merges(words, 100)
    with gzip.open(d / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tk.get_tokenizer("clip_bpe", bpe_path=str(d / "bpe.txt.gz"))


def test_clip_bpe_round_trip(clip_bpe):
    for text in TEXTS:
        ids = clip_bpe([text], 128)[0]
        # CLIP cleans (whitespace collapse, lowercase); words are separated by one space and
        # punctuation tokens end words, so the decoded text has spaces around them
        want = tk.whitespace_clean(text).lower()
        got = clip_bpe.decode(ids)
        assert got.replace(" ", "") == want.replace(" ", ""), (text, got)
    assert clip_bpe.decode(clip_bpe(["a red circle"], 16)[0]) == "a red circle"


def test_gpt2_bpe_round_trip_and_transformers_parity(gpt2_files):
    d, encoder, merges = gpt2_files
    tok = tk.get_tokenizer("gpt2_bpe", bpe_path=str(d))
    assert tok.vocab_size == len(encoder) and tok.eot_token_id == encoder["<|endoftext|>"]
    assert tok.sot_token_id == tok.eot_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text             # byte-level: exact, whitespace included
        row = tok([text], 128)[0]
        assert row[0] == tok.eot_token_id and tok.decode(row) == text
    assert len(tok.encode("a photo of a cat")) < len("a photo of a cat")   # merges apply
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    ids = tok.encode("a cat") + [tok.eot_token_id] + tok.encode("dog")
    assert tok.decode(np.asarray(ids)) == "a cat"
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Tokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    for text in TEXTS + [CORPUS]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.get_tokenizer("gpt2_bpe", bpe_path=str(d / "missing"))
    with pytest.raises(ValueError, match="bpe_path"):
        tk.get_tokenizer("gpt2_bpe")
