"""'bert_wordpiece' (fmjax.data.wordpiece) against transformers' BertTokenizer on the same
vocab.txt: the ids of hand-picked hard cases and of random strings, truncation, decode,
pickling (grain workers), and the one-line errors for a missing or foreign vocabulary."""
import pickle
import string

import numpy as np
import pytest

from fmjax.data.tokenizer import get_tokenizer

WORDS = ("the", "red", "circle", "un", "##aff", "##able", "cafe", "deja", "vu", "photo", "of", "a",
         "##s", "##ing", "play", "dog", "hello", "don", "'", "t", "你", "好", "世", "界", "##ly", "quick")
HARD = [
    "The red circles, unaffable [MASK] abc.",
    "Café Déjà vu! A photo of a DOG...",
    "你好世界 hello你好",
    "tab\tnew\nline\r\u00a0nbsp\u200bzero-width \x00nul \ufffdbad",
    "emoji 🙂 and ½ and ™ and ﬁ ligature",
    "don't stop playing quickly",
    "a" * 150 + " b",
    "e\u0301 combining acute, Ω omega, ß sharp s",
    "[CLS] [SEP] inside text [PAD] [UNK]",
    "  leading and trailing spaces   ",
    "numbers 12345 and 3.14 and $5",
    "((nested)) {braces} <angle> `tick` ~tilde ^caret |pipe| \\back",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_vocab")
    chars = list(string.ascii_lowercase + string.digits + string.punctuation) + ["ω", "ß", "½", "™"]
    tokens = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
              + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + list(WORDS))
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return d


def _reference(vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer.from_pretrained(str(vocab_dir))


def _fuzz(n, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "  \t\n") + list(
        "éÉàüñçøåΩßω你好世界🙂\u00a0\u200b\u0301ﬁ½™")
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(alphabet, rng.integers(1, 12))) for _ in range(rng.integers(1, 8))]
        words += list(rng.choice(WORDS, rng.integers(0, 4)))
        rng.shuffle(words)
        text = " ".join(words)
        if text.strip():
            out.append(text)
    return out


def test_ids_match_transformers_bert_tokenizer(vocab_dir):
    ref = _reference(vocab_dir)
    tok = get_tokenizer("bert_wordpiece", bpe_path=str(vocab_dir))
    assert (tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (
        ref.pad_token_id, ref.cls_token_id, ref.sep_token_id)
    for text in HARD + _fuzz(300):
        want = ref(text, add_special_tokens=False)["input_ids"]
        got = tok.encode(text) if want else None
        assert got == (want or None), f"{text!r}: {got} != {want}"


@pytest.mark.parametrize("length", [4, 8, 64])
def test_rows_truncate_and_pad_like_transformers(vocab_dir, length):
    ref = _reference(vocab_dir)
    tok = get_tokenizer("bert_wordpiece", bpe_path=str(vocab_dir / "vocab.txt"))
    texts = HARD[:6]
    want = np.asarray(ref(texts, padding="max_length", truncation=True, max_length=length)["input_ids"])
    np.testing.assert_array_equal(tok(texts, length), want)


def test_decode_and_pickle(vocab_dir):
    tok = get_tokenizer("bert_wordpiece", bpe_path=str(vocab_dir))
    row = tok(["Unaffable circles, playing."], 16)[0]
    assert tok.decode(row) == "unaffable circles , playing ."
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again(HARD, 32), tok(HARD, 32))
    cased = get_tokenizer("bert_wordpiece", bpe_path=str(vocab_dir), do_lower_case=False)
    assert cased.encode("Red red") == [cased.unk_id, tok.vocab["red"]]


def test_missing_or_foreign_vocabulary_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs BERT's vocab.txt"):
        get_tokenizer("bert_wordpiece")
    with pytest.raises(FileNotFoundError, match="WordPiece vocabulary not found"):
        get_tokenizer("bert_wordpiece", bpe_path=str(tmp_path / "nope.txt"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"needs \['\[UNK\]', '\[CLS\]', '\[SEP\]', '\[PAD\]'\]"):
        get_tokenizer("bert_wordpiece", bpe_path=str(tmp_path))
