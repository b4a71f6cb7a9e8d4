"""Causal language modelling: next-token cross-entropy on tokenized captions.

The model is any registered model with the ``causal_lm`` capability (``fmjax.models.decoder.
Decoder``). The batch is ``tokens`` (B, L) as the ``tokenize`` transform lays them out:
``[sot] + ids + [eot]`` then padding; position t predicts token t + 1, and the targets count up
to and including the first eot (the padding after it is not a target, whatever its id).
The loss is the mean over all target tokens of the batch; ``perplexity`` = exp(loss)
(the validation perplexity is exp of the ``loss`` evaluator's ``eval/<name>``).

``config.objective.eot_token_id``: the end-of-text id; unset, it is read from
``config.data.tokenize``'s tokenizer. ``config.objective.pack=K`` (default 1: off) packs K
consecutive captions of the batch into one row of ``pack_length`` tokens (default K x L), their
padding removed (``pack_rows``): ``[sot] a [eot] [sot] b [eot] ...``, as GPT-style pre-training
packs documents, so the model learns long contexts (Flamingo's interleaved sequences); every
real token after the first is a target (the next caption's sot after an eot too), tokens past
``pack_length`` are dropped (metric ``dropped``). ``sample_text`` (``fmjax.models.generate.sample``)
decodes from prompts (it is not the diffusion-style ``generate`` capability).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.models import generate as generate_lib
from fmjax.models.core import at_least_float32
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective


def target_mask(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """(B, L-1) float: 1 where ``tokens[:, 1:]`` is a target, i.e. no eot precedes it in the
    row (the first eot itself is a target)."""
    is_eot = (tokens[:, :-1] == eot_token_id).astype(jnp.int32)
    return (jnp.cumsum(is_eot, axis=1) == 0).astype(jnp.float32)


def lm_loss(logits: jax.Array, tokens: jax.Array, eot_token_id: int):
    """(mean next-token NLL over the targets, token accuracy, number of targets)."""
    logp = jax.nn.log_softmax(at_least_float32(logits[:, :-1]), -1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = target_mask(tokens, eot_token_id).astype(logp.dtype)
    n = jnp.maximum(mask.sum(), 1.0)
    acc = ((jnp.argmax(logp, -1) == targets) * mask).sum() / n
    return (nll * mask).sum() / n, acc, mask.sum()


def caption_lengths(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """(...,) int32: each row's length up to and including its first eot (all of it without one)."""
    is_eot = tokens == eot_token_id
    first = jnp.argmax(is_eot, axis=-1)
    return jnp.where(is_eot.any(-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


def pack_rows(chunks: jax.Array, lengths: jax.Array, out_len: int):
    """Packs the first ``lengths[n, k]`` tokens of each ``chunks[n, k]`` (N, K, L) one after the
    other into rows of ``out_len`` (zero padded). Returns ``(packed (N, out_len), valid (N,
    out_len) bool, starts (N, K) int32 chunk offsets, dropped (N,) int32 tokens that did not
    fit)``."""
    n, k, l = chunks.shape
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), l)
    keep = (jnp.arange(l)[None, None, :] < lengths[..., None]).reshape(n, k * l)
    dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, out_len)
    packed = jnp.zeros((n, out_len), chunks.dtype).at[jnp.arange(n)[:, None], dest].set(
        chunks.reshape(n, k * l), mode="drop")
    total = lengths.sum(1)
    valid = jnp.arange(out_len)[None, :] < jnp.minimum(total, out_len)[:, None]
    starts = jnp.cumsum(lengths, 1) - lengths
    return packed, valid, starts, jnp.maximum(total - out_len, 0)


def masked_lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array):
    """(mean next-token NLL, token accuracy, number of targets) over the targets
    ``tokens[:, 1:]`` where ``mask`` (B, L-1) is true."""
    logp = jax.nn.log_softmax(at_least_float32(logits[:, :-1]), -1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = mask.astype(logp.dtype)
    n = jnp.maximum(mask.sum(), 1.0)
    acc = ((jnp.argmax(logp, -1) == targets) * mask).sum() / n
    return (nll * mask).sum() / n, acc, mask.sum()


class LMObjective(Objective):
    batch_keys = ("tokens",)

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("causal_lm",), "objective 'lm'", config.model.name)
        eot = config.objective.get("eot_token_id", None)
        if eot is None:
            eot = self._tokenizer(config).eot_token_id
        self.eot_token_id = int(eot)
        self.pack = int(config.objective.get("pack", 1) or 1)
        self.pack_length = config.objective.get("pack_length", None)

    def packed(self, tokens):
        """(B, L) captions -> (packed (B/K, pack_length), target mask (B/K, pack_length - 1),
        dropped tokens (B/K,))."""
        b, l = tokens.shape
        out_len = int(self.pack_length or self.pack * l)
        chunks = tokens.reshape(b // self.pack, self.pack, l)
        packed, valid, _, dropped = pack_rows(
            chunks, caption_lengths(chunks, self.eot_token_id), out_len)
        return packed, valid[:, 1:], dropped

    @staticmethod
    def _tokenizer(config):
        from fmjax.data.text_ops import tokenize
        tok_cfg = config.data.get("tokenize")
        if not tok_cfg:
            raise ValueError("objective 'lm' needs config.data.tokenize (or objective.eot_token_id).")
        return tokenize(**dict(tok_cfg)).tokenizer

    def check(self, config):
        from fmjax.data import text_ops
        from fmjax.errors import ConfigError
        text_ops.check_vocab(config, config.model.get("vocab_size"))
        tok_cfg = config.data.get("tokenize") or {}
        if self.pack < 1 or config.batch_size % self.pack:
            raise ConfigError(f"config.objective.pack={self.pack} must be >= 1 and divide "
                              f"config.batch_size={config.batch_size}.")
        ctx, limit = tok_cfg.get("context_length"), getattr(self.model, "max_length", None)
        if self.pack > 1 and ctx:
            ctx = int(self.pack_length or self.pack * ctx)
        if ctx and limit and getattr(self.model, "position", "learned") == "learned" and ctx > limit:
            what = ("the packed length (objective.pack_length or pack x context_length)"
                    if self.pack > 1 else "config.data.tokenize.context_length")
            raise ConfigError(f"{what}={ctx} exceeds the decoder's max_length={limit}; raise "
                              "config.model.max_length.")

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"])["params"], {}

    def loss(self, params, extra, batch, rng, step):
        tokens = batch["tokens"]
        metrics = {}
        if self.pack > 1:
            tokens, mask, dropped = self.packed(tokens)
            metrics["dropped"] = dropped.sum()
        out = self.model.apply({"params": params}, tokens, train=True, rngs={"dropout": rng})
        if self.pack > 1:
            loss, acc, n = masked_lm_loss(out["logits"], tokens, mask)
        else:
            loss, acc, n = lm_loss(out["logits"], tokens, self.eot_token_id)
        metrics.update(perplexity=jnp.exp(loss), token_accuracy=acc, targets=n)
        return loss, (metrics, extra)

    def sample_text(self, params, extra, rng, prompt, max_new_tokens: int, **kwargs):
        """``fmjax.models.generate.sample`` with this objective's model; eos defaults to eot."""
        kwargs.setdefault("eos_token_id", self.eot_token_id)
        return generate_lib.sample(self.model, params, prompt, max_new_tokens, rng, **kwargs)


def make(config) -> LMObjective:
    return LMObjective(config)
