"""Text tokenizers for CLIP-style image-text training.

Three tokenizers share one interface (:class:`Tokenizer`)::

    tok = get_tokenizer("bytes")                       # offline, no files
    tok = get_tokenizer("clip_bpe", bpe_path=".../bpe_simple_vocab_16e6.txt.gz")
    ids = tok.encode("a red circle")                   # list[int], no specials
    batch = tok(["a red circle", "a blue square"])     # int32 [2, 77]
    text = tok.decode(batch[0])                        # "a red circle"

``tok(texts, context_length=77)`` lays out each row as
``[sot] + encode(text) + [eot]`` followed by zero padding. Rows that are too
long are cut to ``context_length`` with ``eot`` forced into the last slot, as
open_clip's ``tokenize(..., truncate=True)`` does. In every tokenizer ``eot``
is the largest id, so text towers may pool at ``argmax(ids)`` like CLIP.

An empty or whitespace-only caption raises ``ValueError``; callers add the
file/line context.

* :class:`ByteTokenizer` (the default, ``"bytes"``): UTF-8 bytes.
  pad = 0, byte ``b`` -> ``b + 1``, sot = 257, eot = 258, vocab_size 259.
* :class:`WordHashTokenizer` (``"words"``): lowercased words and punctuation marks,
  each hashed (CRC-32, stable across hosts and runs) into ``vocab_size - 3``
  buckets: pad 0, words 1..vocab_size-3, sot vocab_size-2, eot vocab_size-1.
  No files and one token per word (a small text tower learns words much faster
  than from bytes); distinct words may share a bucket (rare for small
  vocabularies). ``decode`` needs a ``vocabulary`` (a list of words, or
  ``"shapes"``: every word of the fmjax_shapes captions) to map buckets back to
  words (ValueError if two of its words share a bucket); ids outside it decode
  as ``<id>``. With the vocabulary, ``decode(encode(c)) == c.lower()`` for
  captions whose punctuation follows a word without a space (the shapes captions).
* :class:`ClipBpeTokenizer` (``"clip_bpe"``): OpenAI CLIP's SimpleTokenizer
  byte-pair encoding read from ``bpe_simple_vocab_16e6.txt.gz``; ids match
  OpenAI's ``SimpleTokenizer`` and transformers' ``CLIPTokenizer`` for the same
  vocabulary (49408 for the default file). Padding uses 0 like open_clip
  (id 0 is also the token ``"!"``; rows are delimited by ``eot``).
* :class:`Gpt2BpeTokenizer` (``"gpt2_bpe"``): GPT-2's byte-level BPE from a
  user's ``vocab.json`` + ``merges.txt`` (``bpe_path``: their directory; nothing
  is downloaded). Ids match transformers' ``GPT2Tokenizer`` for the same files;
  no cleaning or lowercasing, so ``decode(encode(text)) == text``. sot and eot
  are both ``<|endoftext|>``; padding uses 0 (recognized only after eot).

All are picklable (grain worker processes).
"""
import functools
import gzip
import html
import os
import re
import unicodedata
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's SimpleTokenizer keeps merges[1:49152 - 256 - 2 + 1] (line 0 is a header).
DEFAULT_NUM_MERGES = 49152 - 256 - 2
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
BPE_URL = ("https://github.com/openai/CLIP/raw/main/clip/"
           "bpe_simple_vocab_16e6.txt.gz")
TOKENIZER_NAMES = ("bytes", "words", "clip_bpe", "gpt2_bpe")
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_CACHE_LIMIT = 100_000
_WORD_PATTERN = re.compile(r"[^\W_]+|[^\w\s]")
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """OpenAI/GPT-2's reversible byte -> printable unicode character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def whitespace_clean(text: str) -> str:
    """Collapses runs of whitespace to one space and strips the ends."""
    return " ".join(text.split())


def basic_clean(text: str) -> str:
    """OpenAI's cleaning: ftfy (when installed) or NFC, then html unescape."""
    try:
        import ftfy  # optional; without it we apply NFC as ftfy would
        text = ftfy.fix_text(text)
    except ImportError:
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _check_text(text) -> None:
    """Raises on non-strings and empty / whitespace-only captions."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise ValueError(f"empty or whitespace-only caption: {text!r}")


class Tokenizer:
    """Shared interface: ``encode``, ``decode``, ``__call__`` and special ids.

    Subclasses implement ``_encode(text) -> list[int]`` (no special tokens)
    and ``_decode(ids) -> str`` (ids without specials), and set
    ``vocab_size``, ``sot_token_id``, ``eot_token_id``.
    """

    pad_token_id = 0
    vocab_size: int
    sot_token_id: int
    eot_token_id: int

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without sot/eot; ValueError if it is empty."""
        _check_text(text)
        ids = self._encode(text)
        if not ids:
            raise ValueError(f"caption has no tokens after cleaning: {text!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: drops sot/pad, stops at the first eot."""
        body = []
        for i in np.asarray(list(ids)).reshape(-1).tolist():
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id or self._is_pad(i):
                continue
            body.append(int(i))
        return self._decode(body)

    def _is_pad(self, i: int) -> bool:
        """Whether ``i`` is skipped as padding by :meth:`decode`."""
        return i == self.pad_token_id

    def __call__(self, texts: Union[str, Sequence[str]],
                 context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """int32 ``[N, context_length]``: sot + tokens + eot, zero padded.

        Too-long rows are truncated with eot kept as the last token.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        out = np.full((len(texts), context_length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = ids
        return out

    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def _decode(self, ids: List[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer needing no files: pad 0, bytes 1..256, sot 257, eot 258.

    Text is NFC-normalized and its whitespace collapsed; with ``lowercase``
    it is also lowercased. Ids are deterministic across hosts and versions.
    """

    vocab_size = 259
    sot_token_id = 257
    eot_token_id = 258

    def __init__(self, lowercase: bool = False):
        self.lowercase = bool(lowercase)

    def _encode(self, text: str) -> List[int]:
        text = whitespace_clean(unicodedata.normalize("NFC", text))
        if self.lowercase:
            text = text.lower()
        return [b + 1 for b in text.encode("utf-8")]

    def _decode(self, ids: List[int]) -> str:
        data = bytes(i - 1 for i in ids if 1 <= i <= 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(lowercase={self.lowercase})"


def shapes_vocabulary() -> Tuple[str, ...]:
    """Every word and punctuation mark of the fmjax_shapes captions and zero-shot prompts
    (sorted), for ``WordHashTokenizer(vocabulary=...)``."""
    from fmjax.data import shapes  # lazy: imports tensorflow_datasets
    words = set(shapes.CLASS_NAMES + shapes.COLOR_NAMES + shapes.SIZE_NAMES)
    for text in (shapes.CAPTION_TEMPLATES + shapes.ZERO_SHOT_TEMPLATES
                 + tuple(shapes._WHERE) + tuple(shapes._NUMBER_WORDS.values())):
        words |= set(_WORD_PATTERN.findall(re.sub(r"{\w*}", " ", text).lower()))
    # _relation's phrases and _a_an's article
    words |= {"on", "the", "left", "right", "of", "above", "below", "an"}
    return tuple(sorted(words))


class WordHashTokenizer(Tokenizer):
    """Hashed word tokenizer needing no files (see the module docstring).

    ``vocabulary``: None, ``"shapes"`` (``shapes_vocabulary()``) or a sequence of words; it only
    serves ``decode`` (ids do not depend on it)."""

    def __init__(self, vocab_size: int = 4096, vocabulary=None):
        if int(vocab_size) < 4:
            raise ValueError(f"WordHashTokenizer needs vocab_size >= 4, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1
        if isinstance(vocabulary, str):
            if vocabulary != "shapes":
                raise ValueError(f"vocabulary={vocabulary!r}: use 'shapes' or a list of words.")
            vocabulary = shapes_vocabulary()
        self.vocabulary = None if vocabulary is None else tuple(vocabulary)
        self._words: Dict[int, str] = {}
        for word in self.vocabulary or ():
            word = unicodedata.normalize("NFC", str(word)).lower()
            i = self._hash(word)
            if self._words.get(i, word) != word:
                raise ValueError(
                    f"vocabulary words {self._words[i]!r} and {word!r} share bucket {i} of "
                    f"vocab_size={self.vocab_size}; decode could not tell them apart. "
                    "Pick another vocab_size.")
            self._words[i] = word

    def _hash(self, word: str) -> int:
        return 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

    def _encode(self, text: str) -> List[int]:
        words = _WORD_PATTERN.findall(unicodedata.normalize("NFC", text).lower())
        return [self._hash(w) for w in words]

    def _decode(self, ids: List[int]) -> str:
        out = []
        for i in ids:
            word = self._words.get(i, f"<{i}>")
            if out and _WORD_PATTERN.fullmatch(word) and not word[0].isalnum():
                out[-1] += word          # punctuation follows its word without a space
            else:
                out.append(word)
        return " ".join(out)

    def __repr__(self) -> str:
        if self.vocabulary is None:
            return f"WordHashTokenizer(vocab_size={self.vocab_size})"
        return f"WordHashTokenizer(vocab_size={self.vocab_size}, vocabulary_words={len(self.vocabulary)})"


def read_bpe_merges(bpe_path: str, max_merges: Optional[int] = DEFAULT_NUM_MERGES
                    ) -> List[Tuple[str, str]]:
    """Merges from an OpenAI ``bpe_simple_vocab_16e6.txt.gz``-format file.

    The file is gzip'd UTF-8 text: a header line, then one ``"a b"`` merge per
    line. Like OpenAI we keep ``lines[1:max_merges + 1]``; a smaller file
    (e.g. a synthetic one in tests) keeps all of its merges. Blank lines are
    ignored. ``max_merges=None`` keeps every merge.
    """
    path = os.fspath(bpe_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {path!r}. Download "
            f"bpe_simple_vocab_16e6.txt.gz from {BPE_URL} (it also ships inside "
            "the open_clip and openai-clip pip packages) and point "
            "config.data.tokenize.bpe_path at it, or use the 'bytes' tokenizer.")
    stat = os.stat(path)  # the cache key: a changed file is read again
    return list(_read_merges(os.path.abspath(path), max_merges, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_merges(path: str, max_merges: Optional[int], mtime_ns: int, size: int
                 ) -> Tuple[Tuple[str, str], ...]:
    """Parses the merges file once per (path, version): the config check, the input
    pipeline and the zero-shot eval each build the tokenizer."""
    del mtime_ns, size
    with gzip.open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    lines = [ln for ln in lines[1:] if ln.strip()]
    if max_merges is not None:
        lines = lines[:max_merges]
    merges = []
    for n, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


def _get_pairs(word: Tuple[str, ...]) -> set:
    """Adjacent symbol pairs of ``word``."""
    return set(zip(word[:-1], word[1:]))


def _merge(word: Tuple[str, ...], bpe_ranks: Dict[Tuple[str, str], int]) -> Tuple[str, ...]:
    """Applies the BPE merges to the symbols of ``word``, lowest rank first (OpenAI's loop,
    shared by CLIP's and GPT-2's tokenizers)."""
    pairs = _get_pairs(word)
    while pairs:
        bigram = min(pairs, key=lambda p: bpe_ranks.get(p, float("inf")))
        if bigram not in bpe_ranks:
            break
        first, second = bigram
        new_word = []
        i = 0
        while i < len(word):
            try:
                j = word.index(first, i)
            except ValueError:
                new_word.extend(word[i:])
                break
            new_word.extend(word[i:j])
            i = j
            if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(word[i])
                i += 1
        word = tuple(new_word)
        if len(word) == 1:
            break
        pairs = _get_pairs(word)
    return word


class ClipBpeTokenizer(Tokenizer):
    """OpenAI CLIP ``SimpleTokenizer``-compatible BPE tokenizer.

    Vocabulary: the 256 byte-unicode characters, their ``</w>`` variants, one
    entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (so eot is
    the last id: 49407 for the default file). Cleaning: ftfy if installed
    (else NFC), html unescape, whitespace collapse, lowercase. ``ftfy`` only
    changes ids for mojibake-like input.

    Args:
        bpe_path: the ``bpe_simple_vocab_16e6.txt.gz``-format merges file.
        max_merges: merges to keep; OpenAI's default is 48894. A file with
            fewer keeps all of its merges (vocab_size = 512 + merges + 2).
    """

    def __init__(self, bpe_path: str, max_merges: Optional[int] = DEFAULT_NUM_MERGES):
        self.bpe_path = os.fspath(bpe_path)
        self._build(read_bpe_merges(self.bpe_path, max_merges))

    def _build(self, merges: List[Tuple[str, str]]) -> None:
        """Builds encoder/decoder tables from the merge list."""
        import regex
        self.merges = merges
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend([SOT_TEXT, EOT_TEXT])
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[SOT_TEXT]
        self.eot_token_id = self.encoder[EOT_TEXT]
        self.cache = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}
        self.pat = regex.compile(_CLIP_PATTERN, regex.IGNORECASE)

    def __getstate__(self) -> dict:
        """Pickles only the merges; tables and the regex are rebuilt."""
        return {"bpe_path": self.bpe_path, "merges": self.merges}

    def __setstate__(self, state: dict) -> None:
        self.bpe_path = state["bpe_path"]
        self._build(state["merges"])

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one pre-token (byte-unicode text)."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if not _get_pairs(word):
            return token + "</w>"
        out = " ".join(_merge(word, self.bpe_ranks))
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}
        self.cache[token] = out
        return out

    def _encode(self, text: str) -> List[int]:
        text = whitespace_clean(basic_clean(text)).lower()
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def _is_pad(self, i: int) -> bool:
        # 0 is also the token "!", so padding is only recognized after eot.
        return False

    def _decode(self, ids: List[int]) -> str:
        # As OpenAI: bytes back to text, then each "</w>" word end -> space.
        text = "".join(self.decoder[i] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __repr__(self) -> str:
        return f"ClipBpeTokenizer({self.bpe_path!r}, vocab_size={self.vocab_size})"


class Gpt2BpeTokenizer(Tokenizer):
    """GPT-2's byte-level BPE (transformers' ``GPT2Tokenizer``) from a user's files.

    Args:
        vocab_file: ``vocab.json``, {token: id} (byte-unicode tokens, with ``<|endoftext|>``).
        merges_file: ``merges.txt``, one ``"a b"`` merge per line, rank = line order; a
            ``#version`` header line and blank lines are skipped.
        eos_token: the sot / eot token (GPT-2 uses one for both).
    """

    def __init__(self, vocab_file: str, merges_file: str, eos_token: str = EOT_TEXT):
        import json
        for path in (vocab_file, merges_file):
            if not os.path.isfile(os.fspath(path)):
                raise FileNotFoundError(
                    f"GPT-2 BPE file not found: {os.fspath(path)!r}; the 'gpt2_bpe' tokenizer needs "
                    "vocab.json and merges.txt (set config.data.tokenize.bpe_path to their directory).")
        self.vocab_file, self.merges_file = os.fspath(vocab_file), os.fspath(merges_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(self.merges_file, encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip() and not ln.startswith("#version")]
        merges = []
        for n, line in enumerate(lines, start=1):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{self.merges_file}: expected a merge 'a b', got {line!r}")
            merges.append((parts[0], parts[1]))
        if eos_token not in encoder:
            raise ValueError(f"{self.vocab_file} has no {eos_token!r} token.")
        self.eos_token = eos_token
        self._build(encoder, merges)

    def _build(self, encoder: Dict[str, int], merges: List[Tuple[str, str]]) -> None:
        import regex
        self.encoder, self.merges = dict(encoder), list(merges)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(self.merges, range(len(self.merges))))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.vocab_size = max(self.encoder.values()) + 1
        self.sot_token_id = self.eot_token_id = self.encoder[self.eos_token]
        self.cache: Dict[str, str] = {}
        self.pat = regex.compile(_GPT2_PATTERN)

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "merges_file": self.merges_file,
                "eos_token": self.eos_token, "encoder": self.encoder, "merges": self.merges}

    def __setstate__(self, state: dict) -> None:
        self.vocab_file, self.merges_file = state["vocab_file"], state["merges_file"]
        self.eos_token = state["eos_token"]
        self._build(state["encoder"], state["merges"])

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one pre-token (byte-unicode text)."""
        if token not in self.cache:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache = {}
            self.cache[token] = " ".join(_merge(tuple(token), self.bpe_ranks))
        return self.cache[token]

    def _encode(self, text: str) -> List[int]:
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            for piece in self.bpe(token).split(" "):
                if piece not in self.encoder:
                    raise ValueError(f"BPE piece {piece!r} is not in {self.vocab_file}.")
                ids.append(self.encoder[piece])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: a leading sot (= eot) is dropped, then stops at the first eot."""
        ids = np.asarray(list(ids)).reshape(-1).tolist()
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        return super().decode(ids)

    def _is_pad(self, i: int) -> bool:
        return False  # 0 is a real token ("!"); padding is only recognized after eot

    def _decode(self, ids: List[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Gpt2BpeTokenizer({self.vocab_file!r}, vocab_size={self.vocab_size})"


def get_tokenizer(name: str = "bytes", bpe_path: Optional[str] = None,
                  vocab_size: Optional[int] = None, **kwargs) -> Tokenizer:
    """Tokenizer by name: ``'bytes'`` (default, no files), ``'words'`` (no files; its
    ``vocab_size``, default 4096; ``vocabulary='shapes'`` to decode), ``'clip_bpe'`` or
    ``'gpt2_bpe'`` (``bpe_path``: the directory of ``vocab.json`` + ``merges.txt``, or the
    ``vocab_file`` / ``merges_file`` keywords).

    ``'clip_bpe'`` needs ``bpe_path`` (config key ``config.data.tokenize.bpe_path``).
    ``vocab_size`` is read by ``'words'`` only (the others have a fixed vocabulary). Extra
    keyword arguments go to the tokenizer's constructor.
    """
    if name == "bytes":
        return ByteTokenizer(**kwargs)
    if name == "words":
        return WordHashTokenizer(int(vocab_size), **kwargs) if vocab_size else WordHashTokenizer(**kwargs)
    if name == "clip_bpe":
        if not bpe_path:
            raise ValueError(
                "tokenizer 'clip_bpe' needs a BPE merges file: set "
                "config.data.tokenize.bpe_path to bpe_simple_vocab_16e6.txt.gz "
                f"(from {BPE_URL}), or use the 'bytes' tokenizer.")
        return ClipBpeTokenizer(bpe_path, **kwargs)
    if name == "gpt2_bpe":
        vocab_file, merges_file = kwargs.pop("vocab_file", None), kwargs.pop("merges_file", None)
        if bpe_path:
            vocab_file = vocab_file or os.path.join(os.fspath(bpe_path), "vocab.json")
            merges_file = merges_file or os.path.join(os.fspath(bpe_path), "merges.txt")
        if not (vocab_file and merges_file):
            raise ValueError("tokenizer 'gpt2_bpe' needs GPT-2's vocab.json and merges.txt: set "
                             "config.data.tokenize.bpe_path to their directory.")
        return Gpt2BpeTokenizer(vocab_file, merges_file, **kwargs)
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
