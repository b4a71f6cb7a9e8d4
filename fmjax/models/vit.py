"""Vision Transformer (ViT) backbone with optional class token, registers and head.

Param tree: ``patch_embed/proj``, ``cls_token``, ``reg_tokens``, ``pos_embed``
(learned only), ``encoder/block_{i}``, ``encoder/norm`` (``fc_norm`` instead with
``fc_norm=True``), ``head``. The MAE
encoder (``fmjax.models.mae``) uses the same names, so its encoder params load
straight into a ``ViT(pos_embed='sincos')`` for fine-tuning.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject, layers, relpos
from fmjax.models import scan as scan_lib

Dtype = Any

# name -> (width, depth, num_heads, mlp_dim)
VIT_PRESETS: Dict[str, Dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
    "g": dict(width=1408, depth=40, num_heads=16, mlp_dim=6144),
}


def vit_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """Parse 'S/16' into ``dict(width, depth, num_heads, mlp_dim, patch_size)``.

    ``overrides`` replace preset values, e.g. a custom tiny model:
    ``vit_kwargs('Ti/4', width=32, depth=2, num_heads=2, mlp_dim=64)``.
    Raises ValueError naming the valid variants for an unknown one.
    """
    valid = ", ".join(f"{k}/<patch>" for k in VIT_PRESETS)
    name, sep, patch = str(variant).partition("/")
    if name not in VIT_PRESETS or not sep or not patch.isdigit() or int(patch) <= 0:
        raise ValueError(
            f"Unknown ViT variant {variant!r}; valid: {valid} (e.g. 'B/16').")
    kwargs = dict(VIT_PRESETS[name], patch_size=int(patch))
    kwargs.update(overrides)
    return kwargs


POS_INTERPS = ("resize", "torch_bicubic")


def torch_bicubic_matrix(in_size: int, out_size: int, offset: float = 0.0) -> np.ndarray:
    """(out_size, in_size) weights of torch ``F.interpolate(mode='bicubic',
    align_corners=False, antialias=False)`` along one axis.

    Keys cubic with A=-0.75, 4 taps, edge indices clamped (replicate). With
    ``offset == 0`` the output size is given (``size=``, source scale in/out); with
    ``offset > 0`` torch is called with ``scale_factor=(out_size + offset) / in_size``
    as in DINO / DINOv2's ``interpolate_offset`` (source scale 1 / scale_factor).
    """
    if offset:
        factor = (out_size + offset) / in_size
        if int(np.floor(in_size * factor)) != out_size:
            raise ValueError(f"offset={offset} does not give {out_size} outputs from {in_size}.")
        scale = 1.0 / factor
    else:
        scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1          # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a      # 1 < |x| < 2
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for k, w in enumerate(taps):
        np.add.at(m, (rows, np.clip(base + k - 1, 0, in_size - 1).astype(np.int64)), w)
    return m.astype(np.float32)


def resize_pos_embed(pos: jax.Array, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                     num_prefix: int, method: str = "resize", offset: float = 0.0) -> jax.Array:
    """Bicubic-resize a learned (1, prefix + gh*gw, D) pos embed to a new grid.

    ``method='resize'``: ``jax.image.resize`` bicubic (Keys A=-0.5, antialiased when
    shrinking); equals torch ``F.interpolate(mode='bicubic', antialias=True)`` as used
    by transformers' Dinov2WithRegisters and the DINOv2 ``*_reg`` hub models.
    ``method='torch_bicubic'``: torch bicubic without antialias (``torch_bicubic_matrix``,
    with ``offset`` the DINO / DINOv2 ``interpolate_offset``, e.g. 0.1).
    The prefix rows (class token) are kept as they are.
    """
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d)
    if method == "resize":
        grid = jax.image.resize(grid, (1, new_grid[0], new_grid[1], d), method="bicubic")
    elif method == "torch_bicubic":
        mh = jnp.asarray(torch_bicubic_matrix(old_grid[0], new_grid[0], offset))
        mw = jnp.asarray(torch_bicubic_matrix(old_grid[1], new_grid[1], offset))
        grid = jnp.einsum("hH,wW,bHWd->bhwd", mh, mw, grid.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST).astype(pos.dtype)
    else:
        raise ValueError(f"Unknown pos_interp {method!r}; valid: {POS_INTERPS}.")
    return jnp.concatenate([prefix, grid.reshape(1, -1, d)], axis=1)


# 'learned', 'sincos' (MAE's fixed table), 'none' (no absolute positions: BEiT / SimMIM's
# use_abs_pos_emb=False, with ``rel_pos_bias``).
POS_EMBEDS = ("learned", "sincos", "none", "sincos_moco")
# 'sincos_moco': MoCo v3's fixed table (vits.py; MAE's with its row and column halves swapped:
# fmjax.models.embeddings.get_2d_sincos_pos_embed(layout='moco_v3')).


class ViT(nn.Module):
    """Vision Transformer.

    ``__call__(images (B, H, W, C) float, train=False)`` returns a dict:
    ``tokens`` (B, prefix + N, width) after the final norm (prefix = class
    token + registers), ``patch_tokens`` (B, N, width), ``pre_logits``
    (B, width) pooled by ``pool`` ('cls' or 'mean' over patch tokens), and
    ``logits`` (B, num_classes) when ``num_classes > 0``.

    ``distill_token=True`` is DeiT (Touvron et al. 2021): a learned ``dist_token`` after the
    class token (positions ``pos_embed`` rows 0 / 1 for class / distillation token), a second
    head ``head_dist`` on its output; ``cls_logits`` / ``dist_logits`` are the two heads and
    ``logits`` their mean (DeiT's inference output), ``dist_pre_logits`` the token's features.

    ``fc_norm=True`` moves the final LayerNorm after the pooling, as timm's
    ``global_pool='avg'`` (``fc_norm``) and MAE's fine-tuned models do: the encoder has
    no final norm (``tokens`` / ``patch_tokens`` are the last block's output) and
    ``pre_logits`` is ``fc_norm(pool(tokens))``. ``fc_norm='tokens'`` normalises each patch
    token before the mean instead (FT-CLIP's fine-tuning model: ``fc_norm(x[:, 1:]).mean(1)``).

    A learned ``pos_embed`` stored for another grid is resized to the input's grid
    by ``pos_interp`` / ``pos_interp_offset`` (see ``resize_pos_embed``).
    ``attention_maps`` gives the last block's class-token attention.

    ``remat``: ``False`` / ``True`` or a policy name (``'none'``, ``'full'``,
    ``'dots_saveable'``, ``'dots_with_no_batch_dims_saveable'``, ``'offload'``; see
    ``fmjax.models.scan``). ``scan_layers=True`` runs the encoder as one ``nn.scan`` over its
    blocks: params ``encoder/block_stack/...`` with a leading (depth,) axis (logical ``'layers'``)
    instead of ``encoder/block_{i}/...``; ``fmjax.models.scan.stack_layers`` /
    ``unstack_layers`` convert, and ``config.model_init`` loads either layout into either.
    """

    # The backbone contract (fmjax.models.registry.CAPABILITIES); no annotation: not a field.
    capabilities = frozenset({"pooled", "tokens", "classifier", "any_resolution", "attention_maps"})

    def capabilities_of(self) -> frozenset:
        return self.capabilities if self.num_classes > 0 else self.capabilities - {"classifier"}

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    num_classes: int = 0
    pool: str = "cls"
    class_token: bool = True
    pos_embed: str = "learned"
    dropout: float = 0.0
    drop_path: float = 0.0
    layernorm_eps: float = 1e-6
    layerscale: Optional[float] = None
    num_registers: int = 0
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    activation: str = "gelu"
    pre_norm: bool = False  # LayerNorm after embedding (OpenAI CLIP's ln_pre)
    pos_interp: str = "resize"  # 'resize' (jax.image.resize) or 'torch_bicubic'
    pos_interp_offset: float = 0.0  # 'torch_bicubic' only: DINO's interpolate_offset
    stem: str = "patch"  # 'patch' (linear patch embedding) or 'conv' (layers.ConvStem)
    # True: final norm after pooling (timm global_pool='avg', MAE fine-tuning); 'tokens': on each
    # token before pooling (FT-CLIP's fc_norm(x[:, 1:]).mean(1)); both drop the encoder's norm.
    fc_norm: Any = False
    # BEiT / SimMIM relative position bias (fmjax.models.relpos): 'none', 'shared' (one table,
    # ``rel_pos_bias_table``) or 'per_layer' (``encoder/block_i/attn/rel_pos_bias_table``).
    rel_pos_bias: str = "none"
    distill_token: bool = False  # DeiT's distillation token and head_dist (see the docstring)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"Unknown pool {self.pool!r}; valid: 'cls', 'mean'.")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='mean'.")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"Unknown pos_embed {self.pos_embed!r}; valid: {POS_EMBEDS}.")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"Unknown stem {self.stem!r}; valid: 'patch', 'conv'.")
        if self.pos_interp not in POS_INTERPS:
            raise ValueError(f"Unknown pos_interp {self.pos_interp!r}; valid: {POS_INTERPS}.")
        if self.rel_pos_bias not in relpos.MODES:
            raise ValueError(f"Unknown rel_pos_bias {self.rel_pos_bias!r}; valid: {relpos.MODES}.")
        if self.rel_pos_bias != "none" and (not self.class_token or self.num_registers):
            raise ValueError("rel_pos_bias needs class_token=True and num_registers=0 (BEiT's table has "
                             "rows for one class token).")
        if self.fc_norm not in (False, True, "tokens"):
            raise ValueError(f"Unknown fc_norm {self.fc_norm!r}; valid: False, True, 'tokens'.")
        if self.distill_token and (self.pool != "cls" or self.fc_norm or self.pos_embed != "learned"
                                   or self.rel_pos_bias != "none"):
            raise ValueError("distill_token=True (DeiT) needs pool='cls', fc_norm=False, "
                             "pos_embed='learned' and no rel_pos_bias.")

    def _embed(self, images: jax.Array) -> jax.Array:
        """Patch-embed, add positions, prepend class token and registers: (B, P + N, D)."""
        self._check()
        b, hh, ww, _ = images.shape
        grid = (hh // self.patch_size, ww // self.patch_size)
        stem = {"patch": layers.PatchEmbed, "conv": layers.ConvStem}[self.stem]
        x = stem(self.width, self.patch_size, self.dtype, self.param_dtype,
                 name="patch_embed")(images)
        n_cls = int(self.class_token)
        if self.class_token:
            cls = self.param("cls_token", layers.part(nn.initializers.normal(0.02),
                                                      (None, None, "embed")),
                             (1, 1, self.width), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x],
                                axis=1)
        if self.distill_token:
            dist = self.param("dist_token", layers.part(nn.initializers.normal(0.02),
                                                        (None, None, "embed")),
                              (1, 1, self.width), self.param_dtype)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(dist.astype(x.dtype), (b, 1, self.width)),
                                 x[:, 1:]], axis=1)
            n_cls += 1
        if self.pos_embed in ("sincos", "sincos_moco"):
            pos = layers.get_2d_sincos_pos_embed(self.width, grid, cls_token=self.class_token,
                                                 layout="mae" if self.pos_embed == "sincos" else "moco_v3")
            x = x + jnp.asarray(pos, x.dtype)[None]
        elif self.pos_embed == "none":  # BEiT / SimMIM with a relative position bias only (use_abs_pos_emb=False)
            pass
        else:
            shape = (1, n_cls + grid[0] * grid[1], self.width)
            if self.has_variable("params", "pos_embed"):  # trained at another resolution?
                shape = nn.meta.unbox(self.get_variable("params", "pos_embed")).shape
            pos = self.param("pos_embed", layers.part(nn.initializers.normal(0.02),
                                                      (None, None, "embed")),
                             shape, self.param_dtype)
            if pos.shape[1] != x.shape[1]:
                old = int(round((pos.shape[1] - n_cls) ** 0.5))
                pos = resize_pos_embed(pos, (old, old), grid, n_cls, self.pos_interp,
                                       self.pos_interp_offset)
            x = x + pos.astype(x.dtype)
        if self.num_registers:
            reg = self.param("reg_tokens", layers.part(nn.initializers.normal(0.02),
                                                       (None, None, "embed")),
                             (1, self.num_registers, self.width), self.param_dtype)
            reg = jnp.broadcast_to(reg.astype(x.dtype), (b, self.num_registers, self.width))
            x = jnp.concatenate([x[:, :n_cls], reg, x[:, n_cls:]], axis=1)
        return layers.constrain(x)

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus registers, which precede the patch tokens."""
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """Encode (B, H, W, C) images; see the class docstring for the outputs."""
        x = self._embed(images.astype(self.dtype))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        if self.pre_norm:
            x = layers.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "pre_norm")(x)
        encoder = layers.Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            dropout=self.dropout, drop_path=self.drop_path, layernorm_eps=self.layernorm_eps,
            layerscale=self.layerscale, activation=self.activation,
            attention_impl=self.attention_impl, remat=self.remat, scan_layers=self.scan_layers,
            final_norm=not self.fc_norm, dtype=self.dtype, param_dtype=self.param_dtype,
            name="encoder")
        if self.rel_pos_bias == "none":
            x = encoder(x, not train)
        else:
            grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
            table = (relpos.make_table(self, grid, self.num_heads, self.param_dtype)
                     if self.rel_pos_bias == "shared" else None)
            with relpos.hook(grid, self.num_heads, table, self.param_dtype):
                x = encoder(x, not train)
        patch_tokens = x[:, self.num_prefix_tokens:]
        fc_norm = (layers.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "fc_norm")
                   if self.fc_norm else None)
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            pooled = (fc_norm(patch_tokens) if self.fc_norm == "tokens" else patch_tokens).mean(axis=1)
        if fc_norm is not None and not (self.fc_norm == "tokens" and self.pool == "mean"):
            pooled = fc_norm(pooled)
        out = dict(tokens=x, patch_tokens=patch_tokens, pre_logits=pooled)
        if self.distill_token:
            out["dist_pre_logits"] = x[:, 1]
        if self.num_classes > 0:
            head = lambda name: nn.Dense(  # noqa: E731
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                kernel_init=layers.part(nn.initializers.zeros, ("embed", "classes")),
                bias_init=layers.part(nn.initializers.zeros, ("classes",)))
            out["logits"] = head("head")(pooled)
            if self.distill_token:
                out["cls_logits"], out["dist_logits"] = out["logits"], head("head_dist")(x[:, 1])
                out["logits"] = (out["cls_logits"] + out["dist_logits"]) / 2
        return out

    def attention_maps(self, images: jax.Array, include_prefix: bool = False) -> jax.Array:
        """Last block's class-token attention: (B, heads, N_patches) float32.

        Row 0 (the class token) of softmax(q k^T / sqrt(head_dim)) of the last block,
        restricted to the patch tokens (class token and registers dropped; pass
        ``include_prefix=True`` for the full (B, heads, prefix + N) row, which sums to 1).
        q, k and any logit bias / mask are what the block's attention attends with, captured
        by an attention hook (``fmjax.models.inject``; so injected biases count) from a
        deterministic forward pass (any ``attention_impl``; run without remat, and unrolled:
        a scanned model's params are unstacked for it), so params and ``__call__`` are
        untouched. Call as
        ``model.apply(variables, images, method=ViT.attention_maps)``.
        """
        if not self.class_token:
            raise ValueError("attention_maps needs class_token=True (query index 0).")
        if self.depth < 1:
            raise ValueError("attention_maps needs depth >= 1.")
        want = ("encoder", f"block_{self.depth - 1}", "attn")
        captured = {}

        def grab(attn, inputs, call_next):
            if tuple(attn.path) == want:
                captured["inputs"] = inputs
            return call_next(inputs)

        model = self.clone(parent=None, remat=False, scan_layers=False)
        variables = self.variables
        if self.scan_layers:  # a hook inside nn.scan sees tracers: capture from the unrolled model
            variables = scan_lib.unstack_layers(variables)
        with inject.hooks(attention=grab):
            model.apply(variables, images, train=False)
        q, k, _, bias, mask = captured["inputs"]  # q, k: (B, L, heads, head_dim)
        logits = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32),
                            k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        logits = logits * q.shape[-1] ** -0.5
        full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (B, heads, Q, T)
        row0 = lambda a: jnp.broadcast_to(a, full)[:, :, 0]
        if bias is not None:
            logits = logits + row0(jnp.asarray(bias, jnp.float32))
        if mask is not None:
            logits = jnp.where(row0(mask), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        return probs if include_prefix else probs[..., self.num_prefix_tokens:]
