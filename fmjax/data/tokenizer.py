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
import os
import re
import unicodedata
import zlib
from typing import Dict, List, Optional, Tuple

from fmjax.data.tokenizer_base import (  # noqa: F401  (re-exported)
    _CACHE_LIMIT, _CLIP_PATTERN, _GPT2_PATTERN, _WORD_PATTERN, BPE_URL, DEFAULT_CONTEXT_LENGTH,
    DEFAULT_NUM_MERGES, EOT_TEXT, SOT_TEXT, TOKENIZER_NAMES, Tokenizer, _check_text, basic_clean,
    bytes_to_unicode, whitespace_clean)
from fmjax.data.bpe import (ClipBpeTokenizer, Gpt2BpeTokenizer, _read_merges,  # noqa: F401
                            read_bpe_merges)


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
    # _relation's phrases and _a_an's article; the VQA questions and answers
    words |= {"on", "the", "left", "right", "of", "above", "below", "an"}
    for text in tuple(shapes.VQA_QUESTIONS.values()) + tuple(shapes._COUNT_WORDS.values()) + (
            "it is a an.", "there is are"):
        words |= set(_WORD_PATTERN.findall(text.lower()))
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


def get_tokenizer(name: str = "bytes", bpe_path: Optional[str] = None,
                  vocab_size: Optional[int] = None, **kwargs) -> Tokenizer:
    """Tokenizer by name: ``'bytes'`` (default, no files), ``'words'`` (no files; its
    ``vocab_size``, default 4096; ``vocabulary='shapes'`` to decode), ``'clip_bpe'`` or
    ``'gpt2_bpe'`` (``bpe_path``: the directory of ``vocab.json`` + ``merges.txt``, or the
    ``vocab_file`` / ``merges_file`` keywords), ``'bert_wordpiece'`` (BERT's WordPiece, ALIGN's /
    BLIP's text side: ``bpe_path`` is its ``vocab.txt`` or the folder holding it;
    ``fmjax.data.wordpiece``).

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
    if name == "bert_wordpiece":
        from fmjax.data import wordpiece
        return wordpiece.get(kwargs.pop("vocab_file", None) or bpe_path, **kwargs)
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
