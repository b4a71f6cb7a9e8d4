"""SimCLR (Chen et al., 2020): two augmented views, a projection head with BatchNorm, and the
NT-Xent contrastive loss over the global batch.

The training step of google-research/simclr ``tf2/`` (run.py ``single_step``, model.py
``Model`` / ``ProjectionHead`` / ``LinearLayer``, objective.py ``add_contrastive_loss``):

- Batches hold ``global_crops`` [B, 2, S, S, C] (the ``two_views(..., recipe='simclr')`` pp
  op). Both views go through the backbone in one call (SimCLR concatenates them along the
  batch), any registered model with the ``pooled`` capability (its ``pre_logits``).
- The projection head (``fmjax.models.heads.MLPHead``, ``hidden_bias=False,
  last_bn='scale'``): ``head_layers`` - 1 hidden layers Linear (no bias) -> BatchNorm (centre
  and scale) -> ReLU, then Linear (no bias) -> BatchNorm with scale and no centre, out
  ``out_dim`` (128). ``head_layers`` is SimCLR's ``num_proj_layers``: 2 in v1, 3 in v2; the
  hidden width is the backbone's (``hidden_dim=0``, as SimCLR's ``int(input_shape[-1])``).
  The BatchNorm statistics are those of both views together (G = 1 over 2B rows: SimCLR's
  concatenated batch), over the global batch (SimCLR's ``global_bn=True``, cross-replica).
- NT-Xent exactly as ``add_contrastive_loss`` (``nt_xent``): optional L2 normalisation
  (``hidden_norm``), logits / ``temperature``, the same-view self-similarities masked with
  ``LARGE_NUM`` = 1e9, ``loss = mean(loss_a + loss_b)`` (the sum of both directions, not
  their mean: twice CLIP's convention). Inside the jit-sharded step the projections are global
  arrays, so every example sees the whole batch's negatives: SimCLR's
  ``tpu_cross_replica_concat`` with the per-replica loss divided by the replica count, i.e.
  the single-device global-batch loss and gradient (tests/objectives/test_simclr.py checks 8
  simulated devices against 1).
- Metrics as SimCLR logs them (``metrics.update_pretrain_metrics_train``): ``contrast_acc``
  (argmax of ``logits_ab`` is the positive) and ``contrast_entropy`` (of softmax(logits_ab),
  + 1e-8 inside the log), plus ``pos_cosine`` (mean cosine of the positive pairs) and
  ``embedding_std`` (per-dimension std of the normalised projections times sqrt(dim): about 1
  when they spread over the sphere, 0 when they collapse to a point).

SimCLR's ``lineareval_while_pretraining`` head (a linear classifier on stop-gradient features
trained beside the loss) is not part of the objective: the kNN / linear-probe evaluators
measure the features instead. The optimizer (LARS with SimCLR's exclusions and lr-in-momentum,
WarmUpAndCosineDecay) is ``config.optimizer`` (see configs/simclr.py).

Gradient accumulation is refused (``couples_examples``): the negatives could be cached as
CLIP does, but the head's BatchNorm normalises with the statistics of the batch it sees, so a
micro-batch step is not the full batch's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.errors import ConfigError
from fmjax.models.heads import MLPHead
from fmjax.models.registry import build_model, require, state_collections
from fmjax.objectives.base import Objective

LARGE_NUM = 1e9  # objective.py


def l2_normalize(x, eps: float = 1e-12):
    """``tf.math.l2_normalize``: x * rsqrt(max(sum(x^2), eps))."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def nt_xent(hidden1, hidden2, temperature: float, hidden_norm: bool = True):
    """google-research/simclr ``add_contrastive_loss`` on the whole batch (one replica).

    Args:
      hidden1, hidden2: [B, D] projections of the first and second views (row i of each is
        the same image).
    Returns:
      (loss, logits_ab [B, B], monitors): ``loss = mean_i(loss_a_i + loss_b_i)``, where
      ``loss_a`` is the cross-entropy of row i of ``[logits_ab, logits_aa]`` with label i.
    """
    h1, h2 = hidden1.astype(jnp.float32), hidden2.astype(jnp.float32)
    if hidden_norm:
        h1, h2 = l2_normalize(h1), l2_normalize(h2)
    b = h1.shape[0]
    masks = jnp.eye(b, dtype=jnp.float32)
    logits_aa = h1 @ h1.T / temperature - masks * LARGE_NUM
    logits_bb = h2 @ h2.T / temperature - masks * LARGE_NUM
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    labels = jnp.arange(b)

    def xent(logits):  # softmax_cross_entropy_with_logits(one_hot(labels, 2B), logits)
        return jax.nn.logsumexp(logits, axis=-1) - logits[labels, labels]

    loss_a = xent(jnp.concatenate([logits_ab, logits_aa], axis=1))
    loss_b = xent(jnp.concatenate([logits_ba, logits_bb], axis=1))
    loss = jnp.mean(loss_a + loss_b)
    # metrics.update_pretrain_metrics_train: on logits_ab only.
    acc = jnp.mean((jnp.argmax(logits_ab, axis=1) == labels).astype(jnp.float32))
    prob = jax.nn.softmax(logits_ab, axis=-1)
    entropy = -jnp.mean(jnp.sum(prob * jnp.log(prob + 1e-8), axis=-1))
    n1, n2 = l2_normalize(h1), l2_normalize(h2)
    z = jnp.concatenate([n1, n2], axis=0)
    monitors = {"contrast_acc": acc, "contrast_entropy": entropy,
                "pos_cosine": jnp.mean(jnp.sum(n1 * n2, axis=-1)),
                "embedding_std": jnp.mean(jnp.std(z, axis=0)) * np.sqrt(z.shape[-1])}
    return loss, logits_ab, monitors


class SimCLRObjective(Objective):
    batch_keys = ("global_crops",)
    # grad_accum_steps > 1 is refused by the config check (no embed / loss_from_embeddings).
    couples_examples = ("the contrastive negatives are the other examples of the batch and the "
                        "projection head's BatchNorm normalises by the whole batch's statistics")

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("pooled",), "objective 'simclr'", config.model.name, carries=True)
        # A backbone's own state (a ResNet's BatchNorm running statistics, 'batch_stats'), kept in
        # extra under the collection's name: training updates it, features / pictures read it.
        self.state_keys = state_collections(self.backbone)
        self.patch_size = getattr(self.backbone, "patch_size", None)
        self.temperature = float(o.get("temperature", 0.1))
        self.hidden_norm = bool(o.get("hidden_norm", True))
        self.head_layers = int(o.get("head_layers", 3))
        self.hidden_dim = int(o.get("hidden_dim", 0) or 0)   # 0: the backbone's width (SimCLR)
        self.out_dim = int(o.get("out_dim", 128))
        self.head_init = str(o.get("head_init", "normal_0.01"))

    def head(self, feat_dim: int) -> MLPHead:
        """The projection head for backbone features of width ``feat_dim``."""
        return MLPHead(hidden_dim=self.hidden_dim or int(feat_dim), out_dim=self.out_dim,
                       num_layers=self.head_layers, hidden_bias=False, last_bias=False,
                       last_bn="scale", kernel_init=self.head_init, dtype=self.backbone.dtype)

    # -- model ------------------------------------------------------------------------------
    def _encode(self, backbone_params, images, train, rng=None, extra=None):
        """(pooled features, ``extra`` with the backbone state that a training pass updated).
        A backbone with state (``state_keys``) normalises by the batch's statistics in training
        (over both views together: SimCLR's global BatchNorm over the 2B rows) and by its
        running ones otherwise."""
        rngs = {"dropout": rng} if rng is not None else {}
        extra = {} if extra is None else extra
        variables = {"params": backbone_params, **{k: extra[k] for k in self.state_keys}}
        if train and self.state_keys:
            out, state = self.backbone.apply(variables, images, train=True, rngs=rngs,
                                             mutable=list(self.state_keys))
            return out["pre_logits"], {**extra, **state}
        return self.backbone.apply(variables, images, train=train, rngs=rngs)["pre_logits"], extra

    def project(self, params, crops, train=True, rng=None, extra=None):
        """[B, 2, H, W, C] views -> (features [B, 2, D], projections [B, 2, out_dim], ``extra``
        updated): one backbone call on both views (``train``: its dropout / drop path, its
        BatchNorm's batch statistics), the head's BatchNorm over all 2B rows (always the
        batch's statistics, as SimCLR's pre-training)."""
        b, n = crops.shape[:2]
        x = crops.reshape((b * n,) + crops.shape[2:])     # example-major: keeps the batch sharding
        feats, extra = self._encode(params["backbone"], x, train, rng, extra)
        z = self.head(feats.shape[-1]).apply({"params": params["head"]}, feats[None])[0]
        return feats.reshape(b, n, -1), z.reshape(b, n, -1), extra

    def init(self, rng, batch):
        b_rng, h_rng = jax.random.split(rng)
        crops = batch["global_crops"]
        images = crops.reshape((-1,) + crops.shape[2:])
        variables = self.backbone.init({"params": b_rng}, images)
        extra = {k: variables[k] for k in self.state_keys}
        feats, _ = self._encode(variables["params"], images, False, extra=extra)
        head = self.head(feats.shape[-1]).init({"params": h_rng}, feats[None])["params"]
        return {"backbone": variables["params"], "head": head}, extra

    def loss(self, params, extra, batch, rng, step):
        crops = batch["global_crops"]
        _, z, extra = self.project(params, crops, True, rng, extra)
        loss, _, monitors = nt_xent(z[:, 0], z[:, 1], self.temperature, self.hidden_norm)
        return loss, (monitors, extra)

    def check(self, config):
        o = config.objective
        where = "config.objective"
        if not float(o.get("temperature", 0.1)) > 0:
            raise ConfigError(f"{where}.temperature={o.get('temperature')} must be > 0 (SimCLR: 0.1; "
                              "0.5 in its CIFAR-10 runs).")
        if int(o.get("head_layers", 3)) < 1:
            raise ConfigError(f"{where}.head_layers={o.get('head_layers')} must be >= 1 (SimCLR's "
                              "num_proj_layers: 2 in v1, 3 in v2).")
        if int(o.get("out_dim", 128)) < 1:
            raise ConfigError(f"{where}.out_dim={o.get('out_dim')} must be >= 1 (SimCLR: 128).")
        if int(o.get("hidden_dim", 0) or 0) < 0:
            raise ConfigError(f"{where}.hidden_dim={o.get('hidden_dim')} must be >= 0 (0: the backbone's "
                              "width, as SimCLR).")
        try:
            MLPHead(hidden_dim=2, out_dim=2, kernel_init=self.head_init).init(
                jax.random.PRNGKey(0), jnp.zeros((1, 2, 2)))
        except ValueError as e:
            raise ConfigError(f"{where}.head_init={self.head_init!r}: {e}") from None

    def features(self, params, extra, images):
        """The backbone's pooled output (``pre_logits``), as SimCLR's linear evaluation uses
        (a BatchNorm backbone: with its running statistics)."""
        return self._encode(params["backbone"], images, False, extra=extra)[0]

    # -- pictures ---------------------------------------------------------------------------
    def visualize(self, params, extra, batch, rng, n: int = 8):
        """Pictures of a batch. With ``global_crops`` (an ``images`` eval whose ``pp`` is the
        training pipeline): 'views', three rows over ``n`` examples: view 1, view 2 and the
        model's pick, the second view among the WHOLE batch's whose projection is the most
        similar to view 1's (the contrastive task; the pick is right when rows 2 and 3 agree).
        With only ``image`` (``pp_eval``): 'neighbours', each of ``n`` images (first row)
        above its 3 nearest other images of the batch by cosine of the backbone features."""
        from fmjax.evals.images import denormalize, image_grid
        mean, std = NORMALIZE_PRESETS[self.config.data.get("normalization", "imagenet")]

        def show(x):  # denormalised, small images enlarged (nearest) so the shapes are visible
            k = display_scale(x.shape[-2])
            x = denormalize(np.asarray(x, np.float32), mean, std)
            return np.repeat(np.repeat(x, k, axis=-3), k, axis=-2)
        if "global_crops" in batch:
            crops = batch["global_crops"]
            _, z, _ = self.project(params, crops, False, extra=extra)   # the head's BatchNorm: this batch's statistics
            z = np.asarray(z, np.float32)
            z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            pick = np.argmax(z[:n, 0] @ z[:, 1].T, axis=1)
            views = np.asarray(crops)
            return {"views": image_grid([show(views[:n, 0]), show(views[:n, 1]), show(views[pick, 1])])}
        images = batch["image"]
        f = np.asarray(self.features(params, extra, images), np.float32)
        f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        sim = f[:n] @ f.T
        sim[np.arange(min(n, len(f))), np.arange(min(n, len(f)))] = -np.inf
        order = np.argsort(-sim, axis=1)[:, :3]
        imgs = np.asarray(images)
        rows = [show(imgs[:n])] + [show(imgs[order[:, j]]) for j in range(order.shape[1])]
        return {"neighbours": image_grid(rows)}


def display_scale(size: int) -> int:
    """Nearest-neighbour enlargement of ``size``-pixel views in the pictures (to >= 64 px)."""
    return max(1, -(-64 // int(size)))


def make(config) -> SimCLRObjective:
    return SimCLRObjective(config)
