"""Swin Transformer (Liu et al. 2021, v1; v2, Liu et al. 2022, with ``version=2``): windowed
self-attention with shifted windows, a relative position bias per window and patch merging
between stages.

Layout (channels last; param names):

- ``patch_embed``: a ``patch_size`` x ``patch_size`` stride-``patch_size`` conv to
  ``embed_dim`` (the input is zero-padded on the bottom / right to a multiple of the patch, as
  transformers' ``SwinPatchEmbeddings``), then ``patch_norm`` (LayerNorm); an optional learned
  absolute ``pos_embed`` (``absolute_pos_embed``, off in every published Swin);
- ``stage_{i}_block_{j}``: ``norm1`` -> window attention ``attn`` (a ``MultiHeadAttention``:
  ``query`` / ``key`` / ``value`` / ``out``, plus ``relative_position_bias_table``
  ((2 ws - 1)^2, heads), added to the logits through the attention injection point,
  ``fmjax.models.inject``) -> stochastic depth -> residual; ``norm2`` -> ``mlp``
  (``fc1`` / ``fc2``, GELU) -> stochastic depth -> residual. Odd blocks shift the windows by
  ``ws // 2`` (``jnp.roll``), and the logits of token pairs from different regions of the
  rolled map get -100 (the original's mask, so the same numbers);
- stage i < last ends with ``stage_{i}_merge``: the 2x2 neighbours concatenated
  ((0,0), (1,0), (0,1), (1,1)) -> ``norm`` (LayerNorm over 4C) -> ``reduction`` (4C -> 2C, no
  bias); odd sides are zero-padded first;
- ``norm`` (LayerNorm) over the last stage's tokens; ``pre_logits`` is their mean (Swin's
  ``avgpool``), ``head`` a Linear when ``num_classes > 0``.

**Small inputs.** As the original ``SwinTransformerBlock``, a stage whose grid is not larger
than the window (``min(h, w) <= window_size``) uses one window of ``min(h, w)`` and no shift;
a side that is not a multiple of the window is zero-padded (transformers' ``maybe_pad``).
The bias table always has the configured window's (2 ws - 1)^2 rows and a smaller window
reads its own offsets from it, so the param shapes do not depend on the input size and a
checkpoint trained at 224 px loads for 32 px inputs (the original sizes the table by the
adapted window; the entries a small window reads are the same offsets).

SimMIM (``mask`` / ``mask_token`` arguments, capability ``mask_input``): the masked patch
embeddings become the mask token after ``patch_norm``; ``encoder_stride`` is the pixels per
final token, which SimMIM's one-layer decoder upsamples by.

Outputs: ``pre_logits`` (B, C_last), ``patch_tokens`` (B, h w, C_last) (normed),
``feature_maps`` (each stage's (B, h, w, C) before its merge), ``logits`` with a head.
Stochastic depth rises linearly from 0 to ``drop_path`` over all blocks (the reference's
``torch.linspace``). ``remat`` checkpoints each block. ``scan_layers=True`` runs each stage's
blocks as one ``nn.scan`` (params ``stage_{i}_block_stack/...`` with a leading (depth_i,) axis;
``fmjax.models.scan`` converts the layouts): the body is one block whose shift is switched on
for odd layers by a scanned flag (both rolls computed, the flag picks; the mask is multiplied
by it), so a stage compiles one block instead of ``depth_i``, with the same numbers.

**Swin v2** (``version=2``, transformers' ``Swinv2Model``): cosine attention with a learned
per-head ``attn/logit_scale`` (init log 10, clamped at log 100), the continuous position bias
``16 sigmoid(cpb(coords))`` from a 2 -> 512 -> heads MLP (``attn/cpb_in``, ``attn/cpb_out``) over
log-spaced relative coordinates (normalised by ``pretrained_window_sizes[i]`` when set, so a
checkpoint transfers to a larger window), no key bias, res-post-norm (``x + LN(attn(x))``,
``x + LN(mlp(x))``) and merge-then-norm (``reduction``, then ``norm`` over 2C). Both run inside
the same attention hook point, so the shared ``MultiHeadAttention`` computes them.

Variants (``variant``): ``T`` (2, 2, 6, 2) x 96 (heads 3, 6, 12, 24), ``S`` (2, 2, 18, 2) x 96,
``B`` (2, 2, 18, 2) x 128 (heads 4 ... 32), ``L`` (2, 2, 18, 2) x 192 (heads 6 ... 48); window
7, patch 4. ``fmjax.interop.hf_swin`` converts transformers' ``SwinModel`` /
``SwinForImageClassification``.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import core, inject
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.blocks import DropPath, Mlp, stochastic_depth_rates
from fmjax.models import scan as scan_lib

Dtype = Any

VARIANTS = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}

MASKED = -100.0  # the original's logit for token pairs from different shifted regions


def swin_kwargs(variant: str = "", **overrides) -> Dict[str, Any]:
    return core.preset_kwargs("Swin", VARIANTS, variant, overrides)


def window_and_shift(h: int, w: int, window_size: int, shift_size: int) -> Tuple[int, int]:
    """The window and shift a block uses on an h x w grid (the original's small-input rule)."""
    if min(h, w) <= window_size:
        return min(h, w), 0
    return window_size, shift_size


def window_partition(x: jax.Array, ws: int) -> jax.Array:
    """(B, H, W, C) with H, W multiples of ws -> (B * nW, ws * ws, C), windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: jax.Array, ws: int, h: int, w: int) -> jax.Array:
    """Inverse of ``window_partition``: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(ws: int, table_ws: int) -> np.ndarray:
    """(ws^2, ws^2) rows of a ((2 table_ws - 1)^2, heads) table for the token pairs of a ws x ws
    window (row (dy + table_ws - 1) * (2 table_ws - 1) + dx + table_ws - 1)."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (table_ws - 1)   # 2, N, N
    return (rel[0] * (2 * table_ws - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=64)
def shift_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """(nW, ws^2, ws^2) additive mask of a rolled (h, w) map: 0 within a region, -100 across."""
    def regions(n):
        idx = np.arange(n)
        return (idx >= n - ws).astype(np.int32) + (idx >= n - shift).astype(np.int32)
    img = (regions(h)[:, None] * 3 + regions(w)[None, :]).astype(np.float32)[None, :, :, None]
    win = window_partition(img, ws)[..., 0]   # nW, N (numpy: reshape / transpose only)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, MASKED, 0.0).astype(np.float32)


def _plus_mask(bias, mask, inputs):
    """``bias`` (1, heads, N, N) + the shifted-window ``mask`` (nW, N, N) tiled over the batch of
    windows (when shifted) + the bias an outer hook passed in."""
    if mask is not None:
        reps = inputs.q.shape[0] // mask.shape[0]
        bias = bias + jnp.tile(jnp.asarray(mask)[:, None], (reps, 1, 1, 1))
    return bias if inputs.bias is None else bias + inputs.bias


def _window_bias_hook(ws: int, table_ws: int, num_heads: int, mask, param_dtype):
    """Attention hook: the relative position bias (its table a param of the attention module)
    plus the shifted-window mask (nW, N, N), tiled over the batch of windows."""
    index = relative_position_index(ws, table_ws)

    def add_bias(module, inputs, call_next):
        table = module.param("relative_position_bias_table",
                             core.part(nn.initializers.truncated_normal(0.02), (None, "heads")),
                             ((2 * table_ws - 1) ** 2, num_heads), param_dtype)
        bias = jnp.transpose(table.astype(jnp.float32)[index], (2, 0, 1))[None]   # 1, heads, N, N
        return call_next(inputs._replace(bias=_plus_mask(bias, mask, inputs)))
    return add_bias


@functools.lru_cache(maxsize=64)
def cpb_coords(ws: int, pretrained_ws: int = 0) -> np.ndarray:
    """Swin v2's log-spaced relative coordinates ((2 ws - 1)^2, 2): (dy, dx) / (w - 1) * 8
    (w the pre-training window when given), then sign * log2(|.| + 1) / log2(8)."""
    r = np.arange(-(ws - 1), ws, dtype=np.float32)
    t = np.stack(np.meshgrid(r, r, indexing="ij"), -1)
    norm = pretrained_ws if pretrained_ws > 0 else ws
    if norm > 1:
        t = t / (norm - 1)
    t = t * 8
    t = np.sign(t) * np.log2(np.abs(t) + 1.0) / np.log2(8)
    return t.reshape(-1, 2).astype(np.float32)


def _cosine_cpb_hook(ws: int, pretrained_ws: int, num_heads: int, mask, param_dtype):
    """Swin v2 attention hook: cosine attention with a per-head learned ``logit_scale`` (init
    log 10, clamped at log 100) and the continuous position bias ``16 sigmoid(cpb(coords))``
    (``cpb_in``: Linear(2, 512) + ReLU, ``cpb_out``: Linear(512, heads), no bias), plus the
    shifted-window mask. q / k are replaced by ``normalize(q) * scale * sqrt(d)`` and
    ``normalize(k)``, so the shared attention's ``q.k / sqrt(d)`` is ``scale * cos``."""
    index = relative_position_index(ws, ws)
    coords = cpb_coords(ws, pretrained_ws)

    def cosine(module, inputs, call_next):
        d = inputs.q.shape[-1]
        logit_scale = module.param("logit_scale", core.part(nn.initializers.constant(float(np.log(10.0))),
                                                            ("heads",)), (num_heads,), param_dtype)
        h = nn.Dense(512, dtype=jnp.float32, param_dtype=param_dtype, name="cpb_in",
                     kernel_init=core.part(nn.initializers.lecun_normal(), (None, "mlp")),
                     bias_init=core.part(core.zeros, ("mlp",)))(jnp.asarray(coords))
        table = nn.Dense(num_heads, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, name="cpb_out",
                         kernel_init=core.part(nn.initializers.lecun_normal(), ("mlp", "heads")))(nn.relu(h))
        bias = _plus_mask(16.0 * jax.nn.sigmoid(jnp.transpose(table[index], (2, 0, 1)))[None], mask, inputs)
        scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), np.log(100.0))) * np.sqrt(d)

        def unit(x):
            xf = x.astype(jnp.float32)   # x / max(|x|, 1e-12) with a finite gradient at 0 (padding)
            return xf * jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))
        q = (unit(inputs.q) * scale[:, None]).astype(inputs.q.dtype)
        return call_next(inputs._replace(q=q, k=unit(inputs.k).astype(inputs.k.dtype), bias=bias))
    return cosine


class SwinBlock(nn.Module):
    """One (shifted-)window attention block on a (B, H, W, C) map (module docstring)."""
    num_heads: int
    window_size: int = 7
    shift_size: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    layernorm_eps: float = 1e-5
    attention_impl: str = "xla"
    version: int = 1
    pretrained_window_size: int = 0   # v2: the window the CPB coordinates are normalised by
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return self._forward(x, deterministic)

    def _forward(self, x, deterministic: bool, drop_path_rate=None, shifted=None):
        """``drop_path_rate``: a traced per-layer rate (None: the field's). ``shifted``: a traced
        0 / 1 flag that turns the ``shift_size`` shift on or off (None: always on), so a scanned
        stack can alternate plain and shifted blocks: both rolls are computed and the flag picks,
        and the mask is the shifted one times the flag (0 adds nothing; exact either way)."""
        b, h, w, c = x.shape
        ws, shift = window_and_shift(h, w, self.window_size, self.shift_size)
        drop = lambda y: DropPath(self.drop_path)(y, deterministic, drop_path_rate)  # noqa: E731

        def roll(y, s):
            rolled = jnp.roll(y, (s, s), axis=(1, 2))
            return rolled if shifted is None else jnp.where(shifted > 0, rolled, y)
        norm = lambda name: core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        v2 = self.version == 2
        y = x if v2 else norm("norm1")(x)
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
        hp, wp = h + ph, w + pw
        if shift:
            y = roll(y, -shift)
        mask = shift_mask(hp, wp, ws, shift) if shift else None
        if mask is not None and shifted is not None:
            mask = jnp.asarray(mask) * jnp.asarray(shifted, jnp.float32)
        if v2:   # the CPB is continuous: the adapted window has its own coordinates
            hook = _cosine_cpb_hook(ws, self.pretrained_window_size, self.num_heads, mask, self.param_dtype)
        else:
            hook = _window_bias_hook(ws, self.window_size, self.num_heads, mask, self.param_dtype)
        with inject.hooks(attention=hook):
            y = MultiHeadAttention(self.num_heads, key_bias=not v2, attention_impl=self.attention_impl,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                window_partition(y, ws), deterministic=deterministic)
        y = window_reverse(y, ws, hp, wp)
        if shift:
            y = roll(y, shift)
        y = y[:, :h, :w]
        if v2:   # res-post-norm: x + LN(attn(x)), x + LN(mlp(x))
            x = x + drop(norm("norm1")(y))
            y = Mlp(int(self.mlp_ratio * c), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                x.reshape(b, h * w, c), deterministic)
            return x + drop(norm("norm2")(y).reshape(b, h, w, c))
        x = x + drop(y)
        y = Mlp(int(self.mlp_ratio * c), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
            norm("norm2")(x).reshape(b, h * w, c), deterministic)
        return x + drop(y.reshape(b, h, w, c))


class SwinScanBlock(SwinBlock):
    """``SwinBlock`` as an ``nn.scan`` body: ``(x, drop_path_rate, shifted, deterministic) ->
    (x, None)`` with the same params; ``shift_size`` is the stage's shift, switched per layer
    by the scanned ``shifted`` flag (even blocks 0, odd 1)."""

    @nn.compact
    def __call__(self, x, drop_path_rate=None, shifted=None, deterministic: bool = True):
        return self._forward(x, deterministic, drop_path_rate, shifted), None


class PatchMerging(nn.Module):
    """2x2 neighbours -> LayerNorm(4C) -> Linear(4C -> 2C, no bias); v2 (``norm_last``):
    the Linear, then LayerNorm(2C)."""
    layernorm_eps: float = 1e-5
    norm_last: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        norm = core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")
        reduction = core.DenseND((2 * c,), kernel_axes=("mlp", "embed"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="reduction")
        return norm(reduction(x)) if self.norm_last else reduction(norm(x))


class Swin(nn.Module):
    """See the module docstring."""

    capabilities = frozenset({"pooled", "tokens", "classifier", "any_resolution", "mask_input"})

    def capabilities_of(self) -> frozenset:
        return self.capabilities if self.num_classes > 0 else self.capabilities - {"classifier"}

    @property
    def encoder_stride(self) -> int:
        """Pixels per final token (SimMIM's ``encoder_stride``): patch * 2^(stages - 1)."""
        return int(self.patch_size * 2 ** (len(self.depths) - 1))

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0
    drop_path: float = 0.0
    absolute_pos_embed: bool = False
    image_size: int = 224          # only sizes the optional absolute position embedding
    layernorm_eps: float = 1e-5
    attention_impl: str = "xla"
    version: int = 1                              # 2: Swin v2 (module docstring)
    pretrained_window_sizes: Sequence[int] = ()   # v2, per stage: the CPB's normalising window (0: own)
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False  # one nn.scan per stage: stage_{i}_block_stack (module docstring)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, mask: Optional[jax.Array] = None,
                 mask_token: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
        """``mask`` (B, h, w) at the patch grid (1 = masked) with ``mask_token`` (1, 1, embed_dim):
        masked patch embeddings are replaced by the token after ``patch_norm`` and before the
        absolute position embedding (SimMIM's ``SwinTransformerForSimMIM``)."""
        if self.version not in (1, 2):
            raise ValueError(f"Swin version={self.version!r}; valid: 1, 2.")
        pws = tuple(self.pretrained_window_sizes) or (0,) * len(self.depths)
        if len(pws) != len(self.depths):
            raise ValueError(f"Swin pretrained_window_sizes {tuple(self.pretrained_window_sizes)} needs one "
                             f"entry per stage ({len(self.depths)}).")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"Swin depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                             "differ in length.")
        p = self.patch_size
        x = images.astype(self.dtype)
        ph, pw = (-x.shape[1]) % p, (-x.shape[2]) % p
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        x = core.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                      param_dtype=self.param_dtype, name="patch_embed",
                      kernel_init=core.part(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                      bias_init=core.part(core.zeros, ("embed",)))(x)
        norm = lambda name: core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        x = norm("patch_norm")(x)
        if mask is not None:
            if mask_token is None or tuple(mask.shape[1:]) != tuple(x.shape[1:3]):
                raise ValueError(f"Swin mask {tuple(mask.shape)} needs a mask_token and the patch grid "
                                 f"{tuple(x.shape[1:3])}.")
            w = mask.astype(x.dtype)[..., None]
            x = x * (1 - w) + jnp.reshape(mask_token, (1, 1, 1, -1)).astype(x.dtype) * w
        if self.absolute_pos_embed:
            g = self.image_size // p
            if x.shape[1:3] != (g, g):
                raise ValueError(f"Swin absolute_pos_embed is sized for {self.image_size} px inputs "
                                 f"({g}x{g} patches); got a {x.shape[1]}x{x.shape[2]} grid.")
            pos = self.param("pos_embed", core.part(nn.initializers.truncated_normal(0.02),
                                                    (None, None, None, "embed")),
                             (1, g, g, self.embed_dim), self.param_dtype)
            x = x + pos.astype(x.dtype)
        rates = stochastic_depth_rates(self.drop_path, sum(self.depths))
        block_cls = scan_lib.remat_module(SwinBlock, self.remat, static_argnums=(2,))
        maps, k = [], 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            if self.scan_layers and depth:
                # one stack per stage: (x, rate, shifted) scanned; without drop_path no rate goes
                # in, so no 'dropout' rng is drawn for it (as unrolled)
                stack = scan_lib.stack_module(SwinScanBlock, depth, self.remat, static_argnums=(4,),
                                              in_axes=(0, 0, nn.broadcast))
                rate = jnp.asarray(rates[k:k + depth], jnp.float32) if self.drop_path else None
                shifted = jnp.asarray([j % 2 for j in range(depth)], jnp.int32)
                x, _ = stack(heads, self.window_size, self.window_size // 2, self.mlp_ratio,
                             float(self.drop_path), self.layernorm_eps, self.attention_impl, self.version,
                             pws[i], self.dtype, self.param_dtype,
                             name=f"stage_{i}_block{scan_lib.STACK_SUFFIX}")(x, rate, shifted, not train)
                k += depth
            else:
                for j in range(depth):
                    x = block_cls(heads, self.window_size, 0 if j % 2 == 0 else self.window_size // 2,
                                  self.mlp_ratio, rates[k], self.layernorm_eps,
                                  self.attention_impl, self.version, pws[i], self.dtype, self.param_dtype,
                                  name=f"stage_{i}_block_{j}")(x, not train)
                    k += 1
            maps.append(x)
            if i < len(self.depths) - 1:
                x = PatchMerging(self.layernorm_eps, self.version == 2, self.dtype, self.param_dtype,
                                 name=f"stage_{i}_merge")(x)
        b, h, w, c = x.shape
        tokens = norm("norm")(x).reshape(b, h * w, c)
        pooled = tokens.mean(axis=1)
        out = dict(pre_logits=pooled, patch_tokens=tokens, feature_maps=maps)
        if self.num_classes > 0:
            out["logits"] = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                kernel_init=core.part(nn.initializers.truncated_normal(0.02), ("embed", "classes")),
                bias_init=core.part(core.zeros, ("classes",)))(pooled)
        return out
