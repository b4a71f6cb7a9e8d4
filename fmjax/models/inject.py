"""The injection points of fmjax's transformer layers: wrap every dense projection or every
attention without editing a model.

Every dense projection of the shared layers (``core.DenseND``: attention ``query`` / ``key`` /
``value`` / ``out``, MLP ``fc1`` / ``fc2``, patch embedding ``proj``) and the core of every
``attention.MultiHeadAttention`` (q, k, v -> output) call the hooks active while the model is
traced. A hook is a function ``hook(module, inputs, call_next)``, called inside the module's
compact ``__call__``: it may create params on ``module`` (``module.param('lora_a', ...)``,
stored beside the module's own, e.g. ``.../attn/query/lora_a``) or child modules, inspect
``module.path`` / ``module.name`` to pick its targets, and continue with ``call_next(inputs)``
(or not):

- dense: ``inputs`` is the input array ``x``; ``call_next(x)`` runs the remaining hooks, then
  the plain projection ``module.project(x)``. ``module.project(x, kernel=k)`` projects with a
  replaced kernel (e.g. fake-quantised).
- attention: ``inputs`` is an ``AttentionInputs(q, k, v, bias, mask)`` (q (B, Q, heads, d),
  k / v (B, T, heads, d), additive logit ``bias`` and boolean ``mask`` broadcastable to
  (B, heads, Q, T) or None); ``call_next(inputs._replace(bias=...))`` runs the rest.
  ``additive_bias(fn)`` turns ``fn(module, q, k) -> bias`` into such a hook.
- conv: every ``core.Conv`` (``nn.Conv``'s params, init and numbers: the U-Net's, ResNet's and
  TinyViT's ``ConvBN``, ConvNeXt's, Swin's and SAM's convolutions); ``inputs`` is the input
  array ``x`` (channels last) and ``call_next(x)`` runs the remaining hooks, then the plain
  convolution. ``module.convolve(x, kernel)`` convolves with another kernel at the module's
  strides, padding and dilation (no bias): LoRA's low-rank branch.
- block: every ``blocks.Block`` (the pre-norm transformer block of ViT encoders, text towers
  and decoders); ``inputs`` is the block's input tokens ``x`` (B, L, D) and ``call_next(x)``
  runs the block (VPT-deep replaces its prompt tokens here, ``fmjax.adapt.prompt``).

Hooks are set with ``hooks(dense=..., attention=..., block=..., conv=...)``, a context manager (and decorator) that
is read when the model is traced, as ``nn.logical_axis_rules`` is: enter it around (or inside)
the function given to ``jax.jit``, e.g. ``jax.jit(hooks(dense=h)(loss_fn))`` - a function
traced outside it and reused from jit's cache keeps the hooks of its first trace. Nested
contexts compose; the outermost hook runs first. With no hook active the layers run exactly
as before (same params, same numbers).

Under ``scan_layers=True`` (``fmjax.models.scan``) a hook runs once, inside the scan body, for
all layers: ``module.path`` reads ``.../block_stack/...`` (no layer index), params it creates
get the leading layer axis (one per layer), and values it captures are tracers of the scan
body (``ViT.attention_maps`` therefore runs the unrolled model).
"""
import contextlib
import contextvars
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class AttentionInputs(NamedTuple):
    """What an attention hook sees and passes on (``call_next(inputs._replace(...))``)."""
    q: Any
    k: Any
    v: Any
    bias: Any = None
    mask: Any = None


class _Active(NamedTuple):
    dense: Tuple[Callable, ...] = ()
    attention: Tuple[Callable, ...] = ()
    block: Tuple[Callable, ...] = ()
    conv: Tuple[Callable, ...] = ()


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fmjax_model_hooks", default=_Active())


class hooks(contextlib.ContextDecorator):
    """Run every ``DenseND`` through ``dense`` and every attention through ``attention``
    while models are traced inside this block (see the module docstring). A context manager
    (reusable, re-entrant) and a decorator: ``jax.jit(hooks(dense=h)(fn))``."""

    def __init__(self, dense: Optional[Callable] = None, attention: Optional[Callable] = None,
                 block: Optional[Callable] = None, conv: Optional[Callable] = None):
        for kind, hook in (("dense", dense), ("attention", attention), ("block", block), ("conv", conv)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{kind} hook must be callable hook(module, inputs, call_next), "
                                f"got {hook!r}.")
        self.dense, self.attention, self.block, self.conv = dense, attention, block, conv
        self._tokens = []

    def __enter__(self):
        cur = _ACTIVE.get()
        add = lambda have, h: have + ((h,) if h is not None else ())  # noqa: E731
        self._tokens.append(_ACTIVE.set(_Active(
            add(cur.dense, self.dense), add(cur.attention, self.attention), add(cur.block, self.block),
            add(cur.conv, self.conv))))
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._tokens.pop())
        return False


class suspended(contextlib.ContextDecorator):
    """No hook is active inside this block, whatever the enclosing ``hooks`` contexts set:
    for a second model traced inside a hooked function that must run plain (a frozen
    distillation teacher under the student's LoRA hooks)."""

    def __init__(self):
        self._tokens = []

    def __enter__(self):
        self._tokens.append(_ACTIVE.set(_Active()))
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._tokens.pop())
        return False


def active() -> _Active:
    """The hooks active now: ``.dense``, ``.attention``, ``.block`` and ``.conv`` tuples, outermost first."""
    return _ACTIVE.get()


def _chain(hook_list, module, inputs, final):
    def run(i, inp):
        if i == len(hook_list):
            return final(inp)
        return hook_list[i](module, inp, lambda nxt: run(i + 1, nxt))
    return run(0, inputs)


def call_dense(module, x, final: Callable):
    """Run the active dense hooks around ``final(x)`` (the plain projection)."""
    return _chain(_ACTIVE.get().dense, module, x, final)


def call_attention(module, inputs: AttentionInputs, final: Callable):
    """Run the active attention hooks around ``final(inputs)`` (the attention itself)."""
    return _chain(_ACTIVE.get().attention, module, inputs, final)


def call_conv(module, x, final: Callable):
    """Run the active conv hooks around ``final(x)`` (the plain convolution)."""
    return _chain(_ACTIVE.get().conv, module, x, final)


def call_block(module, x, final: Callable):
    """Run the active block hooks around ``final(x)`` (one transformer block on its input)."""
    return _chain(_ACTIVE.get().block, module, x, final)


def additive_bias(fn: Callable) -> Callable:
    """Attention hook adding ``fn(module, q, k)`` (broadcastable to (B, heads, Q, T), or None
    to skip this attention) to the attention logits, before the mask and the softmax."""
    def hook(module, inputs: AttentionInputs, call_next):
        extra = fn(module, inputs.q, inputs.k)
        if extra is None:
            return call_next(inputs)
        bias = extra if inputs.bias is None else inputs.bias + extra
        return call_next(inputs._replace(bias=bias))
    return hook


# -- masked image modelling: the learned mask token (SimMIM, BEiT) ---------------------------------
# Both references (microsoft/SimMIM ``VisionTransformerForSimMIM``, microsoft/unilm beit
# ``VisionTransformerForMaskedImageModeling``) replace the masked patch embeddings by one learned
# ``mask_token`` right after the patch embedding, before the class token and the position
# embedding: ``x * (1 - w) + mask_token * w``. A dense hook on the backbone's ``patch_embed/proj``
# does it here, so any ViT-like backbone with that projection works unchanged and its params stay
# the plain backbone's (fine-tuning loads them with ``config.model_init``).

def mask_token_hook(mask, mask_token):
    """A ``hooks`` context: ``mask`` [B, h, w] (1 = masked), ``mask_token`` [1, 1, D]."""
    w = mask.reshape(mask.shape[0], -1, 1)

    def put_mask_tokens(module, x, call_next):
        out = call_next(x)
        if tuple(module.path[-2:]) != ("patch_embed", "proj"):
            return out
        ww = w.astype(out.dtype)
        return out * (1 - ww) + mask_token.astype(out.dtype) * ww
    return hooks(dense=put_mask_tokens)


def init_mask_token(rng, width: int, std: float = 0.02):
    """[1, 1, width]: N(0, std) cut at +-std, timm's ``trunc_normal_(t, std=std, a=-std, b=std)``
    (absolute bounds) as both references' own ``trunc_normal_`` wrappers call it."""
    def init(k, s, d=jnp.float32):
        return std * jax.random.truncated_normal(k, -1.0, 1.0, s, d)
    return nn.with_logical_partitioning(init, (None, None, "embed"))(rng, (1, 1, width))
