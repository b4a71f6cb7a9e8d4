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

**Stored sparse teacher logits** (TinyViT's fast distillation; ``fmjax.data.stored_logits``):
``store_topk`` (``launch/store_logits.py``) runs the teacher once on every batch the config's
run will draw, mixed as this objective mixes it, and keeps the top-k of ``softmax(logits / T)``
per example; ``objective.teacher.logits=DIR`` (with ``teacher_topk('DIR')`` in
``config.data.pp_train``) replays them: no teacher is loaded or run. The target is the k
stored probabilities with the remaining mass spread evenly over the other classes (TinyViT's
sparse soft labels), and the KD term is the soft KD's KL at the stored T (``kd='soft'``), or the
CE against the stored top-1 class (``kd='hard'``). With k = the number of classes the replayed
run equals the live-teacher run (tests/objectives/test_distill.py). The store's fingerprint
(data, split, seed, batch size, order, pp_train, mixing options) must match the run's.

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
        self.teacher_model, self.stored = None, None
        teacher = o.get("teacher") or {}
        logits_dir = teacher.get("logits") if hasattr(teacher, "get") else None
        if logits_dir and self.kd != "none":
            from fmjax.data import stored_logits
            self.stored = stored_logits.read_meta(logits_dir)
            self.stored_dir = os.path.abspath(os.path.expanduser(str(logits_dir)))
            if self.feature_weight > 0:
                raise ConfigError("feature distillation needs the teacher's features, which stored "
                                  "logits (objective.teacher.logits) do not hold: set "
                                  "objective.feature_weight=0 or drop teacher.logits.")
            if int(self.stored["num_classes"]) != self.num_classes:
                raise ConfigError(f"stored teacher logits {self.stored_dir} have "
                                  f"{self.stored['num_classes']} classes, the student {self.num_classes}.")
            if self.kd == "soft" and float(self.stored["temperature"]) != self.temperature:
                raise ConfigError(f"stored teacher logits {self.stored_dir} are probabilities at "
                                  f"temperature {self.stored['temperature']}; set "
                                  f"--config.objective.temperature={self.stored['temperature']} (or store again).")
            self.batch_keys = tuple(self.batch_keys) + stored_logits.KEYS
            self.teacher_name = f"stored top-{self.stored['topk']} logits in {self.stored_dir}"
        elif self.kd != "none" or self.feature_weight > 0:
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
        if self.stored is not None:
            return self._stored_loss(logits, kd_logits, base, batch, metrics, extra)
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

    def _stored_loss(self, logits, kd_logits, base, batch, metrics, extra):
        """The KD term against stored top-k probabilities (see the module docstring)."""
        probs, index = batch["teacher_probs"].astype(jnp.float32), batch["teacher_index"]
        c, k = kd_logits.shape[-1], probs.shape[-1]
        rest = jnp.clip(1.0 - probs.sum(-1, keepdims=True), 0.0, 1.0) / max(c - k, 1)
        hot = jax.nn.one_hot(index, c, dtype=jnp.float32)                  # (B, k, C)
        target = jnp.einsum("bk,bkc->bc", probs, hot) + rest * (1.0 - hot.sum(1))
        top1 = index[:, 0]
        if self.kd == "soft":
            T = self.temperature
            log_s = jax.nn.log_softmax(kd_logits / T)
            kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_s)
            denom = kd_logits.size if self.kd_norm == "deit" else kd_logits.shape[0]
            kd = kl * T * T / denom
        else:
            kd = optax.softmax_cross_entropy_with_integer_labels(kd_logits, top1).mean()
        loss = (1 - self.alpha) * base + self.alpha * kd
        metrics.update(kd_loss=kd, teacher_accuracy=(top1 == batch["label"]).mean(),
                       agreement=(kd_logits.argmax(-1) == top1).mean())
        return loss, (metrics, extra)

    def fingerprint(self, config) -> dict:
        """What decides a run's training batches as the teacher saw them (a store's key)."""
        from fmjax.data import stored_logits
        d, o = config.data, config.objective
        return dict(data=str(d.name), split=str(d.get("train_split", "train")), seed=int(config.seed),
                    batch_size=int(config.batch_size), order=str(d.get("order", "per_process")),
                    pp_train=stored_logits.without_op(str(d.pp_train)),
                    mixing={k: float(o.get(k, dflt) or 0.0) for k, dflt in (
                        ("mixup_alpha", 0.0), ("cutmix_alpha", 0.0), ("mix_prob", 1.0),
                        ("switch_prob", 0.5))})

    def check(self, config):
        super().check(config)
        if self.stored is None:
            return
        from fmjax.data import stored_logits
        from fmjax.data.registry import split_pp
        want, have = self.stored.get("fingerprint", {}), self.fingerprint(config)
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differ:
            k = differ[0]
            raise ConfigError(f"stored teacher logits {self.stored_dir} were made for other batches: "
                              f"{', '.join(differ)} differ (e.g. {k}: stored {want.get(k)!r}, this run "
                              f"{have.get(k)!r}); store them for this config.")
        needed = int(config.total_steps) * int(config.batch_size)
        if int(self.stored["rows"]) < needed:
            raise ConfigError(f"stored teacher logits {self.stored_dir} cover {self.stored['steps']} "
                              f"steps; this run has total_steps={config.total_steps}: store more "
                              "(launch/store_logits.py --steps) or train fewer.")
        ops = [op.split("(")[0].strip() for op in split_pp(str(config.data.pp_train))]
        if "teacher_topk" not in ops or "keep" in ops and ops.index("keep") < ops.index("teacher_topk"):
            pp = stored_logits.with_op(str(config.data.pp_train), self.stored_dir)
            raise ConfigError(f"objective.teacher.logits needs teacher_topk('{self.stored_dir}') in "
                              "config.data.pp_train before keep(...), keeping its keys: "
                              f"--config.data.pp_train=\"{pp}\"")
        if int(config.get("grad_accum_steps", 1)) > 1 or jax.process_count() > 1:
            raise ConfigError("stored teacher logits replay on one process without gradient "
                              "accumulation (the rows follow one process's training stream).")


def store_topk(config, out: str, topk: int, steps: int | None = None, dtype: str = "float16",
               log=print) -> dict:
    """Runs the teacher of ``config`` (a distill config with ``objective.teacher.workdir``) on
    the first ``steps`` (default ``config.total_steps``) training batches, mixed as the objective
    mixes them, and writes their top-``topk`` probabilities at the config's temperature to
    ``out`` (``fmjax.data.stored_logits``) as ``dtype`` (TinyViT: float16; float32 replays the
    live teacher to float32 rounding). One process, one device; returns the meta."""
    import time
    from fmjax.data import stored_logits
    from fmjax.data.transforms import parse_pp
    from fmjax.train import setup as setup_lib
    config = config.copy_and_resolve_references()
    config.data.pp_train = stored_logits.without_op(str(config.data.pp_train))
    if config.objective.get("teacher") and config.objective.teacher.get("logits"):
        config.objective.teacher.logits = None
    objective = make(config)
    if objective.teacher_model is None:
        raise ConfigError("store_logits needs a teacher: --config.objective.teacher.workdir=DIR "
                          "(and kd 'soft' or 'hard').")
    objective.check(config)
    if jax.process_count() > 1 or int(config.get("grad_accum_steps", 1)) > 1:
        raise ConfigError("store_logits runs on one process without gradient accumulation.")
    if config.data.get("order", "per_process") != "per_process":
        raise ConfigError("store_logits follows the per-process training order; set config.data.order='per_process'.")
    steps = int(config.total_steps if steps is None else steps)
    topk = int(topk)
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype={dtype!r}; valid: float16 (TinyViT's), float32.")
    if not 1 <= topk <= objective.num_classes or steps < 1:
        raise ConfigError(f"--topk={topk} must be in [1, {objective.num_classes}] and --steps={steps} >= 1.")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(os.path.join(out, stored_logits.META)):
        raise ConfigError(f"{out} already holds stored logits; pick a new --out (nothing was changed).")
    source = setup_lib.train_source(config)
    transform = parse_pp(config.data.pp_train, "config.data.pp_train")
    spec = setup_lib.batch_spec(source, transform, ("image", "label"), config.batch_size)
    data = setup_lib.train_iterator(config, source, transform, spec)  # the trainer's batches
    teacher = jax.tree.map(jnp.asarray, objective._teacher_params)
    state_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))[1]  # TrainState.rng
    T = objective.temperature

    @jax.jit
    def top(batch, step):
        rng = jax.random.fold_in(state_rng, step)  # the train step's rng at this step
        images, _, _, _ = objective.inputs_and_targets(batch, rng)
        logits = objective._teacher({"teacher": teacher}, images)["logits"]
        return jax.lax.top_k(jax.nn.softmax(logits / T), topk)

    os.makedirs(out, exist_ok=True)
    rows = steps * int(config.batch_size)
    probs = np.lib.format.open_memmap(os.path.join(out, stored_logits.PROBS), "w+", np.dtype(dtype), (rows, topk))
    index = np.lib.format.open_memmap(os.path.join(out, stored_logits.INDEX), "w+", np.int32, (rows, topk))
    t0, bs = time.time(), int(config.batch_size)
    for step in range(steps):
        local = next(data)
        p, i = top({k: jnp.asarray(local[k]) for k in ("image", "label")}, jnp.int32(step))
        probs[step * bs:(step + 1) * bs], index[step * bs:(step + 1) * bs] = np.asarray(p), np.asarray(i)
        if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == steps:
            log(f"store_logits: step {step + 1}/{steps} ({(step + 1) * bs / (time.time() - t0):.0f} examples/s)")
    probs.flush(), index.flush()
    del probs, index
    meta = dict(topk=topk, num_classes=objective.num_classes, temperature=T, rows=rows, steps=steps, dtype=dtype,
                teacher=objective.teacher_name, fingerprint=objective.fingerprint(config))
    with open(os.path.join(out, stored_logits.META + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, stored_logits.META + ".tmp"), os.path.join(out, stored_logits.META))
    return meta


def make(config) -> DistillObjective:
    return DistillObjective(config)
