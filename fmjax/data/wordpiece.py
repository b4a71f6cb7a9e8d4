"""BERT's WordPiece tokenizer (``'bert_wordpiece'``): the text side of ALIGN and BLIP.

A transcription of the algorithm of Google's BERT ``tokenization.py`` as transformers'
``BertTokenizer`` runs it, from the user's ``vocab.txt`` (one token per line, id = line
number; bert-base-uncased's has 30522):

1. *Basic* tokenization: drop NUL, U+FFFD and control characters, map whitespace to spaces,
   put spaces around CJK ideographs, NFC-normalise, split on whitespace; per word, lowercase
   and strip accents (NFD minus combining marks) when ``do_lower_case``, then split off every
   punctuation character (ASCII non-alphanumerics count as punctuation, as in BERT).
2. *WordPiece*: each word greedily, longest vocabulary match first, continuations spelled
   ``##piece``; a word with no full cover, or longer than ``max_input_chars_per_word``, is
   one ``[UNK]``.

Special tokens written in the text (``[MASK]``, ``[SEP]``, ...) stay whole, as transformers
keeps them. Rows are ``[CLS] + pieces + [SEP]``, ``[PAD]`` (id 0 in BERT's vocabularies)
after; a too-long row keeps ``[SEP]`` last. Unlike the other tokenizers ``eot`` ([SEP], 102)
is not the largest id, so a text tower reading this tokenizer pools at the first position
(``pool='first'``, BERT's [CLS]) or at the eot position, not at ``argmax(ids)``.
``tests/data/test_wordpiece.py`` checks the ids against transformers' ``BertTokenizer``.
"""
import os
import re
import unicodedata
from typing import Dict, List, Optional

from fmjax.data.tokenizer_base import Tokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str, do_lower_case: bool = True) -> List[str]:
    """BERT's BasicTokenizer: cleaned, lowercased / accent-stripped words and punctuation."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.extend((" ", ch, " "))
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFC", "".join(chars))
    out = []
    for word in text.split():
        if do_lower_case:
            word = word.lower()
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        start = True
        for ch in word:
            if _is_punctuation(ch):
                out.append(ch)
                start = True
            else:
                if start:
                    out.append("")
                    start = False
                out[-1] += ch
    return [w for w in out if w]


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece from ``vocab_file`` (``vocab.txt``, or the folder holding it).

    Args:
        vocab_file: one token per line; the line number is the id.
        do_lower_case: lowercase and strip accents (the 'uncased' models); False for 'cased'.
        max_input_chars_per_word: longer words become ``[UNK]`` (BERT: 100).
    """

    def __init__(self, vocab_file: str, do_lower_case: bool = True, max_input_chars_per_word: int = 100):
        path = os.fspath(vocab_file)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"WordPiece vocabulary not found: {path!r}; the 'bert_wordpiece' tokenizer needs BERT's "
                "vocab.txt (e.g. bert-base-uncased's): set config.data.tokenize.bpe_path to it or its folder.")
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
        while tokens and not tokens[-1]:
            tokens.pop()
        vocab: Dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        missing = [s for s in ("[UNK]", "[CLS]", "[SEP]", "[PAD]") if s not in vocab]
        if missing:
            raise ValueError(f"{path}: a WordPiece vocabulary needs {missing}; is it BERT's vocab.txt?")
        self.vocab_file, self.do_lower_case = path, bool(do_lower_case)
        self.max_chars = int(max_input_chars_per_word)
        self.vocab, self.inv = vocab, {i: t for t, i in vocab.items()}
        self.vocab_size = len(tokens)
        self.unk_id, self.pad_token_id = vocab["[UNK]"], vocab["[PAD]"]
        self.sot_token_id, self.eot_token_id = vocab["[CLS]"], vocab["[SEP]"]
        specials = [s for s in SPECIALS if s in vocab]
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        self.cache: Dict[str, List[int]] = {}

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "do_lower_case": self.do_lower_case,
                "max_input_chars_per_word": self.max_chars}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def wordpiece(self, word: str) -> List[int]:
        """Ids of one basic token: longest-match-first pieces, or [UNK]."""
        if word in self.cache:
            return self.cache[word]
        if len(word) > self.max_chars:
            ids = [self.unk_id]
        else:
            ids, start = [], 0
            while start < len(word):
                end, found = len(word), None
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        found = self.vocab[piece]
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        if len(self.cache) < 100_000:
            self.cache[word] = ids
        return ids

    def _encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for part in self._special_split.split(text):
            if part in self.vocab and part in SPECIALS:
                ids.append(self.vocab[part])
                continue
            for word in basic_tokenize(part, self.do_lower_case):
                ids.extend(self.wordpiece(word))
        return ids

    def _decode(self, ids: List[int]) -> str:
        text = " ".join(self.inv.get(int(i), "[UNK]") for i in ids)
        return text.replace(" ##", "").strip()

    def _is_pad(self, i: int) -> bool:
        return i == self.pad_token_id


def get(vocab_file: Optional[str], **kwargs) -> WordPieceTokenizer:
    """The ``'bert_wordpiece'`` tokenizer of ``get_tokenizer`` (``bpe_path``: vocab.txt or its folder)."""
    if not vocab_file:
        raise ValueError("tokenizer 'bert_wordpiece' needs BERT's vocab.txt: set config.data.tokenize.bpe_path "
                         "to it (or its folder), or use the 'bytes' tokenizer.")
    return WordPieceTokenizer(vocab_file, **kwargs)
