"""Prefix tuning (Li & Liang 2021) on any fmjax attention, through the attention injection
point: every ``MultiHeadAttention`` whose path matches ``targets`` (default ``attn$``: the
self-attention of every block) attends to ``length`` learned key / value vectors before the
sequence's own, per layer.

Params beside the attention module's own: ``prefix_key`` and ``prefix_value``, each
(length, heads, head_dim), drawn N(0, 0.02^2) (stacked under ``scan_layers``): ``2 x length x
heads x head_dim`` per adapted attention. The prefixes are shared by the batch; an additive
bias on the logits gets zero columns for them and a boolean mask True ones (every query sees
every prefix). The prefixes are not reparameterised through an MLP (the paper's training-
stability trick for language models); ``length = 0`` creates nothing and is the base model.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp

from fmjax.adapt.lora import module_path, train_dropout
from fmjax.models import core

PARAMS = ("prefix_key", "prefix_value")


def _pad_front(a, n, value, axis=-1):
    if a is None:
        return None
    a = jnp.asarray(a)
    if a.shape[axis] == 1:  # broadcast over keys: stays broadcastable
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (n, 0)
    return jnp.pad(a, pad, constant_values=value)


def prefix_hook(length: int, targets: str, dropout: float = 0.0):
    """The attention hook: learned key / value prefixes on every matching attention;
    ``dropout`` on each example's copy of them in training passes (P-tuning v2's dropout of
    the past key values)."""
    pattern = re.compile(targets)

    def hook(attn, inputs, call_next):
        if length <= 0 or not pattern.search(module_path(attn)):
            return call_next(inputs)
        q, k, v, bias, mask = inputs
        heads, head_dim = k.shape[-2], k.shape[-1]
        init = core.part(nn.initializers.normal(0.02), (None, "heads", "kv"))
        pk = attn.param("prefix_key", init, (length, heads, head_dim), attn.param_dtype)
        pv = attn.param("prefix_value", init, (length, heads, head_dim), attn.param_dtype)
        b = k.shape[0]
        pk = train_dropout(attn, jnp.broadcast_to(pk.astype(k.dtype), (b,) + pk.shape), dropout)
        pv = train_dropout(attn, jnp.broadcast_to(pv.astype(v.dtype), (b,) + pv.shape), dropout)
        k = jnp.concatenate([pk, k], axis=1)
        v = jnp.concatenate([pv, v], axis=1)
        return call_next(inputs._replace(k=k, v=v, bias=_pad_front(bias, length, 0.0),
                                         mask=_pad_front(mask, length, True)))
    return hook


def expected_count(attentions: int, length: int, heads: int, head_dim: int) -> int:
    return attentions * 2 * length * heads * head_dim
