"""Tests for fmjax.data.tokenizer: byte and hashed-word tokenizers, CLIP BPE parity, factory."""
import collections
import gzip
import json
import os
import pickle
import re
import shutil
import zlib

import numpy as np
import pytest
import regex

from fmjax.data import tokenizer as tk

CAPTION = "a large red triangle on the left of a small blue circle"

# A tiny corpus the synthetic BPE merges are learned from (lowercased like CLIP).
CORPUS = """
a large red triangle on the left of a small blue circle.
the cat sat on the mat; the dog didn't. it's the best photo of 2024!
a photo of a dog, a photo of a cat, a photo of the sea at night.
café crème brûlée — naïve façade, 東京タワー at sunset, 🙂 emoji.
there are 3 red squares and 12 green triangles in the picture.
we're here, they've gone, i'm sure you'll see what he'd seen.
"""

CAPTIONS = [
    CAPTION,
    "The Cat sat on THE mat.",
    "a photo of a dog, a photo of a cat!!",
    "It's what we're doing; they've said I'm sure you'll and he'd.",
    "there are 3 red squares and 12 green triangles (2024)",
    "   extra    whitespace\t\tand\nnewlines   ",
    "café crème brûlée — naïve façade",
    "東京タワー at sunset 🙂🙂",
    "zebra quokka xylophone: unseen words?!",
    "numbers 1234567890 and 3.14159, $5 & 10%",
    "hyphen-ated words / slashes \\ back 'quoted' \"double\"",
    "don'T CAN'T it'S",  # contractions after lowercasing
]


def _pretokens(text):
    """CLIP pre-tokens of ``text`` as byte-unicode strings."""
    pat = regex.compile(tk._CLIP_PATTERN, regex.IGNORECASE)
    enc = tk.bytes_to_unicode()
    return ["".join(enc[b] for b in t.encode("utf-8"))
            for t in pat.findall(tk.whitespace_clean(text).lower())]


def learn_merges(corpus, num_merges):
    """Greedy BPE learner (most frequent pair; ties by pair order)."""
    words = collections.Counter(
        tuple(t[:-1]) + (t[-1] + "</w>",) for t in _pretokens(corpus))
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word[:-1], word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_words = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """Synthetic OpenAI-format merges (.txt.gz) + matching vocab.json/merges.txt."""
    d = tmp_path_factory.mktemp("bpe")
    merges = learn_merges(CORPUS, 300)
    assert len(merges) > 100
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    with gzip.open(d / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    (d / "merges.txt").write_text(text, encoding="utf-8")
    # vocab.json built independently of the module under test, OpenAI's recipe.
    vocab = list(tk.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = dict(zip(vocab, range(len(vocab))))
    (d / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    return d, merges, encoder


@pytest.fixture(scope="module")
def bpe(bpe_files):
    """ClipBpeTokenizer over the synthetic merges."""
    d, _, _ = bpe_files
    return tk.get_tokenizer("clip_bpe", bpe_path=str(d / "bpe_simple_vocab_16e6.txt.gz"))


# ------------------------------------------------------------------ bytes

def test_byte_tokenizer_layout_and_round_trip():
    tok = tk.get_tokenizer()
    assert isinstance(tok, tk.ByteTokenizer)
    assert (tok.vocab_size, tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (
        259, 0, 257, 258)
    ids = tok.encode(CAPTION)
    assert ids == [b + 1 for b in CAPTION.encode()]
    out = tok(CAPTION)
    assert out.dtype == np.int32 and out.shape == (1, 77)
    n = len(ids) + 2
    assert n <= 77
    assert out[0, 0] == tok.sot_token_id and out[0, n - 1] == tok.eot_token_id
    assert (out[0, n:] == 0).all()
    assert int(out[0].argmax()) == n - 1  # CLIP-style argmax pooling finds eot
    assert tok.decode(out[0]) == CAPTION
    for text in ["café 東京 🙂", "a\tb  c\n"]:
        assert tok.decode(tok.encode(text)) == tk.whitespace_clean(text)
    assert tk.ByteTokenizer(lowercase=True).decode(tok("ABC")[0].tolist()) == "ABC"
    assert tk.ByteTokenizer(lowercase=True).encode("ABC") == tok.encode("abc")


def test_batch_truncation_keeps_eot_last():
    tok = tk.ByteTokenizer()
    out = tok(["short", "x" * 100, CAPTION], context_length=16)
    assert out.shape == (3, 16)
    assert out[1, 0] == tok.sot_token_id and out[1, -1] == tok.eot_token_id
    assert (out[1, 1:-1] == ord("x") + 1).all()
    assert out[2, -1] == tok.eot_token_id
    assert tok.decode(out[2]) == CAPTION[:14]
    assert out[0, 6] == tok.eot_token_id and (out[0, 7:] == 0).all()
    exact = tok("x" * 14, context_length=16)[0]  # fits exactly, no padding
    assert exact[-1] == tok.eot_token_id and (exact[1:-1] != 0).all()
    assert tok([], context_length=8).shape == (0, 8)


@pytest.mark.parametrize("name", ["bytes", "clip_bpe"])
@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_caption_raises(name, text, bpe):
    tok = bpe if name == "clip_bpe" else tk.ByteTokenizer()
    with pytest.raises(ValueError, match="empty or whitespace-only caption"):
        tok([CAPTION, text])
    with pytest.raises(ValueError, match="empty"):
        tok.encode(text)
    with pytest.raises(TypeError):
        tok([None])


# ------------------------------------------------------------------ words

def test_word_hash_tokenizer_layout():
    tok = tk.get_tokenizer("words", vocab_size=512)
    assert isinstance(tok, tk.WordHashTokenizer)
    assert (tok.vocab_size, tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (512, 0, 510, 511)
    ids = tok.encode("A large red Triangle, on the left.")
    assert len(ids) == 9  # 7 words + ',' + '.'
    assert all(1 <= i <= 509 for i in ids)
    # One id per word, case-insensitive, independent of context and of the process
    # (CRC-32, not Python's salted hash): pinned values.
    assert tok.encode("red") == [ids[2]] and tok.encode("RED triangle") == ids[2:4]
    assert ids[2] == 1 + zlib.crc32(b"red") % 509
    assert tok.encode("red") != tok.encode("blue")
    out = tok(["a red circle", "x " * 40], context_length=8)
    assert out[0, 0] == tok.sot_token_id and out[0, 4] == tok.eot_token_id
    assert (out[0, 5:] == 0).all() and int(out[0].argmax()) == 4
    assert out[1, -1] == tok.eot_token_id and (out[1, 1:-1] == tok.encode("x")[0]).all()
    with pytest.raises(ValueError, match="empty"):
        tok("  ")
    with pytest.raises(ValueError, match="vocab_size >= 4"):
        tk.WordHashTokenizer(vocab_size=3)
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(CAPTIONS), tok(CAPTIONS))


def test_word_hash_tokenizer_separates_the_shapes_vocabulary(default_config):
    """The default CLIP config's buckets give every word of the shapes captions its own id
    (with 46 words, about 2 of 3 random vocab sizes near 1000 would not)."""
    config = default_config("clip")
    assert config.data.tokenize.tokenizer == "words"
    assert config.data.tokenize.vocab_size == config.model.vocab_size
    from fmjax.data import shapes
    words = set(shapes.CLASS_NAMES + shapes.COLOR_NAMES + shapes.SIZE_NAMES)
    for t in shapes.CAPTION_TEMPLATES + shapes.ZERO_SHOT_TEMPLATES:
        words |= set(re.findall(r"[a-z]+", re.sub(r"{\w*}", " ", t)))
    words |= {"left", "right", "top", "bottom", "center", "above", "below", "two", "three", "an"}
    tok = tk.WordHashTokenizer(vocab_size=config.data.tokenize.vocab_size)
    ids = {w: tok.encode(w)[0] for w in words}
    assert len(set(ids.values())) == len(words), "hash collision in the shapes vocabulary"


# ------------------------------------------------------------------ CLIP BPE

def test_bpe_vocab_layout(bpe, bpe_files):
    _, merges, encoder = bpe_files
    assert bpe.vocab_size == 512 + len(merges) + 2
    assert bpe.encoder == encoder
    assert bpe.sot_token_id == bpe.vocab_size - 2
    assert bpe.eot_token_id == bpe.vocab_size - 1
    assert bpe.pad_token_id == 0
    # Slice like OpenAI's merges[1:max_merges + 1].
    small = tk.ClipBpeTokenizer(bpe.bpe_path, max_merges=10)
    assert small.merges == merges[:10] and small.vocab_size == 524


def test_bpe_matches_transformers_clip_tokenizer(bpe, bpe_files):
    transformers = pytest.importorskip("transformers")
    d, _, encoder = bpe_files
    ref = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    assert len(ref) == len(encoder)  # the files were really loaded
    for text in CAPTIONS:
        want = ref(text)["input_ids"]
        assert [bpe.sot_token_id] + bpe.encode(text) + [bpe.eot_token_id] == want, text
        row = bpe(text, context_length=77)[0]
        assert row[:len(want)].tolist() == want and (row[len(want):] == 0).all()
        assert bpe.decode(row) == ref.decode(want, skip_special_tokens=True), text
    # Merges were really applied (not just byte fallbacks).
    assert len(bpe.encode(CAPTION)) < len(CAPTION.split()) * 2


def test_bpe_matches_transformers_on_random_text(bpe, bpe_files):
    transformers = pytest.importorskip("transformers")
    d, _, _ = bpe_files
    ref = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    alphabet = list("abcdefghilmnorsty THE'sdt.,!?-:;()0123456789  ") + list(
        "éèüñçß東京タワー🙂—\t\n")
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 40))))
        if not text.strip():
            continue
        want = ref(text)["input_ids"]
        assert [bpe.sot_token_id] + bpe.encode(text) + [bpe.eot_token_id] == want, text


def test_bpe_cleaning_and_truncation(bpe):
    assert bpe.encode("fish &amp; chips") == bpe.encode("fish & chips")
    assert bpe.encode("  The\n\nCAT ") == bpe.encode("the cat")
    assert bpe.encode("cafe\u0301") == bpe.encode("caf\u00e9")  # NFC like ftfy
    out = bpe([CAPTION], context_length=5)[0]
    assert out[0] == bpe.sot_token_id and out[-1] == bpe.eot_token_id
    assert out[1:4].tolist() == bpe.encode(CAPTION)[:3]
    # Padding zeros after eot are not decoded as "!" (also id 0).
    assert bpe.decode(bpe("hi!")[0]) == "hi !"
    assert bpe.encode("!") == [256]  # "!</w>"; bare "!" (id 0) only inside words


def test_missing_bpe_file(tmp_path):
    missing = str(tmp_path / "nope" / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError, match="nope") as e:
        tk.ClipBpeTokenizer(missing)
    assert "bpe_simple_vocab_16e6.txt.gz" in str(e.value)
    assert "config.data.tokenize.bpe_path" in str(e.value)   # the config key that exists
    with pytest.raises(ValueError, match=r"config\.data\.tokenize\.bpe_path"):
        tk.get_tokenizer("clip_bpe")


def test_bpe_merges_read_once_per_file_version(bpe_files, tmp_path):
    """The merges file is parsed once (config check, pipeline and eval all build the
    tokenizer); a rewritten file is read again."""
    path = tmp_path / "bpe.txt.gz"
    shutil.copy(bpe_files[0] / "bpe_simple_vocab_16e6.txt.gz", path)
    before = tk._read_merges.cache_info()
    first = tk.read_bpe_merges(path)
    assert tk.read_bpe_merges(str(path)) == first == list(bpe_files[1])
    info = tk._read_merges.cache_info()
    assert (info.misses, info.hits) == (before.misses + 1, before.hits + 1)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nh e\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-clock filesystem
    assert tk.read_bpe_merges(path) == [("h", "e")]


def test_factory_unknown_name():
    with pytest.raises(ValueError, match="bytes, words, clip_bpe"):
        tk.get_tokenizer("sentencepiece")


@pytest.mark.parametrize("name", ["bytes", "clip_bpe"])
def test_picklable(name, bpe):
    tok = bpe if name == "clip_bpe" else tk.ByteTokenizer(lowercase=True)
    tok(CAPTIONS)  # warm any cache first
    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is type(tok)
    np.testing.assert_array_equal(clone(CAPTIONS), tok(CAPTIONS))
    assert clone.vocab_size == tok.vocab_size
