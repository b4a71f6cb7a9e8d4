"""Causal language modelling: next-token cross-entropy on tokenized captions.

The model is any registered model with the ``causal_lm`` capability (``fmjax.models.decoder.
Decoder``). The batch is ``tokens`` (B, L) as the ``tokenize`` transform lays them out:
``[sot] + ids + [eot]`` then padding; position t predicts token t + 1, and the targets count up
to and including the first eot (the padding after it is not a target, whatever its id).
The loss is the mean over all target tokens of the batch; ``perplexity`` = exp(loss)
(the validation perplexity is exp of the ``loss`` evaluator's ``eval/<name>``).

``config.objective.eot_token_id``: the end-of-text id; unset, it is read from
``config.data.tokenize``'s tokenizer. ``sample_text`` (``fmjax.models.generate.sample``)
decodes from prompts (it is not the diffusion-style ``generate`` capability).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.models import generate as generate_lib
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective


def target_mask(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """(B, L-1) float: 1 where ``tokens[:, 1:]`` is a target, i.e. no eot precedes it in the
    row (the first eot itself is a target)."""
    is_eot = (tokens[:, :-1] == eot_token_id).astype(jnp.int32)
    return (jnp.cumsum(is_eot, axis=1) == 0).astype(jnp.float32)


def lm_loss(logits: jax.Array, tokens: jax.Array, eot_token_id: int):
    """(mean next-token NLL over the targets, token accuracy, number of targets)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = target_mask(tokens, eot_token_id)
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
        ctx, limit = tok_cfg.get("context_length"), getattr(self.model, "max_length", None)
        if ctx and limit and getattr(self.model, "position", "learned") == "learned" and ctx > limit:
            raise ConfigError(f"config.data.tokenize.context_length={ctx} exceeds the decoder's "
                              f"max_length={limit}; raise config.model.max_length.")

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"])["params"], {}

    def loss(self, params, extra, batch, rng, step):
        tokens = batch["tokens"]
        out = self.model.apply({"params": params}, tokens, train=True, rngs={"dropout": rng})
        loss, acc, n = lm_loss(out["logits"], tokens, self.eot_token_id)
        return loss, ({"perplexity": jnp.exp(loss), "token_accuracy": acc, "targets": n}, extra)

    def sample_text(self, params, extra, rng, prompt, max_new_tokens: int, **kwargs):
        """``fmjax.models.generate.sample`` with this objective's model; eos defaults to eot."""
        kwargs.setdefault("eos_token_id", self.eot_token_id)
        return generate_lib.sample(self.model, params, prompt, max_new_tokens, rng, **kwargs)


def make(config) -> LMObjective:
    return LMObjective(config)
