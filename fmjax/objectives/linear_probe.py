"""Linear probing: a linear classifier trained on a frozen backbone's pooled features.

As facebookresearch/mae's ``main_linprobe.py``: the head is ``BatchNorm1d(affine=False,
eps=1e-6)`` followed by a linear layer (weight ``trunc_normal(std=0.01)``, bias 0), trained
with cross-entropy on augmented images (``configs/linear_probe.py`` uses LARS, as MAE does).
The backbone is any model with the ``pooled`` capability (its ``pre_logits``); it runs in
inference mode and gets no gradient (``stop_gradient``). Keep it out of the optimizer with
``config.optimizer.frozen=('backbone/.*',)`` (no moments, bit-identical; ``check`` insists),
and load it with ``config.model_init`` (mapping a pretrained workdir onto ``backbone/``).

params = ``{backbone, head: {kernel [D, C], bias [C]}}``; extra = the batch norm's running
``mean`` / ``var`` (torch's update: momentum 0.1, the unbiased batch variance), which
``eval_metrics`` / ``predict`` use, as ``model.eval()`` does in the reference.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from fmjax.errors import ConfigError
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective

_PROBE_PATH = "backbone/encoder/block_0/kernel"   # a param path that `frozen` must cover


class LinearProbeObjective(Objective):
    batch_keys = ("image", "label")
    # Exact with config.grad_accum_steps > 1 through embed + loss_from_embeddings (fmjax.train.step).
    couples_examples = "the batch norm before the head uses the batch's statistics"

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("pooled",), "objective 'linear_probe'", config.model.name)
        self.patch_size = getattr(self.backbone, "patch_size", None)
        self.num_classes = int(o.get("num_classes", 0))
        if self.num_classes <= 0:
            raise ValueError("objective 'linear_probe' needs config.objective.num_classes > 0.")
        self.batch_norm = bool(o.get("batch_norm", True))
        self.bn_momentum = float(o.get("bn_momentum", 0.1))
        self.bn_eps = float(o.get("bn_eps", 1e-6))
        self.head_init_std = float(o.get("head_init_std", 0.01))

    def check(self, config):
        frozen = tuple(config.optimizer.get("frozen", ()) or ())
        if not any(re.fullmatch(p, _PROBE_PATH) for p in frozen):
            raise ConfigError(
                "objective 'linear_probe' trains the head only; set "
                "\"--config.optimizer.frozen=('backbone/.*',)\" so the backbone gets no optimizer "
                "state and no update.")

    def _pooled(self, backbone, images):
        out = self.backbone.apply({"params": backbone}, images, train=False)["pre_logits"]
        return jax.lax.stop_gradient(out.astype(jnp.float32))

    def init(self, rng, batch):
        b_rng, h_rng = jax.random.split(rng)
        backbone = self.backbone.init({"params": b_rng}, batch["image"])["params"]
        dim = self._pooled(backbone, batch["image"][:1]).shape[-1]
        kernel = self.head_init_std * jax.random.truncated_normal(h_rng, -2.0 / self.head_init_std,
                                                                  2.0 / self.head_init_std,
                                                                  (dim, self.num_classes))
        params = {"backbone": backbone,
                  "head": {"kernel": kernel, "bias": jnp.zeros((self.num_classes,), jnp.float32)}}
        return params, {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}

    def _head(self, params, feats, mean, var):
        if self.batch_norm:
            feats = (feats - mean) / jnp.sqrt(var + self.bn_eps)
        return feats @ params["head"]["kernel"] + params["head"]["bias"]

    def loss(self, params, extra, batch, rng, step):
        return self.loss_from_embeddings(params, extra, self.embed(params, extra, batch, rng, step),
                                         batch, rng, step)

    def embed(self, params, extra, batch, rng, step):
        """The frozen backbone's features [B, D]: with ``config.grad_accum_steps`` > 1 the
        trainer caches them for every micro-batch, so the batch norm's statistics (and its
        running ones) are the full batch's (fmjax.train.step), as without accumulation."""
        return self._pooled(params["backbone"], batch["image"])

    def loss_from_embeddings(self, params, extra, feats, batch, rng, step):
        mean, var = feats.mean(0), feats.var(0)
        logits = self._head(params, feats, mean, var)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        if self.batch_norm:
            n = feats.shape[0]
            m = self.bn_momentum
            extra = {"mean": (1 - m) * extra["mean"] + m * mean,
                     "var": (1 - m) * extra["var"] + m * var * n / max(n - 1, 1)}
        acc = (logits.argmax(-1) == batch["label"]).mean()
        return loss, ({"accuracy": acc}, extra)

    def predict(self, params, extra, images):
        """Class logits [B, C] with the running statistics (the reference's eval mode)."""
        return self._head(params, self._pooled(params["backbone"], images), extra["mean"], extra["var"])

    def eval_metrics(self, params, extra, batch, rng):
        logits = self.predict(params, extra, batch["image"])
        top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
        return {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32),
                "top5": (top5 == batch["label"][:, None]).any(-1).astype(jnp.float32)}

    def features(self, params, extra, images):
        return self._pooled(params["backbone"], images)


def make(config) -> LinearProbeObjective:
    return LinearProbeObjective(config)
