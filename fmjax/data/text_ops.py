"""Caption ops for ``fmjax.data.transforms`` pipelines: ``tokenize`` and ``swap_words``.

Registered as pp ops (``fmjax.data.registry``), so pp strings name them as the image ops.
"""
import re
from typing import Optional, Sequence

import numpy as np

from fmjax.data.registry import register_op
from fmjax.data.transform_base import Transform


@register_op
class tokenize(Transform):  # noqa: N801
    """Caption -> int32 token ids ``[context_length]`` (sot + tokens + eot, zero padded;
    captions longer than the context are truncated, eot kept last). ``tokenizer`` is a
    name for ``fmjax.data.tokenizer.get_tokenizer`` ('bytes', 'words' + ``vocab_size``, or
    'clip_bpe' + ``bpe_path``)."""

    def __init__(self, context_length: int = 77, tokenizer: str = "bytes",
                 bpe_path: Optional[str] = None, vocab_size: Optional[int] = None,
                 key: str = "caption", outkey: str = "tokens"):
        from fmjax.data.tokenizer import get_tokenizer
        self.context_length, self.key, self.outkey = int(context_length), key, outkey
        self.tokenizer = get_tokenizer(tokenizer, bpe_path, vocab_size)

    def __call__(self, example, rng):
        out = dict(example)
        text = example[self.key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        out[self.outkey] = self.tokenizer([text], self.context_length)[0]
        return out


@register_op
class swap_words(Transform):  # noqa: N801
    """Hard-negative caption (NegCLIP, Yuksekgonul et al. 2023): one whole-word occurrence
    of a word from ``words`` (case-insensitive) in ``key`` is replaced by a different word of
    the list, drawn at random, into ``outkey``; ``validkey`` is 1, or 0 when the caption has
    no such word (``outkey`` is then the caption itself and the objective ignores it).

    E.g. ``swap_words(('circle', 'square', 'star'))``: "a red circle left of a star." ->
    "a red square left of a star." With the class names as ``words`` the contrastive loss
    must tell the named shapes apart, which colour or position alone can't do.
    """

    def __init__(self, words: Sequence[str], key: str = "caption", outkey: str = "neg_caption",
                 validkey: str = "neg_valid"):
        self.words = tuple(str(w).lower() for w in words)
        if len(set(self.words)) < 2:
            raise ValueError(f"swap_words needs at least two distinct words, got {words!r}")
        self.key, self.outkey, self.validkey = key, outkey, validkey
        alternatives = "|".join(re.escape(w) for w in sorted(set(self.words), key=len, reverse=True))
        self._pattern = re.compile(rf"\b({alternatives})\b", re.IGNORECASE)

    def __getstate__(self):  # the compiled pattern is rebuilt on unpickling
        return {k: v for k, v in vars(self).items() if k != "_pattern"}

    def __setstate__(self, state):
        self.__init__(state["words"], state["key"], state["outkey"], state["validkey"])

    def __repr__(self):
        return f"swap_words(words={self.words!r}, key={self.key!r}, outkey={self.outkey!r})"

    def __call__(self, example, rng):
        out = dict(example)
        text = example[self.key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        found = list(self._pattern.finditer(text))
        if not found:
            out[self.outkey], out[self.validkey] = text, np.int32(0)
            return out
        m = found[int(rng.integers(len(found)))]
        others = [w for w in dict.fromkeys(self.words) if w != m.group(0).lower()]
        out[self.outkey] = text[:m.start()] + others[int(rng.integers(len(others)))] + text[m.end():]
        out[self.validkey] = np.int32(1)
        return out


def tokenize_texts(config, texts) -> np.ndarray:
    """int32 [N, L] token ids of strings (prompts, class-name captions) with the training
    captions' tokenizer, ``config.data.tokenize``; its context length defaults to the text
    tower's (``config.objective.text.context_length``, as text-conditional diffusion keeps it)."""
    kw = dict(config.data.get("tokenize", None) or {})
    text = config.objective.get("text", None) or {}
    if "context_length" not in kw and "context_length" in text:
        kw["context_length"] = text["context_length"]
    tok = tokenize(**kw)
    return np.asarray(tok.tokenizer(list(texts), tok.context_length), np.int32)


def tokenizer_vocab_size(config):
    """The vocabulary size of ``config.data.tokenize``'s tokenizer, or None without one (or when
    it cannot be built: ``check_vocab`` reports that)."""
    tok_cfg = config.data.get("tokenize")
    if not tok_cfg:
        return None
    try:
        return int(tokenize(**dict(tok_cfg)).tokenizer.vocab_size)
    except (ValueError, FileNotFoundError, OSError):
        return None


def check_vocab(config, vocab) -> None:
    """The tokenizer of ``config.data.tokenize`` must yield ids below ``vocab`` (the text
    tower's embedding rows): an out-of-range id would be silently clamped by the lookup.
    One-line ``ConfigError``; for objectives' ``check``."""
    from fmjax.errors import ConfigError
    tok_cfg = config.data.get("tokenize")
    if not tok_cfg or not vocab:
        return
    try:
        tok = tokenize(**dict(tok_cfg)).tokenizer
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"config.data.tokenize: {e}") from None
    if tok.vocab_size > int(vocab):
        raise ConfigError(
            f"tokenizer {tok!r} yields ids up to {tok.vocab_size - 1} but the text tower's vocab_size "
            f"is {vocab}; set the model's vocab_size to {tok.vocab_size} (or the tokenizer's to {vocab}).")


@register_op
class attribute_id(Transform):  # noqa: N801
    """One int32 id per combination of attributes: ``outkey = sum_i example[keys[i]][index] *
    64**i`` (each attribute in [0, 64); e.g. the shapes' main object's shape, colour and size,
    so that two scenes whose captions name the same object share it). BLIP's ITM uses it
    (``objective.itm_exclude_key``) as blip_retrieval.py uses image ids: pairs with the same id
    are not drawn as negatives.
    """

    def __init__(self, keys: Sequence[str] = ("shapes", "colors", "sizes"), index: int = 0,
                 outkey: str = "group"):
        self.keys, self.index, self.outkey = tuple(keys), int(index), outkey
        if not self.keys:
            raise ValueError("attribute_id needs at least one key.")

    def __call__(self, example, rng):
        out = dict(example)
        total = 0
        for i, key in enumerate(self.keys):
            if key not in example:
                raise KeyError(f"attribute_id: the example has no {key!r} (keys: {sorted(example)}).")
            value = int(np.asarray(example[key]).reshape(-1)[self.index])
            if not 0 <= value < 64:
                raise ValueError(f"attribute_id: {key}[{self.index}]={value} is not in [0, 64).")
            total += value * 64 ** i
        out[self.outkey] = np.int32(total)
        return out


@register_op
class vqa_pairs(Transform):  # noqa: N801
    """Generated question/answer pairs about an fmjax_shapes scene (``fmjax.data.shapes.
    VQA_QUESTIONS``: the main object's shape and colour, the number of objects), tokenized as
    ``question + ' ' + answer`` (sot ... eot, zero padded to ``context_length``) for every kind
    and answer style:

    - ``qa_tokens`` int32 (kinds, styles, context_length); kinds ``shapes.VQA_KINDS``, styles
      ``shapes.VQA_STYLES`` ('short': the bare word; 'sentence');
    - ``qa_len`` int32 (kinds, styles): tokens up to and including eot;
    - ``qa_prompt_len`` int32 (kinds,): sot + the question's tokens (the answer starts there).

    Needs the example's ``shapes``, ``colors`` and ``num_objects`` (the fmjax_shapes features).
    Configs/flamingo.py builds interleaved few-shot sequences from them.
    """

    def __init__(self, context_length: int = 16, tokenizer: str = "words",
                 vocab_size: Optional[int] = None, bpe_path: Optional[str] = None):
        from fmjax.data.tokenizer import get_tokenizer
        self.context_length = int(context_length)
        self.tokenizer = get_tokenizer(tokenizer, bpe_path, vocab_size)

    def __call__(self, example, rng):
        from fmjax.data import shapes
        for key in ("shapes", "colors", "num_objects"):
            if key not in example:
                raise KeyError(f"vqa_pairs: the example has no {key!r} (keys: {sorted(example)}); "
                               "it needs the fmjax_shapes attributes (put it before keep()).")
        shape = int(np.asarray(example["shapes"]).reshape(-1)[0])
        color = int(np.asarray(example["colors"]).reshape(-1)[0])
        num = int(np.asarray(example["num_objects"]))
        kinds, styles = shapes.VQA_KINDS, shapes.VQA_STYLES
        texts = [shapes.VQA_QUESTIONS[k] + " " + shapes.vqa_answer(k, shape, color, num, s)
                 for k in kinds for s in styles]
        toks = self.tokenizer(texts, self.context_length)
        eot = self.tokenizer.eot_token_id
        lens = np.array([list(row).index(eot) + 1 for row in toks], np.int32)
        prompt = [1 + len(self.tokenizer.encode(shapes.VQA_QUESTIONS[k])) for k in kinds]
        if np.any(lens[::len(styles)] <= prompt):
            raise ValueError(f"vqa_pairs: context_length={self.context_length} cuts the answers; "
                             "raise it.")
        out = dict(example)
        out["qa_tokens"] = toks.reshape(len(kinds), len(styles), -1).astype(np.int32)
        out["qa_len"] = lens.reshape(len(kinds), len(styles))
        out["qa_prompt_len"] = np.asarray(prompt, np.int32)
        return out
