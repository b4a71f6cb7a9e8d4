"""Post-training int8 quantization through the dense injection point (inference only).

- ``int8`` (weight-only): every ``DenseND`` kernel is replaced by its symmetric per-output-
  channel int8 round trip, ``scale = max|W| over the input dims / 127``,
  ``W_q = clip(round(W / scale), -127, 127) * scale``; activations stay float.
- ``int8_w8a8``: the same weights, and the projection's input quantized per token (dynamic,
  symmetric: ``max|x|`` over the contracted dims / 127), i.e. what an int8 x int8 matmul with
  an int32 accumulator and a float rescale computes, simulated in float.

The model, its params and the objective are untouched: ``quantized(objective, mode)`` wraps the
objective so that its forward passes (evals, features, sampling) use the quantized
projections. Convolutions, norms and embeddings stay float. ``weight_bytes(params)`` counts
what int8 storage of every dense kernel saves (1 byte per value plus one float32 scale per
output channel, against the kernel's own dtype). A LoRA adapter stays float beside the
quantized base (the adapter wrapper is re-applied outside the quantizer, so its hook runs
first and calls the quantized projection).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("int8", "int8_w8a8")


def fake_quant_weight(kernel: jax.Array, contract: int) -> jax.Array:
    """Symmetric per-output-channel int8 round trip of a kernel (in dims..., out dims...)."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(contract)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return (jnp.clip(jnp.round(w / scale), -127, 127) * scale).astype(kernel.dtype)


def fake_quant_activation(x: jax.Array, contract: int) -> jax.Array:
    """Symmetric per-token dynamic int8 round trip over the last ``contract`` dims."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - contract, x.ndim)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return (jnp.clip(jnp.round(xf / scale), -127, 127) * scale).astype(x.dtype)


def quant_hook(mode: str, seen: dict | None = None):
    """The dense hook; ``seen`` collects ``{module path: contracted dims}`` of the projections
    it quantized."""
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r}; valid: {list(MODES)}.")
    from fmjax.adapt.lora import module_path

    def hook(dense, x, call_next):
        if seen is not None:
            seen[module_path(dense)] = dense.contract
        kernel = dense.kernel_param(dense.in_shape(x))
        if mode == "int8_w8a8":
            x = fake_quant_activation(x, dense.contract)
        return dense.project(x, kernel=fake_quant_weight(kernel, dense.contract))
    return hook


def quantized(objective, mode: str, seen: dict | None = None):
    """``objective`` with every dense projection quantized (an adapter wrapper stays outermost).
    ``seen`` collects the quantized projections' module paths as the model is traced."""
    from fmjax import adapt
    if isinstance(objective, adapt.AdaptedObjective):
        return adapt.AdaptedObjective(quantized(objective._inner, mode, seen), objective.adapter)
    return adapt.HookedObjective(objective, quant_hook(mode, seen))


def weight_bytes(params, seen: dict) -> tuple[int, int]:
    """(bytes of the quantized projections' kernels as stored, bytes as int8 + one float32
    scale per output value). ``seen``: ``{module path: contracted dims}`` from the hook (a
    param path ending in ``<path>/kernel``; a scanned kernel carries its layer axis first)."""
    before = after = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        match = [(p, c) for p, c in seen.items() if name == f"{p}/kernel" or name.endswith(f"/{p}/kernel")]
        if not match:
            continue
        contract = match[0][1]
        lead = 1 if "block_stack" in name else 0
        n = math.prod(leaf.shape)
        before += n * jnp.dtype(leaf.dtype).itemsize
        after += n + 4 * (n // math.prod(leaf.shape[lead:lead + contract]))
    return before, after
