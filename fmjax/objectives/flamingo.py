"""Flamingo (Alayrac et al., 2022): next-token prediction on sequences that interleave images
and text, through a frozen language model with gated cross-attention (fmjax.models.flamingo).

Reference: open_flamingo ``open_flamingo/train/train_utils.py`` ``train_one_epoch`` (commit
655f693fbfa04cd6e9a987d960654624d48917cf): the loss is the LM's cross-entropy on the text of an
interleaved sequence, ``<image>`` and padding tokens never targets; only the resampler and the
gated cross-attention layers learn (``optimizer.frozen`` freezes the LM, here also the vision
tower when it is pretrained).

**Interleaved sequences from K examples.** The global batch of B examples (images with their
generated question/answer pairs: the ``vqa_pairs`` pipeline op) is cut into B / K sequences of
``objective.shots_per_sequence`` = K consecutive examples. Each example becomes one chunk,
``[image_token_id] + sot + question + answer + eot`` (open_flamingo's ``<image>...<|endofchunk|>``;
eot ends a chunk), packed one after the other without padding (``fmjax.objectives.lm.pack_rows``)
into ``objective.seq_length`` tokens. The question kind is drawn per example (uniform over
``objective.kinds``), the answer style per SEQUENCE (uniform over ``objective.styles``): a
sequence answers either with bare words ('short', as VQAv2) or with sentences ('sentence'). The
style of a question's answer can thus only be known from the earlier chunks of its sequence,
which is what in-context examples supply at evaluation (the 'vqa' eval's shots): a 0-shot
prompt leaves the format to a guess, as Flamingo's zero-shot VQA answers in the wrong format.

``objective.media_tokens`` (default 1): image placeholders per chunk; LLaVA's projection
(``model.projection='mlp'``) needs one per vision token (the check says how many).

Metrics: ``token_accuracy`` (all text targets), ``answer_acc`` (the answer's first token: its
word or the sentence's first word) in the first chunk of each sequence (``answer_acc_first``: no
earlier example) and in the later ones (``answer_acc_later``), ``dropped`` (tokens cut by
``seq_length``; keep it 0). Hooks for the 'vqa' eval: ``encode_media``, ``interleaved_logits``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.errors import ConfigError
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective
from fmjax.objectives.lm import masked_lm_loss, pack_rows


def interleave(rng, qa_tokens, qa_len, qa_prompt_len, k: int, seq_length: int,
               image_token_id: int, kinds, styles, media_tokens: int = 1):
    """The module docstring's sequences. ``qa_tokens`` (B, kinds, styles, L), ``qa_len`` (B,
    kinds, styles), ``qa_prompt_len`` (B, kinds); ``kinds`` / ``styles``: the indices drawn from.
    Returns dict(tokens (N, T), valid (N, T), chunk (N, T) each position's example index in its
    sequence, answer_start (N, T) True at each chunk's first answer token, dropped (N,)).
    ``media_tokens``: image placeholders per chunk (1; LLaVA: the vision tower's tokens)."""
    b = qa_tokens.shape[0]
    n = b // k
    rk, rs = jax.random.split(rng)
    kind = jnp.asarray(kinds, jnp.int32)[jax.random.randint(rk, (b,), 0, len(kinds))]
    style = jnp.asarray(styles, jnp.int32)[jax.random.randint(rs, (n,), 0, len(styles))]
    style = jnp.repeat(style, k)
    rows = jnp.arange(b)
    text = qa_tokens[rows, kind, style]                                   # (B, L)
    lens = qa_len[rows, kind, style] + media_tokens
    first = qa_prompt_len[rows, kind] + media_tokens                      # offset of the answer
    chunks = jnp.concatenate([jnp.full((b, media_tokens), image_token_id, text.dtype), text], 1)
    packed, valid, starts, dropped = pack_rows(chunks.reshape(n, k, -1), lens.reshape(n, k),
                                               seq_length)
    pos = jnp.arange(seq_length)
    chunk = jnp.sum(pos[None, :, None] >= starts[:, None, :], -1) - 1     # (N, T)
    offset = pos[None] - jnp.take_along_axis(starts, chunk, 1)
    answer_start = valid & (offset == jnp.take_along_axis(first.reshape(n, k), chunk, 1))
    return dict(tokens=packed, valid=valid, chunk=chunk, answer_start=answer_start,
                dropped=dropped)


class FlamingoObjective(Objective):
    batch_keys = ("image", "qa_tokens", "qa_len", "qa_prompt_len")

    def __init__(self, config):
        super().__init__(config)
        from fmjax.data import shapes
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("interleaved_lm",), "objective 'flamingo'", config.model.name)
        o = config.objective
        self.k = int(o.get("shots_per_sequence", 5))
        self.seq_length = int(o.get("seq_length", 96))
        self.kind_names = tuple(o.get("kinds", shapes.VQA_KINDS))
        self.style_names = tuple(o.get("styles", shapes.VQA_STYLES))
        self.image_token_id = int(self.model.image_token_id)
        self.media_tokens = int(o.get("media_tokens", 1))

    def check(self, config):
        from fmjax.data import shapes, text_ops
        if self.k < 1 or config.batch_size % self.k:
            raise ConfigError(f"config.objective.shots_per_sequence={self.k} must be >= 1 and divide "
                              f"config.batch_size={config.batch_size}.")
        for key, names, valid in (("kinds", self.kind_names, shapes.VQA_KINDS),
                                  ("styles", self.style_names, shapes.VQA_STYLES)):
            bad = [x for x in names if x not in valid]
            if bad or not names:
                raise ConfigError(f"config.objective.{key}={names!r}; valid: a non-empty subset of {valid}.")
        try:
            _, lm = self.model.towers()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        limit = lm.get("max_length", 1024)
        if lm.get("position", "learned") == "learned" and self.seq_length > limit:
            raise ConfigError(f"config.objective.seq_length={self.seq_length} exceeds the decoder's "
                              f"max_length={limit}; lower it or raise config.model.lm.max_length.")
        text_ops.check_vocab(config, lm.get("vocab_size"))
        want = 1
        if self.model.projection == "mlp":  # LLaVA: one placeholder per vision token
            size = int(config.data.get("image_size", 224))
            images = jnp.zeros((1, 1, size, size, 3))

            def vision_tokens():
                variables = self.model.init(jax.random.PRNGKey(0), images, method="vision_tokens")
                return self.model.apply(variables, images, method="vision_tokens")
            want = int(jax.eval_shape(vision_tokens).shape[2])
        if self.media_tokens != want:
            raise ConfigError(f"config.objective.media_tokens={self.media_tokens}, but projection="
                              f"{self.model.projection!r} takes {want} per image; set it to {want}.")

    @property
    def kinds(self):
        from fmjax.data import shapes
        return tuple(shapes.VQA_KINDS.index(x) for x in self.kind_names)

    @property
    def styles(self):
        from fmjax.data import shapes
        return tuple(shapes.VQA_STYLES.index(x) for x in self.style_names)

    def sequences(self, rng, batch):
        return interleave(rng, batch["qa_tokens"], batch["qa_len"], batch["qa_prompt_len"], self.k,
                          self.seq_length, self.image_token_id, self.kinds, self.styles,
                          self.media_tokens)

    def _images(self, batch):
        img = batch["image"]
        return img.reshape((img.shape[0] // self.k, self.k) + img.shape[1:])

    def init(self, rng, batch):
        seq = self.sequences(jax.random.PRNGKey(0), batch)
        return self.model.init({"params": rng}, self._images(batch), seq["tokens"],
                               seq["valid"])["params"], {}

    def loss(self, params, extra, batch, rng, step):
        r_seq, r_drop = jax.random.split(rng)
        seq = self.sequences(r_seq, batch)
        tokens, valid = seq["tokens"], seq["valid"]
        out = self.model.apply({"params": params}, self._images(batch), tokens, valid, train=True,
                               rngs={"dropout": r_drop})
        target = valid[:, 1:] & (tokens[:, 1:] != self.image_token_id)
        loss, acc, n = masked_lm_loss(out["logits"], tokens, target)
        hit = (jnp.argmax(out["logits"][:, :-1], -1) == tokens[:, 1:]).astype(jnp.float32)
        ans = seq["answer_start"][:, 1:]
        first = (ans & (seq["chunk"][:, 1:] == 0)).astype(jnp.float32)
        later = (ans & (seq["chunk"][:, 1:] > 0)).astype(jnp.float32)
        rate = lambda m: (hit * m).sum() / jnp.maximum(m.sum(), 1.0)  # noqa: E731
        metrics = dict(token_accuracy=acc, targets=n, answer_acc=rate(first + later),
                       answer_acc_first=rate(first), answer_acc_later=rate(later),
                       dropped=seq["dropped"].sum())
        return loss, (metrics, extra)

    # -- hooks of the 'vqa' eval -----------------------------------------------------------
    def encode_media(self, params, extra, images):
        """(B, T_img, H, W, C) -> the model's media (resampled latents / projected tokens)."""
        return self.model.apply({"params": params}, images, method="encode_media")

    def interleaved_logits(self, params, extra, media, tokens, valid):
        return self.model.apply({"params": params}, media, tokens, valid,
                                method="lm_logits")["logits"]


def make(config) -> FlamingoObjective:
    return FlamingoObjective(config)
