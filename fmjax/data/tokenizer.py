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
  vocabularies), and ``decode`` can only show bucket ids.
* :class:`ClipBpeTokenizer` (``"clip_bpe"``): OpenAI CLIP's SimpleTokenizer
  byte-pair encoding read from ``bpe_simple_vocab_16e6.txt.gz``; ids match
  OpenAI's ``SimpleTokenizer`` and transformers' ``CLIPTokenizer`` for the same
  vocabulary (49408 for the default file). Padding uses 0 like open_clip
  (id 0 is also the token ``"!"``; rows are delimited by ``eot``).

Both are picklable (grain worker processes).
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
TOKENIZER_NAMES = ("bytes", "words", "clip_bpe")
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_CACHE_LIMIT = 100_000
_WORD_PATTERN = re.compile(r"[^\W_]+|[^\w\s]")


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


class WordHashTokenizer(Tokenizer):
    """Hashed word tokenizer needing no files (see the module docstring)."""

    def __init__(self, vocab_size: int = 4096):
        if int(vocab_size) < 4:
            raise ValueError(f"WordHashTokenizer needs vocab_size >= 4, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1

    def _encode(self, text: str) -> List[int]:
        words = _WORD_PATTERN.findall(unicodedata.normalize("NFC", text).lower())
        return [1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 3) for w in words]

    def _decode(self, ids: List[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)

    def __repr__(self) -> str:
        return f"WordHashTokenizer(vocab_size={self.vocab_size})"


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
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
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
        out = " ".join(word)
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


def get_tokenizer(name: str = "bytes", bpe_path: Optional[str] = None,
                  vocab_size: Optional[int] = None, **kwargs) -> Tokenizer:
    """Tokenizer by name: ``'bytes'`` (default, no files), ``'words'`` (no files; its
    ``vocab_size``, default 4096) or ``'clip_bpe'``.

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
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
