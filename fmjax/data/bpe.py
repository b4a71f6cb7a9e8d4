"""Byte-pair encoders: OpenAI CLIP's ``SimpleTokenizer`` (:class:`ClipBpeTokenizer`,
``'clip_bpe'``) and GPT-2's byte-level BPE (:class:`Gpt2BpeTokenizer`, ``'gpt2_bpe'``).
The interface is ``fmjax.data.tokenizer_base``'s; ``fmjax.data.tokenizer`` (the other
tokenizers and ``get_tokenizer``) re-exports these; see its docstring for the id layouts.
"""
import functools
import gzip
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from fmjax.data.tokenizer_base import (_CACHE_LIMIT, _CLIP_PATTERN, _GPT2_PATTERN, BPE_URL,
                                  DEFAULT_NUM_MERGES, EOT_TEXT, SOT_TEXT, Tokenizer, basic_clean,
                                  bytes_to_unicode, whitespace_clean)


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
