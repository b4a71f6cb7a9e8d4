"""Linear probe: a linear classifier trained on frozen features.

The features are standardised with the training set's per-dimension mean and
std (what MAE's ``BatchNorm1d(affine=False)`` before the head amounts to at
convergence), then a single dense layer is trained with AdamW under a cosine
learning-rate schedule on minibatches of softmax cross-entropy. The whole
training run is one jitted ``lax.fori_loop``; minibatch indices come from
``jax.random`` so the result is deterministic given ``seed``.

The defaults (1000 steps of batch 256) fit a few thousand examples of width
100-800 in a couple of seconds on a CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.errors import ConfigError
from fmjax.evals import common, registry


def standardize_stats(feats, eps=1e-6):
    """Returns (mean, std) per feature dimension, std floored by ``eps``."""
    feats = jnp.asarray(feats, jnp.float32)
    mean = jnp.mean(feats, axis=0)
    std = jnp.sqrt(jnp.var(feats, axis=0) + eps)
    return mean, std


def _logits(params, x):
    """Linear classifier ``x @ w + b``."""
    return x @ params["w"] + params["b"]


def _make_optimizer(steps, lr, weight_decay, warmup_steps):
    """AdamW with linear warm-up and cosine decay to zero; bias not decayed.

    ``lr`` and ``weight_decay`` may be traced, so changing them does not
    recompile: the schedule is a unit-peak shape scaled by ``lr``.
    """
    warmup_steps = int(min(warmup_steps, max(steps - 1, 0)))
    shape = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=warmup_steps,
        decay_steps=max(steps, 1), end_value=0.0)
    return optax.adamw(lambda count: lr * shape(count),
                       weight_decay=weight_decay,
                       mask={"w": True, "b": False})


@functools.partial(
    jax.jit, static_argnames=("num_classes", "steps", "batch_size",
                              "warmup_steps"))
def _train(x, y, key, lr, weight_decay, *, num_classes, steps, batch_size,
           warmup_steps):
    """Trains the linear head; returns its params and the final loss."""
    dim = x.shape[1]
    params = {"w": jnp.zeros((dim, num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    tx = _make_optimizer(steps, lr, weight_decay, warmup_steps)
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = _logits(p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, yb).mean()

    def body(i, carry):
        p, s, _ = carry
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,),
                                 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    params, _, loss = jax.lax.fori_loop(
        0, steps, body, (params, opt_state, jnp.zeros((), jnp.float32)))
    return params, loss


@jax.jit
def _accuracy(params, x, y):
    """Top-1 accuracy of the linear head."""
    return jnp.mean(jnp.argmax(_logits(params, x), axis=-1) == y)


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 num_classes, *, steps=1000, lr=1e-2, weight_decay=1e-4,
                 batch_size=256, warmup_steps=50, seed=0, standardize=True):
    """Trains a linear classifier on frozen features and reports accuracy.

    Args:
        train_feats: [M, D] training features.
        train_labels: [M] int labels in [0, num_classes).
        test_feats: [N, D] test features.
        test_labels: [N] int labels.
        num_classes: number of classes.
        steps: optimiser steps.
        lr: peak AdamW learning rate (cosine schedule, linear warm-up).
        weight_decay: decoupled AdamW weight decay.
        batch_size: minibatch size (drawn with replacement); clamped to M.
        warmup_steps: linear warm-up steps.
        seed: seed of the minibatch sampling; same seed, same result.
        standardize: standardise features with the training mean / std.

    Returns:
        ``{"top1": float, "train_top1": float}`` accuracies in [0, 1].
    """
    x = jnp.asarray(train_feats, jnp.float32)
    xt = jnp.asarray(test_feats, jnp.float32)
    y = jnp.asarray(np.asarray(train_labels).reshape(-1), jnp.int32)
    yt = jnp.asarray(np.asarray(test_labels).reshape(-1), jnp.int32)
    if x.shape[0] == 0:
        raise ValueError("linear_probe needs at least one training example.")
    if standardize:
        mean, std = standardize_stats(x)
        x = (x - mean) / std
        xt = (xt - mean) / std
    params, _ = _train(
        x, y, jax.random.PRNGKey(seed), jnp.float32(lr),
        jnp.float32(weight_decay), num_classes=int(num_classes),
        steps=int(steps), batch_size=int(min(batch_size, x.shape[0])),
        warmup_steps=int(warmup_steps))
    top1 = float(_accuracy(params, xt, yt)) if xt.shape[0] else 0.0
    return {"top1": top1, "train_top1": float(_accuracy(params, x, y))}


@registry.register("linear_probe")
class LinearProbeEvaluator(common.Evaluator):
    """``eval/<name>_top1`` / ``_train_top1``: ``linear_probe`` fitted on the ``train_split``
    features, scored on the ``split`` features; ``steps``, ``lr``, ``weight_decay``,
    ``warmup_steps``, ``seed`` and ``standardize`` as in ``linear_probe``."""

    fields = ("steps", "lr", "weight_decay", "warmup_steps", "seed", "standardize")
    train_side = True

    @classmethod
    def check_options(cls, where, ev, config, objective):
        for key, minimum in (("steps", 1), ("warmup_steps", 0), ("seed", 0)):
            if key in ev:
                common.check_int(where, key, ev[key], minimum)
        if "lr" in ev:
            common.check_number(where, "lr", ev["lr"])
        if "weight_decay" in ev:
            common.check_number(where, "weight_decay", ev["weight_decay"], positive=False)
        if "standardize" in ev and not isinstance(ev["standardize"], bool):
            raise ConfigError(f"{where}.standardize={ev['standardize']!r}; it must be True or False.")

    def run(self, state, step, writer):
        train_feats, train_labels = self.features(state, train=True)
        feats, labels = self.features(state)
        num_classes = int(max(train_labels.max(), labels.max()) + 1)
        kw = {k: self.ev[k] for k in self.fields if k in self.ev}
        return linear_probe(train_feats, train_labels, feats, labels, num_classes, **kw)
