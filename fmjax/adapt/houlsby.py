"""Bottleneck adapters (Houlsby et al. 2019) on any fmjax model, through the dense injection
point.

Serial (Houlsby): after every ``DenseND`` whose path matches ``targets`` (default the
attention output and the second MLP layer, ``attn/out$|mlp/fc2$``: the two places of the
paper's Figure 2, before each residual addition), ``h = y + up(gelu(down(y)))`` with
``down`` (out dims -> ``bottleneck``) and ``up`` (``bottleneck`` -> out dims), biases
included. ``up`` starts at zero, so the model is the base one at init (the paper's
near-identity initialisation; ``down`` is drawn N(0, 0.01^2) as its "small" init).

Parallel (He et al. 2022, "Towards a unified view of PETL"): ``h = y + s * up(relu(down(x)))``
from the projection's INPUT ``x``, scaled by ``scale``, the form that runs beside the layer
rather than after it.

Params beside the adapted module's own kernel and bias: ``adapter_down_kernel``,
``adapter_down_bias``, ``adapter_up_kernel``, ``adapter_up_bias`` (e.g.
``.../attn/out/adapter_up_kernel``; stacked under ``scan_layers``). Per adapted projection with ``d_in`` input
and ``d`` output values: serial ``2 d m + m + d``, parallel ``d_in m + m + m d + d``.
"""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.adapt.lora import module_path, train_dropout
from fmjax.models import core

PARAMS = ("adapter_down_kernel", "adapter_down_bias", "adapter_up_kernel", "adapter_up_bias")
KINDS = ("serial", "parallel")


def adapter_hook(bottleneck: int, targets: str, kind: str = "serial", scale: float = 1.0,
                 dropout: float = 0.0):
    """The dense hook adding a bottleneck adapter to every ``DenseND`` matching ``targets``;
    ``dropout`` on the adapter's output before it is added (the ``adapters`` library's
    ``Adapter``: ``output = dropout(up)``), in training passes."""
    if kind not in KINDS:
        raise ValueError(f"adapter kind {kind!r}; valid: {list(KINDS)}.")
    pattern = re.compile(targets)

    def hook(dense, x, call_next):
        if bottleneck <= 0 or not pattern.search(module_path(dense)):
            return call_next(x)
        y = call_next(x)
        out_shape = tuple(dense.features)
        d_out = math.prod(out_shape)
        if kind == "serial":   # the adapter reads the projection's output
            src = y.reshape(y.shape[:y.ndim - len(out_shape)] + (d_out,))
        else:                  # ... or, beside it, its input
            src = x.reshape(x.shape[:x.ndim - dense.contract] + (-1,))
        d_in = src.shape[-1]
        dt = dense.dtype
        wd = dense.param("adapter_down_kernel", core.part(nn.initializers.normal(0.01), (None, None)),
                         (d_in, bottleneck), dense.param_dtype)
        bd = dense.param("adapter_down_bias", core.part(nn.initializers.zeros, (None,)),
                         (bottleneck,), dense.param_dtype)
        wu = dense.param("adapter_up_kernel", core.part(nn.initializers.zeros, (None, None)),
                         (bottleneck, d_out), dense.param_dtype)
        bu = dense.param("adapter_up_bias", core.part(nn.initializers.zeros, (None,)),
                         (d_out,), dense.param_dtype)
        act = jax.nn.gelu if kind == "serial" else jax.nn.relu
        h = act(src.astype(dt) @ wd.astype(dt) + bd.astype(dt))
        delta = (h @ wu.astype(dt) + bu.astype(dt)).reshape(y.shape)
        delta = delta if kind == "serial" else jnp.asarray(scale, dt) * delta
        return y + train_dropout(dense, delta, dropout)
    return hook


def expected_count(shapes, bottleneck: int, kind: str = "serial") -> int:
    """Adapter params for ``(d_in, d_out)`` pairs of the adapted projections (module docstring)."""
    m = bottleneck
    return sum((2 * d * m + m + d) if kind == "serial" else (i * m + m + m * d + d) for i, d in shapes)
