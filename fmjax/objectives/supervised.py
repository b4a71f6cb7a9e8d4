"""Supervised classification: a ViT with a linear head, cross-entropy with label smoothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective


class SupervisedObjective(Objective):
    batch_keys = ("image", "label")

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        self.num_classes = int(config.model.get("num_classes", 0))
        if self.num_classes <= 0:
            raise ValueError("objective 'supervised' needs config.model.num_classes > 0.")
        require(self.model, ("classifier", "pooled"), "objective 'supervised'", config.model.name)
        self.patch_size = getattr(self.model, "patch_size", None)
        self.label_smoothing = float(config.objective.get("label_smoothing", 0.0))

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"])["params"], {}

    def loss(self, params, extra, batch, rng, step):
        out = self.model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        logits = out["logits"].astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], self.num_classes), self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        acc = (logits.argmax(-1) == batch["label"]).mean()
        return loss, ({"accuracy": acc}, extra)

    def eval_metrics(self, params, extra, batch, rng):
        logits = self.model.apply({"params": params}, batch["image"])["logits"]
        top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
        return {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32),
                "top5": (top5 == batch["label"][:, None]).any(-1).astype(jnp.float32)}

    def predict(self, params, extra, images):
        """Class logits [B, num_classes] (inference mode); used to score generated samples."""
        return self.model.apply({"params": params}, images)["logits"]

    def features(self, params, extra, images):
        return self.model.apply({"params": params}, images)["pre_logits"]


def make(config) -> SupervisedObjective:
    return SupervisedObjective(config)
