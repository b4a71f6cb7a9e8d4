"""BYOL (Grill et al., 2020): bootstrap your own latent, an online network that predicts an EMA
target network's projection of another view, with no negatives.

The reference is deepmind-research/byol (``byol_experiment.py``, ``utils/{networks,helpers,
schedules,optimizers}.py``); what each part transcribes:

- ``params = {backbone, projector, predictor}`` (the online network); ``extra = {target:
  {backbone, projector}}`` (the target network, sharded, checkpointed and resumed like the
  params; its predictor is never used in the loss, so it is not kept).
- Projector and predictor: ``networks.MLP`` = Linear(hidden, bias) -> BatchNorm -> ReLU ->
  Linear(out, NO bias) (``with_bias=False`` in the reference), i.e. ``MLPHead(hidden_bias=True,
  last_bias=False, last_bn='none')``. BatchNorm uses the batch statistics in training mode,
  for the online AND the target network (the reference applies both with ``is_training=True``),
  and the reference applies the network to each view separately, so the statistics are per
  view: the heads get ``[2, B, D]`` (G = 2 groups). Under the jit-sharded step B is the global
  batch: the reference's ``cross_replica_axis``.
- Loss (``loss_fn``): ``regression_loss(x, y) = sum((x / |x| - y / |y|)^2)`` (= 2 - 2 cos, with
  ``l2_normalize``'s ``rsqrt(max(sum x^2, 1e-12))``), summed over the two (online prediction of
  view i, target projection of view 3 - i) pairs, THEN averaged over the batch: the loss lies
  in [0, 8], not [0, 4]. (The reference adds a linear classifier on the stop-gradient online
  embedding for monitoring; fmjax monitors with its kNN / probe evaluators instead.)
- Target EMA (``_update_fn``): after the optimizer step, ``target <- target + (1 - tau) *
  (online - target)`` with the NEW online params and ``tau = target_ema(k) = 1 - (1 -
  base_target_ema) * (1 + cos(pi * min(k, K) / K)) / 2``, k the step the update belongs to
  (0 for the first; fmjax's ``after_update`` gets the same pre-increment step), K =
  ``config.total_steps``.
- Target init (``_make_initial_state``): the target is initialised from its OWN random key
  (``target_init='independent'``, the reference; it says it saw no difference with the same
  key); ``'copy'`` starts it as the online network. ``config.model_init`` (a pretrained start)
  copies the loaded online params into the target.
- Optimizer and lr: LARS (``utils/optimizers.py lars``: decay, trust ratio, momentum, then the
  lr, which is fmjax's ``optimizer.name='lars'`` ordering) with ``exclude_bias_and_norm`` for
  both the weight decay and the adaptation (``optimizer.lars_exclude`` in configs/byol.py),
  ``learning_schedule`` = linear warm-up from 0 + cosine to 0 of ``base_lr * batch / 256``
  (``lr_scaling='linear'``). Checked over 27 steps by tests/reference/test_byol_trajectory.py.

Gradient accumulation (``config.grad_accum_steps`` K > 1): the heads' BatchNorm couples the
examples of a batch, so the loss is split at the backbone's pooled features (``embed``:
online and target ``[B, 2, D]``, per example for a backbone without batch statistics, as
the ViT) and the heads and the loss run once on the full batch (``loss_from_embeddings``;
fmjax.train.step.cached_embedding_loss_and_grad): exact, for the memory of those features.

A BatchNorm backbone (the paper's ResNet-50; ``fmjax.models.resnet``): as the reference, each
view is a separate backbone call in training mode (BatchNorm statistics per view, over the
global batch: the reference's ``cross_replica_axis``), the online and the target network each
keep their own running statistics (``extra['batch_stats']`` and ``extra['target_batch_stats']``,
updated by their forward passes, view 1 then view 2, as the reference threads ``online_state``
/ ``target_state``; the target EMA covers params only), and evaluation uses the online
running statistics. Such a backbone couples the examples inside the backbone too, so
``grad_accum_steps`` > 1 is refused.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.models.heads import MLPHead
from fmjax.models.registry import build_model, require, state_collections
from fmjax.objectives.base import Objective, refuse_accumulation, states, view_features

TARGET_INITS = ("independent", "copy")


def target_ema(step, base_ema: float, max_steps: int):
    """``schedules.target_ema``: ``1 - (1 - base_ema) * _cosine_decay(step, max_steps, 1)``,
    with TF1's cosine decay ``0.5 * (1 + cos(pi * min(step, max_steps) / max_steps))``; the
    same operations in the same order (float32), so the value is the reference's."""
    step = jnp.minimum(jnp.asarray(step, jnp.int32), max_steps)
    decay = 0.5 * (1 + jnp.cos(jnp.pi * step / max_steps))
    return (1.0 - (1.0 - base_ema) * decay).astype(jnp.float32)


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """``helpers.l2_normalize``: ``x * rsqrt(max(sum(x^2), epsilon))``."""
    square_sum = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(square_sum, epsilon))


def regression_loss(x, y):
    """``helpers.regression_loss``: ``sum((x / |x| - y / |y|)^2, -1)`` = 2 - 2 cos(x, y)."""
    return jnp.sum(jnp.square(l2_normalize(x) - l2_normalize(y)), axis=-1)


def byol_loss(predictions, targets):
    """``loss_fn``'s representation loss.

    Args:
      predictions: [2, B, D] online predictions of view 1 and view 2.
      targets: [2, B, D] target projections of view 1 and view 2 (no gradient).
    Returns the batch mean of ``l(p1, z2') + l(p2, z1')``.
    """
    targets = jax.lax.stop_gradient(targets.astype(jnp.float32))
    predictions = predictions.astype(jnp.float32)
    per_example = regression_loss(predictions[0], targets[1]) + regression_loss(predictions[1], targets[0])
    return jnp.mean(per_example)


class BYOLObjective(Objective):
    batch_keys = ("global_crops",)
    # Exact with config.grad_accum_steps > 1 through embed + loss_from_embeddings (module docstring).
    couples_examples = "the projector's and predictor's BatchNorm normalise by batch statistics"

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("pooled",), "objective 'byol'", config.model.name, carries=True)
        self.state_keys = state_collections(self.backbone)   # e.g. a ResNet's ('batch_stats',)
        self.patch_size = getattr(self.backbone, "patch_size", None)
        out = int(o.get("projection_dim", 256))
        head = dict(num_layers=2, hidden_bias=True, last_bias=False, last_bn="none",
                    bn_eps=float(o.get("bn_eps", 1e-5)), kernel_init=o.get("head_init", "lecun_normal"),
                    dtype=self.backbone.dtype)
        self.projector = MLPHead(hidden_dim=int(o.get("projector_hidden_dim", 4096)), out_dim=out, **head)
        self.predictor = MLPHead(hidden_dim=int(o.get("predictor_hidden_dim", 4096)), out_dim=out, **head)
        self.base_ema = float(o.get("base_target_ema", 0.996))
        self.target_init = o.get("target_init", "independent")
        self.total_steps = int(config.total_steps)

    # -- config ---------------------------------------------------------------------------------
    def check(self, config):
        o = config.objective
        if not 0.0 <= self.base_ema <= 1.0:
            raise ConfigError(f"config.objective.base_target_ema={self.base_ema} must be in [0, 1] "
                              "(the target's EMA decay at step 0; the reference uses 0.996, 0.99 or 0.97).")
        if self.target_init not in TARGET_INITS:
            raise ConfigError(f"config.objective.target_init={self.target_init!r}; valid: "
                              f"{', '.join(TARGET_INITS)} (independent: the reference's own random init).")
        for key in ("projector_hidden_dim", "predictor_hidden_dim", "projection_dim"):
            v = o.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config.objective.{key}={v!r} must be a positive integer "
                                  "(the reference: hidden 4096, projection 256).")
        if float(o.get("bn_eps", 1e-5)) <= 0:
            raise ConfigError(f"config.objective.bn_eps={o.get('bn_eps')} must be > 0 (haiku's 1e-5).")
        accum = max(int(config.get("grad_accum_steps", 1)), 1)
        if int(config.batch_size) // accum < 2:
            raise ConfigError(f"batch_size={config.batch_size} (grad_accum_steps={accum}) gives the heads' "
                              "BatchNorm fewer than 2 examples per view; use batch_size >= 2.")
        if int(config.total_steps) < 1:
            raise ConfigError(f"total_steps={config.total_steps}: the target EMA schedule needs >= 1 step.")
        refuse_accumulation(self.state_keys, config)

    # -- model ----------------------------------------------------------------------------------
    def _features(self, backbone_params, crops, train, rng=None, state=None):
        """``base.view_features`` of this backbone: ([B, V, D] features, state after them)."""
        return view_features(self.backbone, self.state_keys, backbone_params, crops, train, rng, state)

    def _init_network(self, rng, images):
        b_rng, p_rng, q_rng = jax.random.split(rng, 3)
        variables = self.backbone.init({"params": b_rng}, images)
        backbone, state = variables["params"], {k: variables[k] for k in self.state_keys}
        feats = self.backbone.apply({"params": backbone, **state}, images)["pre_logits"][None]
        projector = self.projector.init({"params": p_rng}, feats)["params"]
        proj = self.projector.apply({"params": projector}, feats)
        predictor = self.predictor.init({"params": q_rng}, proj)["params"]
        return {"backbone": backbone, "projector": projector, "predictor": predictor}, state

    def _states(self, extra):
        """(online, target) backbone states kept in ``extra`` ({} without state)."""
        return states(extra, self.state_keys, "target_")

    def init(self, rng, batch):
        """Online and target networks from two keys split from ``rng`` (the reference's
        ``rng_online, rng_target = jax.random.split(rng)``)."""
        online_rng, target_rng = jax.random.split(rng)
        images = batch["global_crops"][:, 0]
        params, state = self._init_network(online_rng, images)
        source, t_state = (self._init_network(target_rng, images) if self.target_init == "independent"
                           else (params, state))
        return params, {"target": {"backbone": source["backbone"], "projector": source["projector"]},
                        **state, **{"target_" + k: v for k, v in t_state.items()}}

    def after_model_init(self, params, extra):
        """A pretrained start: the target starts as the (loaded) online backbone and projector
        (and its running statistics as the online ones)."""
        return {**extra, "target": {"backbone": params["backbone"], "projector": params["projector"]},
                **{"target_" + k: extra[k] for k in self.state_keys}}

    # -- loss -----------------------------------------------------------------------------------
    def loss(self, params, extra, batch, rng, step):
        emb, extra = self._embed(params, extra, batch, rng)
        return self.loss_from_embeddings(params, extra, emb, batch, rng, step)

    def embed(self, params, extra, batch, rng, step):
        """The per-example half of ``loss``: pooled backbone features ``{'online': [B, 2, D],
        'target': [B, 2, D]}`` (the target's without gradient). Only for a backbone without
        state (``check`` refuses accumulation otherwise)."""
        return self._embed(params, extra, batch, rng)[0]

    def _embed(self, params, extra, batch, rng):
        """``embed`` and ``extra`` with the backbones' updated running statistics."""
        crops = batch["global_crops"]
        t_rng = jax.random.fold_in(rng, 1)
        online_state, target_state = self._states(extra)
        online, online_state = self._features(params["backbone"], crops, True, rng, online_state)
        target, target_state = self._features(extra["target"]["backbone"], crops, True, t_rng, target_state)
        if self.state_keys:
            extra = {**extra, **online_state, **{"target_" + k: v for k, v in target_state.items()}}
        return {"online": online, "target": jax.lax.stop_gradient(target)}, extra

    def loss_from_embeddings(self, params, extra, emb, batch, rng, step):
        """Projector (online and target) and predictor on the full batch, per view, and the loss."""
        views = lambda f: jnp.swapaxes(f, 0, 1)              # [B, 2, D] -> [2, B, D]: BN per view
        proj = self.projector.apply({"params": params["projector"]}, views(emb["online"]))
        pred = self.predictor.apply({"params": params["predictor"]}, proj)
        target = self.projector.apply({"params": extra["target"]["projector"]}, views(emb["target"]))
        loss = byol_loss(pred, target)
        # Monitors: the online/target cosine, and the spread of the normalised online projections
        # over the batch (per dimension, times sqrt(D): ~1 for spread-out outputs, 0 when collapsed).
        cos = jnp.mean(jnp.sum(l2_normalize(pred) * jax.lax.stop_gradient(
            l2_normalize(target[::-1].astype(jnp.float32))), axis=-1))
        z = jax.lax.stop_gradient(l2_normalize(proj.astype(jnp.float32)))
        spread = jnp.mean(jnp.std(z, axis=1)) * math.sqrt(z.shape[-1])
        metrics = {"cosine": cos, "projection_spread": spread,
                   "tau": target_ema(step, self.base_ema, self.total_steps)}
        return loss, (metrics, extra)

    def after_update(self, params, extra, step):
        """``target <- target + (1 - tau) * (online - target)`` with the updated online params."""
        tau = target_ema(step, self.base_ema, self.total_steps)
        online = {"backbone": params["backbone"], "projector": params["projector"]}
        target = jax.tree.map(lambda x, y: x + (1 - tau) * (y - x), extra["target"], online)
        return dict(extra, target=target)

    # -- evaluation -----------------------------------------------------------------------------
    def features(self, params, extra, images):
        """The online backbone's pooled features (the reference evaluates the online network;
        a BatchNorm backbone with its running statistics)."""
        return self.backbone.apply({"params": params["backbone"], **self._states(extra)[0]},
                                   images)["pre_logits"]

    def _view_op(self):
        """The pp op of ``config.data.pp_train`` that makes the two views (``two_views`` /
        ``multi_crop``), or None."""
        from fmjax.data.color_ops import multi_crop
        from fmjax.data.transforms import parse
        try:
            ops = parse(str(self.config.data.get("pp_train", "") or "")).transforms
        except (ValueError, TypeError):
            return None
        return next((op for op in ops if isinstance(op, multi_crop)), None)

    def visualize(self, params, extra, batch, rng):
        """The training views of validation images: row 1 the images, rows 2 and 3 their two
        views drawn by ``pp_train``'s ``two_views`` op (view 1: blur p 1.0; view 2: blur p 0.1,
        solarize p 0.2), with the online/target cosine they give in the metrics of training."""
        from fmjax.data.transforms import NORMALIZE_PRESETS
        from fmjax.evals.images import denormalize, image_grid, to_uint8
        op = self._view_op()
        if op is None:
            return {}
        mean, std = NORMALIZE_PRESETS[self.config.data.get("normalization", "imagenet")]
        images = to_uint8(denormalize(np.asarray(batch["image"])[:8], mean, std))
        seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
        r = np.random.default_rng(seed)
        views = np.stack([op({"image": im}, r)["global_crops"] for im in images], axis=1)  # [2, n, S, S, C]
        norm = op.global1[-1]
        views = denormalize(views, norm.mean, norm.std)
        rows = [views[0], views[1]]
        if images.shape[1:3] == views.shape[2:4]:
            rows = [images] + rows
        return {"views": image_grid(rows)}

    def health(self, metrics):
        """A warning when the online projections collapse to one direction."""
        spread = metrics.get("train/projection_spread")
        if spread is not None and spread < 0.05:
            return (f"BYOL collapse: the normalised online projections barely vary over the batch "
                    f"(spread {spread:.3f}; ~1 when spread out); lower the lr or raise base_target_ema.")
        return None


def make(config) -> BYOLObjective:
    return BYOLObjective(config)
