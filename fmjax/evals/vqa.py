"""VQA accuracy with in-context examples (Flamingo's few-shot evaluation), on the generated
question/answer pairs of the ``vqa_pairs`` pipeline op (shape, colour and count).

For each query example of ``split`` and each question kind, and for each ``n`` in ``shots``
(default 0, 4, 8): a prompt of ``n`` support examples drawn at random from ``train_split``
(``train_examples`` of them; the same draw for every ``n``: the 4 shots are the first 4 of the
8), each ``<image> question answer <eot>`` with a random kind and the ``style`` answers (default
'short': bare words), then the query's ``<image> question``. The objective's model greedily
continues it (``encode_media`` once, then ``interleaved_logits`` per token); the answer is
right when the continuation is exactly the expected answer and eot. As Flamingo's VQAv2
numbers, this is open-ended generation scored by exact match, not a choice among classes.

``eval/<name>_<n>shot``: accuracy averaged over the kinds; ``_<n>shot_<kind>`` per kind;
``_<n>shot_sentences``: the fraction of answers begun like the 'sentence' style (the format
the shots are there to settle). ``seed`` (default 0) draws the shots and their kinds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fmjax.errors import ConfigError
from fmjax.evals import common, registry

KEYS = ("image", "qa_tokens", "qa_len", "qa_prompt_len")


def build_prompts(query, support, shot_idx, shot_kinds, kind: int, style: int, n: int,
                  image_token_id: int, media_tokens: int = 1):
    """Host-side prompts. ``query`` / ``support``: dicts of numpy arrays (``KEYS``);
    ``shot_idx`` / ``shot_kinds`` (Q, >= n). Returns (images (Q, n+1, H, W, C), token lists,
    answers (token lists ending with eot))."""
    images, prompts, answers = [], [], []
    for q in range(len(query["qa_len"])):
        toks, imgs = [], []
        for j in range(n):
            s, k = shot_idx[q, j], shot_kinds[q, j]
            toks += [image_token_id] * media_tokens + list(
                support["qa_tokens"][s, k, style, :support["qa_len"][s, k, style]])
            imgs.append(support["image"][s])
        p, full = query["qa_prompt_len"][q, kind], query["qa_len"][q, kind, style]
        toks += [image_token_id] * media_tokens + list(query["qa_tokens"][q, kind, style, :p])
        imgs.append(query["image"][q])
        images.append(np.stack(imgs))
        prompts.append(toks)
        answers.append(list(query["qa_tokens"][q, kind, style, p:full]))
    return np.stack(images), prompts, answers


def greedy(objective, params, extra, images, tokens, lengths, steps: int):
    """Greedy continuation of left-aligned prompts: ``steps`` tokens written from ``lengths``."""
    media = objective.encode_media(params, extra, images)
    rows = jnp.arange(tokens.shape[0])
    pos = jnp.arange(tokens.shape[1])

    def body(_, carry):
        toks, lens = carry
        logits = objective.interleaved_logits(params, extra, media, toks, pos[None] < lens[:, None])
        nxt = jnp.argmax(logits[rows, lens - 1], -1).astype(toks.dtype)
        return toks.at[rows, lens].set(nxt), lens + 1

    return jax.lax.fori_loop(0, steps, body, (tokens, lengths))[0]


@registry.register("vqa")
class VQAEvaluator(common.Evaluator):
    """``eval/<name>_<n>shot`` etc. (module docstring); the pipeline gives ``KEYS``."""

    fields = ("shots", "style", "seed", "max_length")
    train_side = True
    sharded_batches = True
    requires = {"encode_media": "encode_media hook (an interleaved image-text model, e.g. Flamingo)",
                "interleaved_logits": "interleaved_logits hook (an interleaved image-text model)"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        from fmjax.data import shapes
        shots = ev.get("shots", (0, 4, 8))
        if (isinstance(shots, (str, bytes)) or not hasattr(shots, "__len__") or not len(shots)
                or not all(common.is_int(n) and n >= 0 for n in shots)):
            raise ConfigError(f"{where}.shots={shots!r}; it must be a non-empty list of integers >= 0 "
                              "(in-context examples per prompt), e.g. (0, 4, 8).")
        if ev.get("style", "short") not in shapes.VQA_STYLES:
            raise ConfigError(f"{where}.style={ev.get('style')!r}; valid: {shapes.VQA_STYLES}.")
        if "seed" in ev:
            common.check_int(where, "seed", ev["seed"], 0)
        if "max_length" in ev:
            common.check_int(where, "max_length", ev["max_length"], 8)

    def _collect(self, train: bool):
        multi = jax.process_count() > 1
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
        parts = {k: [] for k in KEYS}
        with self.ctx.scope():
            for batch, valid in self.batches(train=train):
                missing = [k for k in KEYS if k not in batch]
                if missing:
                    raise ConfigError(f"{self.where}: its pipeline ({self.pp_key}) gives no {missing}; "
                                      "the VQA eval needs the vqa_pairs op's outputs and the image "
                                      f"(keep{KEYS}).")
                v = gather(valid) if multi else np.asarray(valid)
                for k in KEYS:
                    x = gather(batch[k]) if multi else np.asarray(batch[k])
                    parts[k].append(x[v])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def run(self, state, step, writer):
        from fmjax.data import shapes
        obj = self.ctx.objective
        shots = tuple(int(n) for n in self.ev.get("shots", (0, 4, 8)))
        style = shapes.VQA_STYLES.index(self.ev.get("style", "short"))
        image_token_id = int(obj.model.image_token_id)
        limit = int(self.ev.get("max_length", 0) or getattr(obj.model, "lm", {}).get("max_length", 1024))
        fn = self.ctx.cache.get("vqa_fn")
        if fn is None:
            fn = self.ctx.cache["vqa_fn"] = jax.jit(
                lambda p, e, i, t, l, s: greedy(obj, p, e, i, t, l, s), static_argnums=(5,))
        support, query = self._collect(True), self._collect(False)
        ns, nq = len(support["qa_len"]), len(query["qa_len"])
        if ns < max(shots):
            raise ValueError(f"{self.where}: {ns} support examples for {max(shots)} shots; raise "
                             "train_examples.")
        kinds = len(shapes.VQA_KINDS)
        rng = np.random.default_rng(int(self.ev.get("seed", 0)))
        m = max(shots)
        shot_idx = np.stack([rng.choice(ns, m, replace=False) for _ in range(nq)]) if m else np.zeros((nq, 0), int)
        shot_kinds = rng.integers(0, kinds, (nq, m))
        sentence_first = {}
        for k in range(kinds):  # the sentence style's first answer token per query and kind
            sentence_first[k] = np.array([query["qa_tokens"][q, k, 1 - style if len(shapes.VQA_STYLES) == 2 else 0,
                                                             query["qa_prompt_len"][q, k]] for q in range(nq)])
        out = {}
        bs = int(self.batch_size)
        with self.ctx.scope():
            for n in shots:
                per_kind, sentences = [], []
                for k in range(kinds):
                    images, prompts, answers = build_prompts(
                        query, support, shot_idx, shot_kinds, k, style, n, image_token_id,
                        int(getattr(obj, "media_tokens", 1)))
                    steps = max(len(a) for a in answers)
                    need = max(len(p) for p in prompts) + steps
                    length = min(-(-need // 16) * 16, limit)
                    if need > limit:
                        raise ValueError(f"{self.where}: {n}-shot prompts need {need} tokens but the "
                                         f"decoder has max_length={limit}; use fewer shots.")
                    right, sent = [], []
                    for lo in range(0, nq, bs):
                        idx = np.arange(lo, min(lo + bs, nq))
                        pad = np.concatenate([idx, np.repeat(idx[-1:], bs - len(idx))])
                        toks = np.zeros((bs, length), np.int32)
                        lens = np.zeros((bs,), np.int32)
                        for r, q in enumerate(pad):
                            toks[r, :len(prompts[q])] = prompts[q]
                            lens[r] = len(prompts[q])
                        gen = np.asarray(fn(state.params, state.extra, jnp.asarray(images[pad]),
                                            jnp.asarray(toks), jnp.asarray(lens), steps))
                        for r, q in enumerate(idx):
                            got = list(gen[r, lens[r]:lens[r] + len(answers[q])])
                            right.append(got == answers[q])
                            sent.append(gen[r, lens[r]] == sentence_first[k][q])
                    acc = float(np.mean(right))
                    out[f"{n}shot_{shapes.VQA_KINDS[k]}"] = acc
                    per_kind.append(acc)
                    sentences.append(float(np.mean(sent)))
                out[f"{n}shot"] = float(np.mean(per_kind))
                out[f"{n}shot_sentences"] = float(np.mean(sentences))
        return out
