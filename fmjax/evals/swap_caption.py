"""The ``swap_caption`` eval type: compositional understanding of an image-text model as ARO /
NegCLIP measure it (Yuksekgonul et al., 2023): does the image score its own caption above the
caption with two of its words swapped?

``words``: ``{group: [word, ...]}``, e.g. ``dict(attribute=COLOUR_NAMES, object=SHAPE_NAMES)``
(configs/clip.py gives the shapes' colour and shape names). For each example of ``split`` whose
caption holds two distinct words of a group, the first two are exchanged everywhere ("a red
circle left of a blue square" -> "a blue circle left of a red square": ARO's VG-Attribution for
colours; exchanging the nouns is its relation swap), and "a" / "an" are fixed after the swap (so
grammar gives nothing away). Logged per group:

  <group>_acc    how often the image's embedding is closer to the true caption than to the
                 swapped one (chance 0.5)
  <group>_pairs  the number of captions that had such a swap

The images go through the eval pipeline (``features``), the captions (read from the split's
``caption`` feature) through the objective's text tower (``text_features``) with
``config.data.tokenize``'s tokenizer.
"""
from __future__ import annotations

import re

import numpy as np

from fmjax.errors import ConfigError
from fmjax.evals import common, registry

_ARTICLE = re.compile(r"\b([Aa])(n?) (\w)")


def fix_articles(text: str) -> str:
    """'a orange' -> 'an orange', 'an red' -> 'a red' (by the next word's first letter)."""
    return _ARTICLE.sub(lambda m: f"{m.group(1)}{'n' if m.group(3).lower() in 'aeiou' else ''} {m.group(3)}",
                        text)


def swap_words(caption: str, words) -> str | None:
    """``caption`` with the first two distinct ``words`` it holds exchanged everywhere (articles
    fixed), or None when it holds fewer than two."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")
    found = list(dict.fromkeys(m.group(1) for m in pattern.finditer(caption)))
    if len(found) < 2:
        return None
    a, b = found[:2]
    swapped = pattern.sub(lambda m: b if m.group(1) == a else a if m.group(1) == b else m.group(1), caption)
    return fix_articles(swapped)


@registry.register("swap_caption")
class SwapCaptionEvaluator(common.Evaluator):
    """See the module docstring."""

    fields = ("words",)
    requires = {"features": "image tower", "text_features": "text tower"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        words = ev.get("words")
        ok = hasattr(words, "items") and len(words) > 0 and all(
            not isinstance(v, str) and len(v) >= 2 and all(isinstance(w, str) and w.strip() for w in v)
            for v in words.values())
        if not ok:
            raise ConfigError(f"{where}.words={words!r}; give {{group: [word, word, ...]}} with at least two "
                              "words per group, e.g. dict(attribute=('red', 'blue', ...)).")

    def run(self, state, step, writer):
        feats, _ = self.features(state)
        src = self.source()
        captions = [src[i]["caption"] for i in range(len(src))]
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
        if len(captions) != len(feats):
            raise ConfigError(f"{self.where}: {len(captions)} captions for {len(feats)} images.")
        img = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        out = {}
        for group, words in self.ev["words"].items():
            pairs = [(i, swap_words(c, list(words))) for i, c in enumerate(captions)]
            pairs = [(i, s) for i, s in pairs if s is not None]
            out[f"{group}_pairs"] = float(len(pairs))
            if not pairs:
                continue
            idx = np.array([i for i, _ in pairs])
            true = self.ctx.embed_prompts(state.params, state.extra, [captions[i] for i in idx])
            swapped = self.ctx.embed_prompts(state.params, state.extra, [s for _, s in pairs])
            norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
            s_true = (img[idx] * norm(np.asarray(true, np.float32))).sum(-1)
            s_swap = (img[idx] * norm(np.asarray(swapped, np.float32))).sum(-1)
            out[f"{group}_acc"] = float((s_true > s_swap).mean())
        return out
