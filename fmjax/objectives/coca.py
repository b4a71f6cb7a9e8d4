"""CoCa (Yu et al., 2022): contrastive + captioning loss.

``loss = contrastive_weight * clip_loss + caption_weight * caption_loss``, the paper's
lambda_Con = 1 and lambda_Cap = 2 by default (open_clip's ``--coca-contrastive-loss-weight 1``,
``--coca-caption-loss-weight 2``). The contrastive term is CLIP's
(``fmjax.objectives.clip``: the global batch's softmax loss, or SigLIP's with a sigmoid
model; ``loss_impl`` and hard negatives as there). The caption term is open_clip's
``CoCaLoss``: the cross-entropy of ``caption_logits[:, :-1]`` against ``tokens[:, 1:]``,
averaged over the targets that are not ``model.pad_id`` (``nn.CrossEntropyLoss(
ignore_index=pad_id)``). With the 'words' and byte tokenizers the pad id 0 is only padding;
with CLIP's BPE it is also the token "!", which open_clip (and so this loss) never trains on.

The model is any registered model with the ``image_text`` and ``captioning`` capabilities
(``fmjax.models.coca.CoCa``). Metrics: ``contrastive_loss`` and ``caption_loss`` (both
unweighted), ``caption_token_accuracy``, CLIP's ``i2t_acc`` / ``t2i_acc`` / ``logit_scale``.

``caption(params, extra, images)``: greedy captions, (B, L - 1) token ids after the start
token (L = ``config.data.tokenize.context_length``), for the 'captioning' evaluator. Each of
the L - 1 steps reruns the text tower and the decoder on the whole (B, L) buffer (causal, so
the positions after t do not change the logits at t): no KV cache, O(L^2) for short captions.

Gradient accumulation is refused: the caption loss is per example, but the contrastive one
couples the batch and CoCa has no split ``embed`` / ``loss_from_embeddings`` (yet).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.errors import ConfigError
from fmjax.models.registry import require
from fmjax.objectives.clip import CLIPObjective
from fmjax.objectives.lm import LMObjective


def caption_loss(logits: jax.Array, tokens: jax.Array, pad_id: int):
    """open_clip ``CoCaLoss``'s caption term: (mean NLL over the non-pad targets of
    ``tokens[:, 1:]`` given ``logits[:, :-1]``, their token accuracy)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = (targets != pad_id).astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    acc = ((jnp.argmax(logp, -1) == targets) * mask).sum() / n
    return (nll * mask).sum() / n, acc


def greedy_captions(model, config, params, images):
    """Greedy captions of ``images`` by a 'captioning' model (``image_tokens`` +
    ``caption_logits_from``): (B, L - 1) int32 ids after the start token, L =
    ``config.data.tokenize.context_length``; rows run on past their end-of-text token (decoders
    stop there). Each step reruns the decoder on the whole (B, L) buffer (causal, so the positions
    after t do not change the logits at t): no KV cache."""
    tok = LMObjective._tokenizer(config)  # pylint: disable=protected-access
    length = int(config.data.tokenize.context_length)
    variables = {"params": params}
    image_tokens = model.apply(variables, images, method=model.image_tokens)
    buf = jnp.zeros((images.shape[0], length), jnp.int32).at[:, 0].set(tok.sot_token_id)

    def step(t, buf):
        logits = model.apply(variables, image_tokens, buf, method=model.caption_logits_from)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), t + 1, 1)

    return jax.lax.fori_loop(0, length - 1, step, buf)[:, 1:]


class CoCaObjective(CLIPObjective):
    # CLIP's split for exact accumulation does not cover the caption decoder.
    embed = None
    loss_from_embeddings = None

    def __init__(self, config):
        super().__init__(config)
        require(self.model, ("captioning",), "objective 'coca'", config.model.name)
        o = config.objective
        self.contrastive_weight = float(o.get("contrastive_weight", 1.0))
        self.caption_weight = float(o.get("caption_weight", 2.0))
        self.pad_id = int(getattr(self.model, "pad_id", 0))

    def check(self, config):
        super().check(config)
        if self.lock:
            raise ConfigError(f"objective 'coca' has no lock (got objective.lock={self.lock!r}); "
                              "set --config.objective.lock=''.")
        for key in ("contrastive_weight", "caption_weight"):
            value = config.objective.get(key, 1.0)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"config.objective.{key}={value!r} must be a number >= 0.")
        tok = config.data.get("tokenize") or {}
        if not tok:
            raise ConfigError("objective 'coca' needs config.data.tokenize (the captions' "
                              "tokenizer: the caption loss and the captioning eval use it).")

    def loss(self, params, extra, batch, rng, step):
        out = self.model.apply({"params": params}, batch["image"], batch["tokens"], train=True,
                               rngs={"dropout": rng})
        emb = self.embeddings_of(params, out, batch, rng)
        closs, (metrics, extra) = CLIPObjective.loss_from_embeddings(
            self, params, extra, emb, batch, rng, step)
        cap, acc = caption_loss(out["caption_logits"], batch["tokens"], self.pad_id)
        metrics = dict(metrics, contrastive_loss=closs, caption_loss=cap,
                       caption_token_accuracy=acc)
        return self.contrastive_weight * closs + self.caption_weight * cap, (metrics, extra)

    def caption(self, params, extra, images):
        """Greedy captions of ``images`` (``greedy_captions``)."""
        return greedy_captions(self.model, self.config, params, images)


def make(config) -> CoCaObjective:
    return CoCaObjective(config)
