"""Knowledge distillation: a student classifier trained on the labels and a frozen teacher.

The teacher is a trained fmjax classifier workdir (``objective.teacher.workdir=DIR``,
optionally ``step=N``; its EMA weights when it kept them, else its params; a LoRA-adapted
teacher is merged first). It is read once on the host when the objective is built, kept in
``extra['teacher']`` (sharded and checkpointed with the state, so a resume never re-reads
the teacher directory) and run in inference mode with no adapter hooks, on exactly the
images the student sees (after mixup / CutMix when they are on, as DeiT feeds its teacher).

The loss is facebookresearch/deit ``losses.py`` ``DistillationLoss`` on the class head
(the student needs no distillation token):

- ``kd='soft'``: ``(1 - alpha) CE(student, targets) + alpha T^2 KL(teacher_T || student_T)``
  with ``softmax(logits / T)`` on both sides, summed over classes and divided by
  ``batch x classes`` (DeiT: ``F.kl_div(..., reduction='sum', log_target=True) * T * T /
  outputs_kd.numel()``); Hinton et al. 2015 divide by the batch only: ``kd_norm='batch'``.
- ``kd='hard'``: ``(1 - alpha) CE(student, targets) + alpha CE(student, argmax teacher)``
  (DeiT's hard-label distillation; DeiT uses alpha 0.5).
- A student with DeiT's distillation token (``model.distill_token=True``) takes the
  supervised term on its class head (``cls_logits``) and the distillation term on its
  distillation head (``dist_logits``), as DeiT's ``DistillationLoss`` receives
  ``(outputs, outputs_kd)``; evaluation uses the mean of the two heads (``logits``).
- ``kd='none'``: the plain supervised loss (the student baseline with the same code path).
- ``feature_weight`` > 0 adds feature distillation on the pooled ``pre_logits``
  (``feature_kd='cosine'``: 1 - cos; ``'mse'``: mean squared error); the student and teacher
  widths must then match (no projection is learned).

``targets`` are the (label-smoothed, mixed) labels of the supervised objective; evaluation,
features and pictures are the student's, as in ``supervised``. Metrics: ``base_loss``,
``kd_loss``, ``teacher_accuracy`` and ``agreement`` (student argmax == teacher argmax).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.errors import ConfigError
from fmjax.models import inject
from fmjax.models.registry import build_model, require
from fmjax.objectives.supervised import SupervisedObjective

KD = ("soft", "hard", "none")
FEATURE_KD = ("cosine", "mse")
OPTIONS = ("name", "teacher", "kd", "alpha", "temperature", "kd_norm", "feature_kd", "feature_weight",
           "label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "ema_decay")


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def load_teacher(spec, num_classes: int, dtype: str = "float32"):
    """``(model, params, description)`` of the teacher classifier named by ``spec``
    (``workdir``, ``step``); one-line ConfigErrors for anything that cannot serve."""
    import ml_collections
    import orbax.checkpoint as ocp

    from fmjax import adapt
    from fmjax.adapt import lora as lora_lib
    workdir = spec.get("workdir") if hasattr(spec, "get") else None
    if not workdir:
        raise ConfigError("objective 'distill' needs a teacher: train a classifier first (e.g. "
                          "configs/supervised.py) and pass --config.objective.teacher.workdir=DIR "
                          "(or --config.objective.kd=none for the student alone).")
    workdir = os.path.abspath(os.path.expanduser(str(workdir)))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"config.objective.teacher.workdir={workdir} has no config.json; name a "
                          "directory written by launch/train.py.")
    with open(path) as f:
        tconf = ml_collections.ConfigDict(json.load(f))
    tclasses = int(tconf.model.get("num_classes", 0) or 0)
    if tclasses != num_classes:
        raise ConfigError(f"teacher {workdir} has {tclasses} classes (model.num_classes), the student "
                          f"{num_classes}; distillation needs the same label space.")
    step = spec.get("step")
    steps = _steps(workdir)
    if not steps or (step is not None and int(step) not in steps):
        raise ConfigError(f"teacher workdir={workdir}: no checkpoint{'' if step is None else f' at step {step}'}; "
                          f"available: {steps}.")
    step = steps[-1] if step is None else int(step)
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    extra = state.get("extra") or {}
    use_ema = isinstance(extra, dict) and "ema" in extra
    params = jax.tree.map(np.asarray, jax.device_get(extra["ema"] if use_ema else state["params"]))
    a = adapt.spec(tconf)
    if a is not None:
        if a["name"] != "lora":
            raise ConfigError(f"teacher {workdir} trains a {a['name']!r} adapter; only a LoRA teacher "
                              "can be merged into a plain model.")
        params = jax.tree.map(np.asarray, lora_lib.merge(params, a["alpha"], a["rank"]))
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
           if not np.isfinite(v).all()]
    if bad:
        raise ConfigError(f"teacher {workdir} step {step} holds non-finite params (e.g. {bad[0]}).")
    model = build_model(tconf.model, dtype)
    require(model, ("classifier", "pooled"), "a distillation teacher", tconf.model.get("name"))
    return model, params, f"{workdir} step {step}{' (ema)' if use_ema else ''}"


class DistillObjective(SupervisedObjective):
    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        unknown = sorted(set(o.keys()) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"config.objective has unknown keys {unknown} for 'distill'; valid: {list(OPTIONS)}.")
        self.kd = o.get("kd", "soft")
        if self.kd not in KD:
            raise ConfigError(f"config.objective.kd={self.kd!r}; valid: {list(KD)}.")
        self.alpha = float(o.get("alpha", 0.5))
        self.temperature = float(o.get("temperature", 1.0))
        self.kd_norm = o.get("kd_norm", "deit")
        if self.kd_norm not in ("deit", "batch"):
            raise ConfigError(f"config.objective.kd_norm={self.kd_norm!r}; valid: ['deit', 'batch'].")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"config.objective.alpha={self.alpha} must be in [0, 1] and temperature="
                              f"{self.temperature} > 0.")
        self.feature_kd = o.get("feature_kd", "cosine")
        self.feature_weight = float(o.get("feature_weight", 0.0) or 0.0)
        if self.feature_kd not in FEATURE_KD:
            raise ConfigError(f"config.objective.feature_kd={self.feature_kd!r}; valid: {list(FEATURE_KD)}.")
        self.teacher_model = None
        if self.kd != "none" or self.feature_weight > 0:
            self.teacher_model, self._teacher_params, self.teacher_name = load_teacher(
                o.get("teacher") or {}, self.num_classes, config.get("dtype", "float32"))
            if self.feature_weight > 0:
                ws, wt = getattr(self.model, "width", None), getattr(self.teacher_model, "width", None)
                if ws != wt:
                    raise ConfigError(f"feature distillation compares pooled features: student width {ws} "
                                      f"!= teacher width {wt} (no projection is learned); set "
                                      "objective.feature_weight=0.")

    def init(self, rng, batch):
        params, extra = super().init(rng, batch)
        if self.teacher_model is not None:
            extra = dict(extra, teacher=jax.tree.map(jnp.asarray, self._teacher_params))
        return params, extra

    def _teacher(self, extra, images):
        with inject.suspended():  # the student's adapter hooks are not the teacher's
            out = self.teacher_model.apply({"params": jax.lax.stop_gradient(extra["teacher"])}, images)
        return jax.tree.map(lambda v: v.astype(jnp.float32), out)

    def loss(self, params, extra, batch, rng, step):
        images, targets, metrics, rng = self.inputs_and_targets(batch, rng)
        out, extra = self.apply_train(params, extra, images, rng)
        logits = out["logits"].astype(jnp.float32)
        if "dist_logits" in out:  # DeiT: the class head learns the labels, the dist head the teacher
            logits, kd_logits = out["cls_logits"].astype(jnp.float32), out["dist_logits"].astype(jnp.float32)
        else:
            kd_logits = logits
        base = optax.softmax_cross_entropy(logits, targets).mean()
        metrics.update(accuracy=(logits.argmax(-1) == batch["label"]).mean(), base_loss=base)
        if self.teacher_model is None:
            return base, (metrics, extra)
        t_out = self._teacher(extra, images)
        t_logits = t_out["logits"]
        if self.kd == "soft":
            T = self.temperature
            log_s, log_t = jax.nn.log_softmax(kd_logits / T), jax.nn.log_softmax(t_logits / T)
            kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s))
            denom = kd_logits.size if self.kd_norm == "deit" else kd_logits.shape[0]
            kd = kl * T * T / denom
        elif self.kd == "hard":
            kd = optax.softmax_cross_entropy_with_integer_labels(kd_logits, t_logits.argmax(-1)).mean()
        else:
            kd = jnp.zeros(())
        loss = base if self.kd == "none" else (1 - self.alpha) * base + self.alpha * kd
        if self.feature_weight > 0:
            fs, ft = out["pre_logits"].astype(jnp.float32), t_out["pre_logits"]
            if self.feature_kd == "cosine":
                cos = jnp.sum(fs * ft, -1) / (jnp.linalg.norm(fs, axis=-1) * jnp.linalg.norm(ft, axis=-1) + 1e-8)
                feat = jnp.mean(1.0 - cos)
            else:
                feat = jnp.mean(jnp.square(fs - ft))
            loss = loss + self.feature_weight * feat
            metrics["feature_loss"] = feat
        metrics.update(kd_loss=kd, teacher_accuracy=(t_logits.argmax(-1) == batch["label"]).mean(),
                       agreement=(kd_logits.argmax(-1) == t_logits.argmax(-1)).mean())
        return loss, (metrics, extra)


def make(config) -> DistillObjective:
    return DistillObjective(config)
