"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) image-text contrastive training.

The loss is taken over the GLOBAL batch: inside the jit-sharded step the embeddings
are global arrays, so ``image_embeds @ text_embeds.T`` is the full [B, B] similarity
matrix (XLA all-gathers the shards across the data axes) and every example sees every
negative. Its gradients are exactly those of the single-device global-batch loss —
the semantics of open_clip's ``gather_with_grad=True`` + ``local_loss``
(tests/objectives/test_clip_loss.py checks both against an explicit shard_map version).

``config.objective.hard_negatives``: NegCLIP (Yuksekgonul et al., 2023) hard negatives. The
pipeline's ``swap_words`` op writes each caption with one listed word swapped (e.g. the
shape), tokenized as ``neg_tokens``; those texts join the image->text candidates, so the
model must tell the swapped word apart even when colour and position already pick the caption.

``config.objective.loss_impl``: how the loss is computed (same value and gradients either way).
  * ``'gathered'`` (default): the global [B, B] logits above. Per device that is O(B x B) floats
    (at least B x B_local): 4 Gi entries, 16 GiB in float32, at B = 65,536.
  * ``'ring'``: ``fmjax.parallel.ring_loss``, the SigLIP paper's chunked loss. Inside
    ``shard_map`` each device keeps its B_local image embeddings while the text (and hard
    negative) embeddings go around the batch axes ('data', 'fsdp') by ``ppermute``; each ring
    step forms one [B_local, B_local] block. Softmax accumulates the i2t log-sum-exp per row
    and carries the t2i one with each text chunk; the backward is a second ring pass
    (``custom_vjp``) that recomputes the blocks. Peak memory O(B_local^2 + B_local x D) per
    device. Communication: n - 1 neighbour sends of the B_local x D chunks per pass (the
    bytes of an all-gather; the backward also sends the gradient accumulators), in n
    sequential steps; the backward recomputes each block (one more B_local x D x B_local
    matmul per step). i2t_acc / t2i_acc come from a running argmax in the ring, equal to
    the gathered ones. Use it when the B x B logits dominate memory (large
    global batches, many devices); at small batches 'gathered' is one fused matmul and
    faster. The ring follows the ambient mesh (``jax.set_mesh``, which the trainer enters
    while it traces the step); with no mesh, or one device on the batch axes, it runs the
    whole batch as one chunk. tests/objectives/test_clip_ring_loss.py checks it against
    'gathered' on 8 simulated devices (values, gradients, metrics, a train step).

``config.grad_accum_steps`` K > 1 keeps the full batch of negatives (open_clip's
``accum_freq``): ``loss`` is ``loss_from_embeddings(embed(...))``, and the trainer embeds the K
micro-batches without gradients, runs the loss once on the cached full-batch embeddings, then
re-embeds each micro-batch with gradients and pulls its slice of the embedding gradient back
(``fmjax.train.step.cached_embedding_loss_and_grad``). Loss, accuracies and gradients (logit
scale and bias included, counted once) equal the unaccumulated step's; activation memory is one
micro-batch's, plus the [B, embed_dim] embeddings and their gradient; each micro-batch runs the
towers' forward twice. Either ``loss_impl``; tests/objectives/test_clip_grad_accum.py.
"""
from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import optax

from fmjax.data import text_ops
from fmjax.errors import ConfigError
from fmjax.models.registry import build_model, require, state_collections
from fmjax.objectives.base import Objective, refuse_accumulation
from fmjax.parallel.ring_loss import ring_loss

MAX_LOGIT_SCALE = math.log(100.0)
LOSS_IMPLS = ("gathered", "ring")


def model_init_is_set(config) -> bool:
    """``config.model_init`` names a source (fmjax.train.model_init.is_set, without the import)."""
    mi = config.get("model_init")
    return bool(mi) and bool(mi.get("workdir") or mi.get("torch"))


def _similarity(image_embeds, text_embeds, logit_scale):
    return logit_scale * image_embeds.astype(jnp.float32) @ text_embeds.astype(jnp.float32).T


def softmax_clip_loss(image_embeds, text_embeds, logit_scale, neg_embeds=None, neg_valid=None):
    """Symmetric InfoNCE over the batch; embeddings L2-normalised, ``logit_scale`` = exp(param).

    ``neg_embeds`` (B, D): one hard-negative caption per image (NegCLIP), appended to the
    image->text candidates (B x 2B logits; columns with ``neg_valid`` 0 are masked out). The
    text->image direction and the returned (B, B) logits are unchanged.
    """
    logits = _similarity(image_embeds, text_embeds, logit_scale)
    labels = jnp.arange(logits.shape[0])
    i2t = logits
    if neg_embeds is not None:
        neg = _similarity(image_embeds, neg_embeds, logit_scale)
        i2t = jnp.concatenate([logits, jnp.where(neg_valid[None, :] > 0, neg, -jnp.inf)], axis=1)
    li = optax.softmax_cross_entropy_with_integer_labels(i2t, labels).mean()
    lt = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (li + lt) / 2, logits


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, neg_embeds=None,
                 neg_valid=None):
    """SigLIP: independent binary losses, +1 on the diagonal, -1 elsewhere; / batch size.
    ``neg_embeds`` (B, D) add B x B more negative pairs (those with ``neg_valid`` 1)."""
    logits = _similarity(image_embeds, text_embeds, logit_scale) + logit_bias
    z = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    total = jnp.sum(jax.nn.log_sigmoid(z * logits))
    if neg_embeds is not None:
        neg = _similarity(image_embeds, neg_embeds, logit_scale) + logit_bias
        total += jnp.sum(jax.nn.log_sigmoid(-neg) * (neg_valid[None, :] > 0))
    return -total / logits.shape[0], logits


def ring_softmax_clip_loss(image_embeds, text_embeds, logit_scale, neg_embeds=None,
                           neg_valid=None, mesh=None):
    """``softmax_clip_loss`` by a ring over the mesh's batch axes (``loss_impl='ring'``).
    Returns ``(loss, {'i2t_acc', 't2i_acc'})`` instead of the [B, B] logits."""
    return ring_loss("softmax", image_embeds, text_embeds, logit_scale, None, neg_embeds,
                     neg_valid, mesh=mesh)


def ring_sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, neg_embeds=None,
                      neg_valid=None, mesh=None):
    """``sigmoid_loss`` by a ring over the mesh's batch axes (``loss_impl='ring'``).
    Returns ``(loss, {'i2t_acc', 't2i_acc'})`` instead of the [B, B] logits."""
    return ring_loss("sigmoid", image_embeds, text_embeds, logit_scale, logit_bias, neg_embeds,
                     neg_valid, mesh=mesh)


class CLIPObjective(Objective):
    batch_keys = ("image", "tokens")
    # Exact with config.grad_accum_steps > 1 through embed + loss_from_embeddings (fmjax.train.step).
    couples_examples = "the other examples of the batch are each example's contrastive negatives"

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("image_text",), "objective 'clip'", config.model.name, carries=True)
        if hasattr(self.model, "check_towers"):  # bad tower sub-configs: one line, before any compile
            self.model.check_towers()
        # An image tower with BatchNorm (ALIGN's ResNet): its running statistics, carried in extra.
        self.state_keys = state_collections(self.model)
        self.patch_size = getattr(self.model, "image_patch_size",   # None: no patch grid
                                  getattr(self.model, "patch_size", None))
        self.lock = config.objective.get("lock", "")  # "", "image" or "text" (LiT)
        if self.lock not in ("", "image", "text"):
            raise ValueError(f"config.objective.lock={self.lock!r}; valid: '', 'image', 'text'.")
        # NegCLIP hard negatives: the pipeline's swap_words + tokenize give neg_tokens/neg_valid.
        self.hard_negatives = bool(config.objective.get("hard_negatives", False))
        if self.hard_negatives:
            self.batch_keys = self.batch_keys + ("neg_tokens", "neg_valid")
        # open_clip clamps the log-scale to [0, ln 100] after every step (train.py); big_vision's
        # SigLIP trainer does not clamp its temperature (released SigLIP models sit above 100).
        self.clamp_logit_scale = bool(config.objective.get("clamp_logit_scale", True))
        # 'gathered': the global [B, B] logits; 'ring': the chunked ring (module docstring).
        self.loss_impl = config.objective.get("loss_impl", "gathered")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"config.objective.loss_impl={self.loss_impl!r}; valid: "
                             f"{', '.join(map(repr, LOSS_IMPLS))}.")

    def check(self, config):
        text = config.model.get("text") or {}
        text_ops.check_vocab(config, text.get("vocab_size") or config.model.get("vocab_size"))
        refuse_accumulation(self.state_keys, config)
        if self.state_keys and self.lock == "image":
            raise ConfigError("objective.lock='image' with a BatchNorm image tower: a locked tower's running "
                              "statistics would still move in training; lock a tower without BatchNorm.")
        if self.lock and not model_init_is_set(config) and jax.process_index() == 0:
            print(f"fmjax: warning: objective.lock={self.lock!r} with no config.model_init: the "
                  f"locked {self.lock} tower stays at its random init (LiT loads it, e.g. "
                  "--config.model_init.workdir=DIR).", file=sys.stderr, flush=True)

    def init(self, rng, batch):
        variables = self.model.init({"params": rng}, batch["image"], batch["tokens"])
        return variables["params"], {k: variables[k] for k in self.state_keys}

    def _variables(self, params, extra):
        return {"params": params, **{k: extra[k] for k in self.state_keys}}

    def loss(self, params, extra, batch, rng, step):
        emb, state = self._embed(params, extra, batch, rng)
        loss, (metrics, extra) = self.loss_from_embeddings(params, extra, emb, batch, rng, step)
        return loss, (metrics, dict(extra, **state) if state else extra)

    def embed(self, params, extra, batch, rng, step):
        """The per-example half of ``loss``: ``{'image', 'text'}`` embeddings [B, embed_dim]
        (and ``'neg'``, the hard negatives'), the locked tower's without gradient. With
        ``config.grad_accum_steps`` > 1 the trainer caches them for every micro-batch and
        ``loss_from_embeddings`` sees the whole batch's: every example keeps the full batch
        of negatives (open_clip's ``accum_freq``; fmjax.train.step)."""
        return self._embed(params, extra, batch, rng)[0]

    def _embed(self, params, extra, batch, rng):
        """(``embed``'s embeddings, the image tower's updated state: {} without one)."""
        state = {}
        if self.state_keys:  # BatchNorm in the image tower: batch statistics, running stats updated
            out, state = self.model.apply(self._variables(params, extra), batch["image"], batch["tokens"],
                                          train=True, rngs={"dropout": rng}, mutable=list(self.state_keys))
            state = dict(state)
        else:
            out = self.model.apply({"params": params}, batch["image"], batch["tokens"], train=True,
                                   rngs={"dropout": rng})
        emb = self.embeddings_of(params, out, batch, rng)
        if self.lock == "image":  # no backward through the locked tower (its update is masked too)
            emb["image"] = jax.lax.stop_gradient(emb["image"])
        elif self.lock == "text":
            emb = dict(emb, **{k: jax.lax.stop_gradient(v) for k, v in emb.items() if k != "image"})
        return emb, state

    def embeddings_of(self, params, out, batch, rng):
        """``{'image', 'text'}`` from the model's outputs ``out``, plus ``'neg'``: the hard
        negatives' text embeddings (a second text-tower pass) when ``hard_negatives``."""
        emb = {"image": out["image_embeds"], "text": out["text_embeds"]}
        if self.hard_negatives:
            emb["neg"] = self.model.apply(
                {"params": params}, batch["neg_tokens"], train=True, method=self.model.encode_text,
                rngs={"dropout": jax.random.fold_in(rng, 1)})
        return emb

    def loss_from_embeddings(self, params, extra, emb, batch, rng, step):
        """The contrastive loss of ``embed``'s embeddings (the whole batch's), with the logit
        scale and bias from ``params``: ``(loss, (metrics, extra))``."""
        scale, bias = self.model.apply({"params": params}, method=self.model.logit_terms)
        img, txt = emb["image"], emb["text"]
        neg = {}
        if self.hard_negatives:
            neg = dict(neg_valid=batch["neg_valid"], neg_embeds=emb["neg"])
        sigmoid = self.model.loss == "sigmoid"
        metrics = {"logit_scale": scale}
        if self.loss_impl == "ring":  # no [B, B] logits: the metrics come from the ring
            fn = ring_sigmoid_loss if sigmoid else ring_softmax_clip_loss
            loss, acc = fn(img, txt, scale, *([bias] if sigmoid else []), **neg)
            metrics.update(acc)
            return loss, (metrics, extra)
        if sigmoid:
            loss, logits = sigmoid_loss(img, txt, scale, bias, **neg)
        else:
            loss, logits = softmax_clip_loss(img, txt, scale, **neg)
        labels = jnp.arange(logits.shape[0])
        metrics.update(i2t_acc=(logits.argmax(1) == labels).mean(),
                       t2i_acc=(logits.argmax(0) == labels).mean())
        return loss, (metrics, extra)

    def update_mask(self, params, step):
        """LiT: the locked tower gets no update at all (no weight decay either)."""
        locked = {"image": ("image", "image_proj"), "text": ("text",)}.get(self.lock, ())
        return {k: jax.tree.map(lambda _: k not in locked, v) for k, v in params.items()}

    def project_params(self, params, step):
        """Clamp the learnable log-scale to [0, ln 100] after each update, as open_clip's
        train.py does (``objective.clamp_logit_scale``, default True; False: big_vision's
        SigLIP trainer, which leaves its temperature unclamped)."""
        if not self.clamp_logit_scale:
            return params
        params = dict(params)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        return params

    def features(self, params, extra, images):
        return self.model.apply(self._variables(params, extra), images, method=self.model.encode_image)

    def text_features(self, params, extra, tokens):
        return self.model.apply(self._variables(params, extra), tokens, method=self.model.encode_text)


def make(config) -> CLIPObjective:
    return CLIPObjective(config)
