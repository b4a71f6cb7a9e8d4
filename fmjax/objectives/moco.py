"""MoCo v3 (Chen, Xie & He, 2021), with MoCo v2's key queue as an option.

Reference: facebookresearch/moco-v3 (``moco/builder.py`` ``MoCo`` / ``MoCo_ViT``, ``main_moco.py``,
``vits.py``) and, for the queue, facebookresearch/moco (``moco/builder.py``
``_dequeue_and_enqueue``). Checked step by step by tests/reference/test_moco_trajectory.py.

Model: ``params = {backbone, projector, predictor}``: the base encoder (any registered model
with ``pooled``; its ``pre_logits`` feed the projector, as MoCo_ViT replaces the ViT's
``head`` by it), the projector (``MLPHead``, ``projector_layers`` = 3 for ViT: Linear
without bias -> BN -> ReLU, last Linear -> BN without affine) and the predictor (2 layers;
MoCo_ViT's ``_build_mlp(2, dim, mlp_dim, dim)`` keeps the last BN, ``predictor_last_bn``
'plain'; MoCo_ResNet's has none: 'none'). ``extra = {momentum: {backbone, projector}}`` is the
momentum encoder (an EMA of the base encoder and its projector, not of the predictor), plus
``queue`` [queue_size, dim] and ``queue_ptr`` with ``objective.queue_size > 0``; all of it is
sharded (the queue along its first axis by the ``batch`` logical axis, i.e. over the data
axes), checkpointed and resumed like the params.

The momentum update happens INSIDE ``loss`` (the reference updates the momentum encoder in
``forward`` before computing the keys, with the current, not yet updated, params:
``_update_momentum_encoder(m)`` then ``k = momentum_encoder(x)``), so ``loss`` returns the new
``extra`` and ``after_update`` is the identity. m follows ``adjust_moco_momentum``:
``1 - 0.5 (1 + cos(pi epoch / epochs)) (1 - m0)`` with the fractional epoch
``epoch + i / iters_per_epoch``, i.e. ``step / total_steps`` (the same cosine as
``fmjax.objectives.dino.ema_momentum``; ``momentum_cos=False``: constant m0).

Loss (``contrastive_loss``): q = predictor(projector(backbone(view))), k = momentum
projector(momentum backbone(view)), both L2-normalised;
``CE(q k^T / T, labels = own index) * 2T`` over the GLOBAL batch's keys (the reference's
``concat_all_gather`` plus DDP's gradient average: every device's query against every key),
symmetrised ``ctr(q1, k2) + ctr(q2, k1)``. BatchNorm in the heads uses the statistics of each
view over the global batch (``[views, B, D]`` groups; the reference calls the encoder once per
view, with SyncBN). With a queue (MoCo v2): logits ``[q.k+, q.queue] / T`` with label 0 (no
in-batch negatives), the queue as it was before the step for both terms, then this step's
keys (``[k2; k1]`` symmetric, ``k2`` otherwise) replace the oldest at ``queue_ptr``
(``_dequeue_and_enqueue``), so ``queue_size`` must be a multiple of the keys per step.
``scale_2t``: MoCo v3's ``* (2 * T)`` (False: MoCo v2's plain cross-entropy).

``config.grad_accum_steps`` K > 1 is exact: ``embed`` caches the backbones' per-example
features (the ViT has no batch statistics), and ``loss_from_embeddings`` runs the heads' BN,
the loss and the queue on the full batch.

A BatchNorm backbone (MoCo v2 / v3's ResNet-50; ``fmjax.models.resnet``): as builder.py's
``forward``, the base encoder runs on each view in turn and so does the momentum encoder, both
in training mode (batch statistics per view over the global batch: the reference's SyncBN;
MoCo v2's shuffling BN, a per-GPU remedy, has no counterpart and no need under global
statistics), each keeping its own running statistics (``extra['batch_stats']`` and
``extra['momentum_batch_stats']``, updated by its forward passes; the momentum update covers
params, as the reference averages ``parameters()`` only). Evaluation uses the base encoder's
running statistics. The backbone then couples the examples, so ``grad_accum_steps`` > 1 is
refused.

Reference options, not objective code: MoCo v3's ViT uses a fixed 2-D sin-cos position
embedding whose layout is MAE's with the row and column halves swapped
(``model.pos_embed='sincos_moco'``), a frozen random patch projection (``--stop-grad-conv1``:
``optimizer.frozen=('backbone/patch_embed/.*',)``: no gradient step, no decay, no Adam state,
as torch's ``requires_grad=False`` which AdamW skips; the momentum encoder still averages
it, as the reference does, a no-op up to rounding), AdamW over ``model.parameters()`` in one
group (``optimizer.decay_all=True``) and ``adjust_learning_rate``'s per-iteration linear
warm-up and half-cycle cosine to 0 (fmjax's default schedule with ``min_lr=0``).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.errors import ConfigError
from fmjax.models.heads import LAST_BN, MLPHead
from fmjax.models.registry import build_model, require, state_collections
from fmjax.objectives.base import Objective, refuse_accumulation, states, view_features

PARAM_INITS = ("reference", "jax")


def momentum_schedule(step, base: float, total_steps: int, cos: bool = True):
    """``(m, 1 - m)`` of main_moco.py's ``adjust_moco_momentum`` at ``step`` (the fractional epoch
    over the epochs is ``step / total_steps``): ``1 - 0.5 (1 + cos(pi step / total)) (1 - m0)``,
    as ``fmjax.objectives.dino.ema_momentum``; ``1 - m`` is computed directly (not as 1 minus
    a float32 m). ``cos=False``: the constant ``--moco-m``."""
    if not cos:
        return jnp.asarray(base, jnp.float32), jnp.asarray(1.0 - base, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
    one_minus = (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0
    return 1.0 - one_minus, one_minus


def momentum_update(momentum, online, m, one_minus_m):
    """builder.py ``_update_momentum_encoder``: ``param_m * m + param_b * (1 - m)`` leaf by leaf,
    no gradient to the online params."""
    return jax.tree.map(lambda t, s: t * m + jax.lax.stop_gradient(s) * one_minus_m, momentum, online)


def l2_normalize(x, eps: float = 1e-12):
    """torch ``F.normalize(x, dim=-1)``: x / max(||x||, eps)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def contrastive_loss(q, k, temperature: float, scale: float):
    """builder.py ``MoCo.contrastive_loss`` on the global batch: q, k [N, D] (not normalised) ->
    (``CE(q k^T / T, arange(N)) * scale``, top-1 accuracy of the positive key)."""
    q, k = l2_normalize(q), l2_normalize(k)
    logits = jnp.einsum("nc,mc->nm", q, k) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.diagonal(logp)) * scale
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(q.shape[0]))
    return loss, acc


def queue_loss(q, k, queue, temperature: float, scale: float):
    """MoCo v2's ``forward``: logits ``[q.k+, q.queue^T] / T``, label 0, times ``scale``.
    q, k [N, D] (not normalised); ``queue`` [K, D] (normalised keys; v2 stores its transpose)."""
    q, k = l2_normalize(q), l2_normalize(k)
    l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
    l_neg = jnp.einsum("nc,kc->nk", q, jax.lax.stop_gradient(queue).astype(jnp.float32))
    logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
    loss = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0]) * scale
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == 0)
    return loss, acc


def dequeue_and_enqueue(queue, ptr, keys):
    """MoCo v2's ``_dequeue_and_enqueue``: ``queue[ptr:ptr + N] = keys``, ``ptr = (ptr + N) % K``.
    ``queue`` [K, D] (v2's [D, K] transposed), ``keys`` [N, D] normalised, ``K % N == 0`` (the
    reference asserts it; ``check`` refuses other sizes)."""
    n, size = keys.shape[0], queue.shape[0]
    if size % n:
        raise ValueError(f"queue size {size} is not a multiple of the {n} keys per step.")
    ptr = jnp.asarray(ptr, jnp.int32)
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.int32(0)))
    return queue, (ptr + n) % size


class MoCoObjective(Objective):
    batch_keys = ("global_crops",)
    couples_examples = ("InfoNCE over the batch's keys and BatchNorm over the batch in the "
                        "projector and predictor")

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("pooled",), "objective 'moco'", config.model.name, carries=True)
        self.state_keys = state_collections(self.backbone)   # e.g. a ResNet's ('batch_stats',)
        self.patch_size = getattr(self.backbone, "patch_size", None)
        self.param_init = o.get("param_init", "reference")
        if self.param_init not in PARAM_INITS:
            raise ConfigError(f"config.objective.param_init={self.param_init!r}; valid: {PARAM_INITS}.")
        head_init = "torch_linear" if self.param_init == "reference" else "lecun_normal"
        self.dim, self.mlp_dim = int(o.get("dim", 256)), int(o.get("mlp_dim", 4096))
        proj_layers, pred_layers = int(o.get("projector_layers", 3)), int(o.get("predictor_layers", 2))
        pred_bn = o.get("predictor_last_bn", "plain")
        if self.dim < 1 or self.mlp_dim < 1:
            raise ConfigError(f"config.objective.dim={self.dim} and mlp_dim={self.mlp_dim} must be >= 1.")
        if proj_layers < 1 or pred_layers < 0:
            raise ConfigError(f"config.objective.projector_layers={proj_layers} must be >= 1 and "
                              f"predictor_layers={pred_layers} >= 0 (0: no predictor, as MoCo v1/v2).")
        if pred_bn not in LAST_BN:
            raise ConfigError(f"config.objective.predictor_last_bn={pred_bn!r}; valid: {LAST_BN} "
                              "(MoCo_ViT: 'plain', MoCo_ResNet: 'none').")
        dtype = self.backbone.dtype
        self.projector = MLPHead(hidden_dim=self.mlp_dim, out_dim=self.dim, num_layers=proj_layers,
                                 hidden_bias=False, last_bn="plain", kernel_init=head_init, dtype=dtype)
        self.predictor = (MLPHead(hidden_dim=self.mlp_dim, out_dim=self.dim, num_layers=pred_layers,
                                  hidden_bias=False, last_bn=pred_bn, kernel_init=head_init, dtype=dtype)
                          if pred_layers else None)
        self.temperature = float(o.get("temperature", 1.0))
        if not self.temperature > 0:
            raise ConfigError(f"config.objective.temperature={self.temperature} must be > 0 (MoCo v3 ViT: 0.2).")
        self.momentum = float(o.get("momentum", 0.99))
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"config.objective.momentum={self.momentum} must be in [0, 1] (MoCo v3: 0.99).")
        self.momentum_cos = bool(o.get("momentum_cos", True))
        self.symmetric = bool(o.get("symmetric", True))
        self.scale = 2.0 * self.temperature if o.get("scale_2t", True) else 1.0
        self.queue_size = int(o.get("queue_size", 0))
        self.total_steps = int(config.total_steps)
        self.keys_per_step = int(config.batch_size) * (2 if self.symmetric else 1)
        if self.queue_size < 0:
            raise ConfigError(f"config.objective.queue_size={self.queue_size} must be >= 0 (0: no queue).")
        if self.queue_size and self.queue_size % self.keys_per_step:
            raise ConfigError(
                f"config.objective.queue_size={self.queue_size} is not a multiple of the "
                f"{self.keys_per_step} keys enqueued per step (batch_size={config.batch_size}"
                f"{' x 2 views' if self.symmetric else ''}); MoCo v2 asserts K % batch == 0, e.g. "
                f"queue_size={max(1, round(self.queue_size / self.keys_per_step)) * self.keys_per_step}.")
        # Views: q from both and k from both (symmetric), else q from view 1 and k from view 2.
        self.q_views, self.k_views = ((0, 1), (0, 1)) if self.symmetric else ((0,), (1,))

    # -- model ------------------------------------------------------------------------------
    def _features(self, backbone, views, train, rng=None, state=None):
        """``base.view_features`` of this backbone: ([B, n, D] features, state after them)."""
        return view_features(self.backbone, self.state_keys, backbone, views, train, rng, state)

    def _states(self, extra):
        """(base, momentum) encoder states kept in ``extra`` ({} without state)."""
        return states(extra, self.state_keys, "momentum_")

    def _project(self, projector, feats):
        """[B, n, D] -> [n, B, dim]: BatchNorm statistics per view over the batch."""
        return self.projector.apply({"params": projector}, jnp.swapaxes(feats, 0, 1))

    def _query(self, params, feats):
        z = self._project(params["projector"], feats)
        return z if self.predictor is None else self.predictor.apply({"params": params["predictor"]}, z)

    def _encoders(self, params):
        return {"backbone": params["backbone"], "projector": params["projector"]}

    def init(self, rng, batch):
        b_rng, p_rng, q_rng, k_rng = jax.random.split(rng, 4)
        views = batch["global_crops"]
        variables = self.backbone.init({"params": b_rng}, views[:, 0])
        backbone, state = variables["params"], {k: variables[k] for k in self.state_keys}
        if self.param_init == "reference" and "cls_token" in backbone:
            # vits.py: nn.init.normal_(cls_token, std=1e-6); the ViT draws N(0, 0.02).
            backbone = dict(backbone)
            backbone["cls_token"] = jax.tree.map(lambda x: x * (1e-6 / 0.02), backbone["cls_token"])
        feats, _ = self._features(backbone, views[:, :1], False, state=state)
        projector = self.projector.init({"params": p_rng}, jnp.swapaxes(feats, 0, 1))["params"]
        params = {"backbone": backbone, "projector": projector}
        if self.predictor is not None:
            z = self._project(projector, feats)
            params["predictor"] = self.predictor.init({"params": q_rng}, z)["params"]
        extra = {"momentum": self._encoders(params),   # the momentum encoder starts as a copy
                 **state, **{"momentum_" + k: v for k, v in state.items()}}
        if self.queue_size:
            # builder.py (v2): torch.randn(dim, K), normalised along dim.
            queue = l2_normalize(jax.random.normal(k_rng, (self.queue_size, self.dim), jnp.float32))
            extra["queue"] = nn.LogicallyPartitioned(queue, ("batch", None))
            extra["queue_ptr"] = jnp.zeros((), jnp.int32)
        return params, extra

    def after_model_init(self, params, extra):
        return {**extra, "momentum": self._encoders(params),  # a copy of the (loaded) params, as in init
                **{"momentum_" + k: extra[k] for k in self.state_keys}}

    def momentum_at(self, step):
        return momentum_schedule(step, self.momentum, self.total_steps, self.momentum_cos)

    # -- loss -------------------------------------------------------------------------------
    def loss(self, params, extra, batch, rng, step):
        emb, extra = self._embed(params, extra, batch, rng, step)
        return self.loss_from_embeddings(params, extra, emb, batch, rng, step)

    def embed(self, params, extra, batch, rng, step):
        """The per-example half of ``loss``: backbone features ``{'query': [B, Vq, D]}`` (with
        gradient) and ``{'key': [B, Vk, D]}`` of the momentum backbone AFTER this step's momentum
        update (no gradient). The heads' BatchNorm and the loss are in ``loss_from_embeddings``,
        so ``config.grad_accum_steps`` > 1 keeps the full batch's statistics (a backbone
        without state; ``check`` refuses accumulation otherwise)."""
        return self._embed(params, extra, batch, rng, step)[0]

    def _embed(self, params, extra, batch, rng, step):
        """``embed`` and ``extra`` with the encoders' updated running statistics."""
        views = batch["global_crops"]
        m, one_minus = self.momentum_at(step)
        key_backbone = momentum_update(extra["momentum"]["backbone"], params["backbone"], m, one_minus)
        q_views = views[:, list(self.q_views)] if len(self.q_views) < views.shape[1] else views
        k_views = views[:, list(self.k_views)] if len(self.k_views) < views.shape[1] else views
        state, m_state = self._states(extra)
        query, state = self._features(params["backbone"], q_views, True, rng, state)
        # The momentum encoder runs in training mode as in the reference (batch statistics for a
        # BatchNorm backbone; a ViT has no dropout there, so train=False is the same function).
        key, m_state = self._features(key_backbone, k_views, bool(self.state_keys), state=m_state)
        if self.state_keys:
            extra = {**extra, **state, **{"momentum_" + k: v for k, v in m_state.items()}}
        return {"query": query, "key": jax.lax.stop_gradient(key)}, extra

    def loss_from_embeddings(self, params, extra, emb, batch, rng, step):
        m, one_minus = self.momentum_at(step)
        momentum = momentum_update(extra["momentum"], self._encoders(params), m, one_minus)
        q = self._query(params, emb["query"])                                     # [Vq, B, dim]
        k = jax.lax.stop_gradient(self._project(momentum["projector"], emb["key"]))  # [Vk, B, dim]
        # (query view, key view) pairs: ctr(q1, k2) + ctr(q2, k1), or ctr(q1, k2).
        pairs = ((0, 1), (1, 0)) if self.symmetric else ((0, 0),)
        new_extra = dict(extra, momentum=momentum)
        losses, accs = [], []
        for iq, ik in pairs:
            if self.queue_size:
                loss, acc = queue_loss(q[iq], k[ik], extra["queue"], self.temperature, self.scale)
            else:
                loss, acc = contrastive_loss(q[iq], k[ik], self.temperature, self.scale)
            losses.append(loss)
            accs.append(acc)
        if self.queue_size:
            keys = jnp.concatenate([l2_normalize(k[ik]) for _, ik in pairs], axis=0)
            queue, ptr = dequeue_and_enqueue(extra["queue"], extra["queue_ptr"], keys)
            new_extra.update(queue=queue, queue_ptr=ptr)
        qn = l2_normalize(jax.lax.stop_gradient(q))
        metrics = {"contrastive_acc": jnp.mean(jnp.stack(accs)), "momentum": m,
                   # std over the batch of the normalised queries, x sqrt(dim): ~1 when spread
                   # over the sphere, -> 0 when they collapse to one point.
                   "q_std": jnp.mean(jnp.std(qn, axis=1)) * math.sqrt(self.dim)}
        return sum(losses), (metrics, new_extra)

    # -- checks, evaluation ----------------------------------------------------------------
    def check(self, config):
        refuse_accumulation(self.state_keys, config)
        for name, ev in dict(config.get("evals") or {}).items():
            if ev.get("type") == "images":
                pp = str(ev.get("pp") or config.data.get("pp_eval", ""))
                if "two_views(" not in pp and "multi_crop(" not in pp:
                    raise ConfigError(
                        f"config.evals.{name}: MoCo's pictures are the training views; set its pp to "
                        "the two_views pipeline, e.g. pp=\"two_views(32)|keep('global_crops')\".")

    def features(self, params, extra, images):
        """The base encoder's pooled output (what MoCo v3's main_lincls.py probes; a BatchNorm
        backbone with its running statistics)."""
        return self.backbone.apply({"params": params["backbone"], **self._states(extra)[0]},
                                   images)["pre_logits"]

    def visualize(self, params, extra, batch, rng):
        """Three rows over the first 8 examples: view 1, view 2, and the view 2 (of the whole
        batch) whose key is nearest to view 1's query (== the second row where the
        contrastive task is solved)."""
        views = batch["global_crops"]
        state, m_state = self._states(extra)
        feats, _ = self._features(params["backbone"], views, False, state=state)
        q = l2_normalize(self._query(params, feats)[0])
        k_feats, _ = self._features(extra["momentum"]["backbone"], views, False, state=m_state)
        k = l2_normalize(self._project(extra["momentum"]["projector"], k_feats)[1])
        nearest = np.asarray(jnp.argmax(q @ k.T, axis=-1))
        from fmjax.evals import images as images_lib
        mean, std = NORMALIZE_PRESETS[self.config.data.get("normalization", "imagenet")]
        v = images_lib.denormalize(np.asarray(views, np.float32), mean, std)
        n = min(8, v.shape[0])
        return {"views": images_lib.image_grid([v[:n, 0], v[:n, 1], v[nearest[:n], 1]])}

    def health(self, metrics):
        q_std = metrics.get("train/q_std")
        if q_std is not None and q_std < 0.05:
            return (f"MoCo collapse: the queries' spread q_std={q_std:.3f} (x sqrt(dim)) is near 0; "
                    "check the lr, the temperature and the augmentations.")
        return None


def make(config) -> MoCoObjective:
    return MoCoObjective(config)
