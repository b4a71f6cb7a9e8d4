"""What every tokenizer shares (``fmjax.data.tokenizer`` documents them): the ``Tokenizer``
interface, CLIP's text cleaning and byte-to-unicode table, and the special-token constants.
``fmjax.data.tokenizer`` (byte and word tokenizers, ``get_tokenizer``) and ``fmjax.data.bpe``
(the byte-pair encoders) build on it and re-export it.
"""
import functools
import html
import re
import unicodedata
from typing import Dict, Iterable, List, Sequence, Union

import numpy as np

DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's SimpleTokenizer keeps merges[1:49152 - 256 - 2 + 1] (line 0 is a header).
DEFAULT_NUM_MERGES = 49152 - 256 - 2
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
BPE_URL = ("https://github.com/openai/CLIP/raw/main/clip/"
           "bpe_simple_vocab_16e6.txt.gz")
TOKENIZER_NAMES = ("bytes", "words", "clip_bpe", "gpt2_bpe", "bert_wordpiece")
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
