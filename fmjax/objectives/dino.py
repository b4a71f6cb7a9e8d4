"""DINO (Caron et al., 2021): self-distillation with no labels, multi-crop and an EMA teacher.

Student = ViT backbone + DINO head (``params``); teacher = an EMA copy of both, carried
with the center in the objective state (``extra = {teacher, center}``), so it is sharded
like the params, checkpointed, and resumed exactly. Every schedule is a function of the
step (teacher temperature warm-up, EMA momentum 0.996 -> 1 cosine, the last-layer freeze;
weight decay 0.04 -> 0.4 lives in the optimizer), so nothing else needs saving.

Batches hold ``global_crops`` [B, 2, G, G, C] and ``local_crops`` [B, N, L, L, C] (the
``multi_crop`` transform): one backbone forward per resolution. The loss, center and
monitors are computed on the global batch inside the jit-sharded step, so the center is
the mean over every device's teacher outputs (tests/objectives/test_dino.py checks 8
devices against 1, and the formulas against a NumPy transcription of the reference).
``config.grad_accum_steps`` K > 1: the center and the loss couple the batch's examples, so the
trainer caches the head outputs of the K micro-batches (``embed``: student [B, V, out_dim],
teacher [B, 2, out_dim]) and runs ``loss_from_embeddings`` once on the full batch
(fmjax.train.step.cached_embedding_loss_and_grad): loss, center update and gradients as without
accumulation, for the cost of those outputs and their gradient in memory. A BatchNorm head
(``use_bn_in_head``) would use micro-batch statistics: refused (``check``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.errors import ConfigError
from fmjax.evals import attention as attention_lib
from fmjax.models.dino_head import DINOHead
from fmjax.models.registry import build_model, capabilities, require
from fmjax.objectives.base import Objective

def teacher_temperature(step, warmup_temp: float, temp: float, warmup_steps: int, every: int = 1):
    """The reference's ``np.concatenate((np.linspace(warmup_temp, temp, W), np.ones(...) * temp))``
    indexed by ``step // every`` with ``W = warmup_steps // every``.

    ``every``: the number of steps the temperature is held (1: a per-step schedule; the
    reference's schedule is per epoch, ``every = steps per epoch``). As ``np.linspace``:
    ``W == 0`` gives ``temp`` throughout and ``W == 1`` gives ``warmup_temp`` for the first
    block, then ``temp``.
    """
    every = max(int(every), 1)
    w = int(warmup_steps) // every
    if w <= 0:
        return jnp.asarray(temp, jnp.float32)
    e = jnp.asarray(step, jnp.int32) // every
    ramp = warmup_temp + (temp - warmup_temp) * e.astype(jnp.float32) / max(w - 1, 1)
    return jnp.where(e < w, ramp, temp).astype(jnp.float32)


def ema_momentum(step, base: float, total_steps: int):
    """Cosine from ``base`` at step 0 to 1 at the last step (the reference's schedule)."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp, center_momentum):
    """The DINO loss over all (teacher global view, student view) pairs of different views.

    Args:
      student_out: [B, V, K] head outputs for every view (the 2 global views first).
      teacher_out: [B, 2, K] teacher head outputs for the global views.
      center: [1, K]. Returns (loss, new center, monitors).
    """
    s = jax.nn.log_softmax(student_out.astype(jnp.float32) / student_temp, axis=-1)
    t_logits = (teacher_out.astype(jnp.float32) - center) / teacher_temp
    t = jax.lax.stop_gradient(jax.nn.softmax(t_logits, axis=-1))
    ce = -jnp.einsum("bik,bvk->biv", t, s)                  # [B, 2, V]
    v = student_out.shape[1]
    pairs = 1.0 - jnp.eye(2, v)                             # skip same-view pairs
    n_terms = float(2 * v - 2)
    loss = jnp.sum(ce.mean(0) * pairs) / n_terms
    # Monitors: teacher entropy and KL(teacher || student) over the same pairs.
    ent = -jnp.sum(t * jax.nn.log_softmax(t_logits, axis=-1), axis=-1)   # [B, 2]
    kl = jnp.sum((ce - ent[..., None]).mean(0) * pairs) / n_terms
    teacher_out = jax.lax.stop_gradient(teacher_out.astype(jnp.float32))
    batch_center = teacher_out.reshape(-1, teacher_out.shape[-1]).mean(0, keepdims=True)
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return loss, new_center, {"teacher_entropy": ent.mean(), "kl": kl}


class DINOObjective(Objective):
    batch_keys = ("global_crops", "local_crops")
    # Exact with config.grad_accum_steps > 1 through embed + loss_from_embeddings (fmjax.train.step),
    # unless the head has BatchNorm (``check``).
    couples_examples = "the teacher outputs are centred by the batch mean"

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        # Local crops are smaller than global ones: the backbone must take any resolution.
        require(self.backbone, ("pooled", "any_resolution") if o.get("num_local_crops", 0) else ("pooled",),
                "objective 'dino'", config.model.name)
        self.head = DINOHead(
            out_dim=o.get("out_dim", 65536), hidden_dim=o.get("hidden_dim", 2048),
            bottleneck_dim=o.get("bottleneck_dim", 256), num_layers=o.get("head_layers", 3),
            norm_last_layer=o.get("norm_last_layer", True),
            use_bn=bool(o.get("use_bn_in_head", False)),
            dtype=self.backbone.dtype)
        self.patch_size = getattr(self.backbone, "patch_size", None)
        self.num_local = int(o.get("num_local_crops", 0))
        if self.num_local == 0:
            self.batch_keys = ("global_crops",)
        self.total_steps = int(config.total_steps)
        self.student_temp = float(o.get("student_temp", 0.1))
        every = int(o.get("teacher_temp_every", 1))
        warm = int(o.get("warmup_teacher_temp_steps", 0))
        if every < 1 or warm % every:
            raise ValueError(f"config.objective.teacher_temp_every={every} must be >= 1 and divide "
                             f"warmup_teacher_temp_steps={warm} (the reference's schedule is per epoch: "
                             "both in steps, every = steps per epoch).")
        self.teacher_temp = (float(o.get("warmup_teacher_temp", 0.04)), float(o.get("teacher_temp", 0.07)),
                             warm, every)
        self.momentum = float(o.get("momentum_teacher", 0.996))
        self.center_momentum = float(o.get("center_momentum", 0.9))
        self.freeze_last_layer_steps = int(o.get("freeze_last_layer_steps", 0))

    # -- model ------------------------------------------------------------------------------
    def _forward(self, params, crops, train, rng=None):
        """[B, n, H, W, C] crops -> [B, n, K] head outputs, one backbone call for all n views."""
        b, n = crops.shape[:2]
        x = crops.reshape((b * n,) + crops.shape[2:])     # example-major: keeps the batch sharding
        rngs = {"dropout": rng} if rng is not None else {}
        feats = self.backbone.apply({"params": params["backbone"]}, x, train=train, rngs=rngs)["pre_logits"]
        out = self.head.apply({"params": params["head"]}, feats)
        return out.reshape(b, n, -1)

    def init(self, rng, batch):
        b_rng, h_rng = jax.random.split(rng)
        images = batch["global_crops"][:, 0]
        backbone = self.backbone.init({"params": b_rng}, images)["params"]
        feats = self.backbone.apply({"params": backbone}, images)["pre_logits"]
        head = self.head.init({"params": h_rng}, feats)["params"]
        params = {"backbone": backbone, "head": head}
        center = jnp.zeros((1, self.head.out_dim), jnp.float32)
        return params, {"teacher": params, "center": center}   # the teacher starts as the student

    def schedules(self, step) -> dict:
        return {"teacher_temp": teacher_temperature(step, *self.teacher_temp),
                "momentum": ema_momentum(step, self.momentum, self.total_steps)}

    def loss(self, params, extra, batch, rng, step):
        return self.loss_from_embeddings(params, extra, self.embed(params, extra, batch, rng, step),
                                         batch, rng, step)

    def embed(self, params, extra, batch, rng, step):
        """The per-example half of ``loss``: head outputs ``{'student': [B, V, K], 'teacher':
        [B, 2, K]}``. With ``config.grad_accum_steps`` > 1 the trainer caches them for every
        micro-batch, so the loss, its center and the center's update see the whole batch
        (fmjax.train.step.cached_embedding_loss_and_grad), as without accumulation."""
        g_rng, l_rng = jax.random.split(rng)
        student = [self._forward(params, batch["global_crops"], True, g_rng)]
        if self.num_local:
            student.append(self._forward(params, batch["local_crops"], True, l_rng))
        teacher = self._forward(extra["teacher"], batch["global_crops"], False)
        return {"student": jnp.concatenate(student, axis=1),
                "teacher": jax.lax.stop_gradient(teacher)}

    def loss_from_embeddings(self, params, extra, emb, batch, rng, step):
        sched = self.schedules(step)
        loss, center, monitors = dino_loss(emb["student"], emb["teacher"], extra["center"],
                                           self.student_temp, sched["teacher_temp"],
                                           self.center_momentum)
        extra = dict(extra, center=center)
        metrics = dict(monitors, teacher_temp=sched["teacher_temp"], momentum=sched["momentum"])
        return loss, (metrics, extra)

    def check(self, config):
        accum = int(config.get("grad_accum_steps", 1))
        if accum > 1 and self.head.use_bn:
            raise ConfigError(
                f"grad_accum_steps={accum} with config.objective.use_bn_in_head=True: the head's "
                "BatchNorm would normalise each micro-batch by its own statistics, not the full "
                "batch's; use grad_accum_steps=1 or use_bn_in_head=False (the DINO default).")

    def update_mask(self, params, step):
        """The head's last layer is frozen (skipped by the optimizer) for the first steps."""
        frozen = step < self.freeze_last_layer_steps
        mask = jax.tree.map(lambda _: jnp.asarray(True), params)
        head = dict(mask["head"])
        for k in ("last_layer_v", "last_layer_g"):
            if k in head:
                head[k] = jnp.logical_not(frozen)
        return dict(mask, head=head)

    def after_model_init(self, params, extra):
        return {**extra, "teacher": params}  # the teacher starts as the (loaded) params, as in init

    def after_update(self, params, extra, step):
        """EMA: teacher <- m * teacher + (1 - m) * student (backbone and head)."""
        m = ema_momentum(step, self.momentum, self.total_steps)
        teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s, extra["teacher"], params)
        return dict(extra, teacher=teacher)

    def features(self, params, extra, images):
        """The teacher backbone's (pooled) output, as the reference uses for kNN."""
        return self.backbone.apply({"params": extra["teacher"]["backbone"]}, images)["pre_logits"]

    def visualize(self, params, extra, batch, rng):
        """Last-layer CLS attention of the teacher, per head, over validation images; a backbone
        without attention maps (ConvNeXt, Swin) shows the first three principal components of
        the teacher's final patch tokens over the batch instead (DINO's PCA figure)."""
        images = batch["image"]
        mean, std = NORMALIZE_PRESETS[self.config.data.get("normalization", "imagenet")]
        teacher = {"params": extra["teacher"]["backbone"]}
        if "attention_maps" in capabilities(self.backbone):
            maps = self.backbone.apply(teacher, images, method=type(self.backbone).attention_maps)
            grid = attention_lib.attention_grid(np.asarray(images), np.asarray(maps), self.patch_size,
                                                mean, std, n=8)
            return {"attention": grid}
        tokens = np.asarray(self.backbone.apply(teacher, images)["patch_tokens"], np.float64)   # B, N, C
        b, n, c = tokens.shape
        flat = tokens.reshape(-1, c) - tokens.reshape(-1, c).mean(0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        maps = (flat @ vt[:3].T).reshape(b, n, -1).transpose(0, 2, 1)                      # B, 3, N
        side = int(round(n ** 0.5))
        grid = attention_lib.attention_grid(np.asarray(images), maps, images.shape[1] // side, mean, std, n=8)
        return {"pca": grid}

    def health(self, metrics: dict) -> str | None:
        """A warning when the monitors signal collapse (see docs/design.md, DINO)."""
        ent, kl = metrics.get("train/teacher_entropy"), metrics.get("train/kl")
        if ent is None or kl is None:
            return None
        max_ent = math.log(self.head.out_dim)
        if ent < 0.05 * max_ent and kl < 0.05:
            return (f"DINO collapse: teacher entropy {ent:.3f} and KL {kl:.3f} are both near 0 "
                    "(one dimension dominates); raise center_momentum or lower teacher_temp's warm-up.")
        if ent > 0.98 * max_ent:
            return (f"DINO collapse: teacher entropy {ent:.3f} is near ln(out_dim)={max_ent:.3f} "
                    "(uniform outputs); lower teacher_temp or check the centering.")
        return None


def make(config) -> DINOObjective:
    return DINOObjective(config)

