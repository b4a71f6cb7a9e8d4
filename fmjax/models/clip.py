"""CLIP / SigLIP-style two-tower image-text model.

Param tree: ``image`` (a ``ViT`` with ``pre_norm`` = CLIP's ``ln_pre``; its
``encoder/norm`` is CLIP's ``ln_post``), ``image_proj/kernel`` (width,
embed_dim; no bias), ``text`` (``TextTransformer``, incl. ``text/proj``),
``logit_scale`` () and, for ``loss='sigmoid'`` or a given ``logit_bias_init``,
``logit_bias`` ().

``patch_bias=False`` (open_clip / OpenAI, whose ``conv1`` has no bias; the paper presets of
configs/clip.py): the image tower runs with a zero patch-embedding bias. The param stays in
the tree at its zero init, so checkpoints and converters keep one layout; it gets no
gradient, so it never moves (tests/reference/test_clip_trajectory.py).

The vision tower's fields are the flat ViT names (``width``, ``depth``,
``num_heads``, ``mlp_dim``, ``patch_size``) so ``registry.build_model(dict(
name='clip', variant='B/16', ...))`` works; the text tower's are ``text_*``.

Tower sub-configs (issue 13: composite models take sub-configs, as big_vision's
``two_towers.py``):

- ``image=dict(name='vit', variant='Ti/8', width=..., pool='mean', stem='conv', ...)``: the
  image tower is any registered model with the ``'pooled'`` capability, built from this
  dict exactly as ``config.model`` of that model would be (``fmjax.models.registry``; ``name``
  defaults to ``'vit'``). It is complete in itself: only ``dtype`` / ``param_dtype`` come from
  CLIP; the flat image keys (``width`` ... ``patch_size``, ``stem``, ``patch_bias``) must then
  stay unset. Its params are still ``image/...``, so a checkpoint of that model loads into the
  tower with ``config.model_init.mapping={'params': 'image'}`` (LiT, configs/clip.py:lit).
  ``image_proj`` maps the tower's pooled width (read from its output at init) to ``embed_dim``.
- ``text=dict(variant='B', depth=6, ...)``: ``TextTransformer`` fields (``variant`` one of
  ``TEXT_PRESETS``) that replace the flat ``text_*`` / shared values; ``embed_dim`` stays CLIP's.

Without sub-configs the model, its param tree and its outputs are exactly those of the flat
keys (tests/models/test_clip_towers.py).
"""
import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from fmjax.models import layers
from fmjax.models.text import TEXT_PRESETS, TextTransformer, text_kwargs
from fmjax.models.vit import ViT, vit_kwargs

Dtype = Any
LOSSES = ("softmax", "sigmoid")

# CLIP variant -> (vision ViT variant, text preset, embed_dim), as in OpenAI CLIP / open_clip.
CLIP_PRESETS = {
    "B/32": ("B/32", "B", 512),
    "B/16": ("B/16", "B", 512),
    "L/14": ("L/14", "L", 768),
    "H/14": ("H/14", "H", 1024),
    "g/14": ("g/14", "H", 1024),   # open_clip ViT-g-14: ~1.0B image + ~0.35B text params
}


def clip_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """'B/16' -> CLIP kwargs (vision ViT-B/16, text 'B', embed_dim 512) plus ``overrides``."""
    if variant not in CLIP_PRESETS:
        raise ValueError(
            f"Unknown CLIP variant {variant!r}; valid: {', '.join(CLIP_PRESETS)}.")
    vision, text, embed_dim = CLIP_PRESETS[variant]
    t = TEXT_PRESETS[text]
    # An image sub-config replaces the flat vision keys (see the module docstring).
    vision_kw = {} if overrides.get("image") is not None else vit_kwargs(vision)
    kwargs = dict(vision_kw, embed_dim=embed_dim, text_width=t["width"],
                  text_depth=t["depth"], text_heads=t["num_heads"], text_mlp_dim=t["mlp_dim"])
    kwargs.update(overrides)
    return kwargs


def _frozen(x, top: bool = True):
    """A sub-config (dict, ml_collections ConfigDict, FrozenDict or, at the top, a tuple of
    items) as a hashable FrozenDict (nested mappings too; lists become tuples): linen fields
    must hash."""
    if x is None:
        return None
    if top and isinstance(x, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in x):
        x = dict(x)
    if hasattr(x, "items") and hasattr(x, "keys"):
        return FrozenDict({str(k): _frozen(v, False) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v, False) for v in x)
    return x


def _plain(x):
    """The inverse of ``_frozen`` for building a tower: plain nested dicts."""
    if hasattr(x, "items") and hasattr(x, "keys"):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _shape_scaled_normal(key, shape, dtype=jnp.float32):
    """normal(in_features ** -0.5) for a (in, out) kernel: ``nn.initializers.normal(width **
    -0.5)`` without knowing the width up front (an image tower's pooled width)."""
    return nn.initializers.normal(shape[0] ** -0.5)(key, shape, dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis (computed in float32)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def tower_from_sub_config(sub_config, dtype, param_dtype, key: str = "config.model.image"):
    """``(registry name, class, kwargs)`` of a composite model's tower sub-config (a registered
    model's ``config.model``; ``name`` defaults to 'vit'), with the composite's ``dtype`` /
    ``param_dtype``. One-line ValueErrors naming ``key``."""
    from fmjax.models import registry
    cfg = _plain(sub_config)
    cfg.setdefault("name", "vit")
    name = cfg["name"]
    kwargs = registry.model_kwargs(cfg)
    cls = registry.model_class(name)
    fields = _check_sub_config(key, kwargs, cls, f": model {name!r} has no field(s)")
    kwargs["dtype"] = dtype
    if "param_dtype" in fields:
        kwargs["param_dtype"] = param_dtype
    return name, cls, kwargs


def _check_sub_config(key: str, kwargs, cls, unknown_msg: str):
    """A tower sub-config's keys: the fields of ``cls`` only, and no dtype of its own (the
    towers take config.dtype and CLIP's param_dtype). One-line ValueErrors naming ``key``.
    Returns the field names."""
    fields = _fields(cls)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{key}{unknown_msg} {unknown}; valid: {sorted(fields)}.")
    bad = sorted({"dtype", "param_dtype"} & set(kwargs))
    if bad:
        raise ValueError(f"{key} sets {bad}: the towers take config.dtype "
                         "(and CLIP's param_dtype); drop them from the sub-config.")
    return fields


class CLIP(nn.Module):
    """Two towers projected into a shared ``embed_dim`` space.

    ``__call__(images (B, H, W, C), tokens (B', L) int, train=False)`` returns
    ``image_embeds`` (B, embed_dim) and ``text_embeds`` (B', embed_dim), both L2-
    normalised, ``logit_scale`` = exp(param) (the multiplier, unclamped),
    ``logits_per_image`` (B, B') = scale * image @ text.T (+ bias) and, when
    present, ``logit_bias``. ``loss='sigmoid'`` (SigLIP) initialises the scale
    to ln 10 and adds a bias initialised to -10; 'softmax' (CLIP) uses ln(1/0.07).

    ``image`` / ``text``: tower sub-configs (see the module docstring); None: the flat keys.
    ``remat`` (``False`` / ``True`` or a policy name) and ``scan_layers`` go to the flat image
    tower and to the text tower (a sub-config sets its own), as in ``fmjax.models.vit.ViT``.
    """

    capabilities = frozenset({"image_text"})   # fmjax.models.registry.CAPABILITIES

    width: Optional[int] = None       # the flat image tower (a ViT); unset with ``image``
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    patch_size: Optional[int] = None
    embed_dim: int = 512
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    text_pool: str = "argmax"
    eos_token_id: Optional[int] = None
    activation: str = "quick_gelu"
    text_activation: Optional[str] = None  # None: same as ``activation``
    layernorm_eps: float = 1e-5
    loss: str = "softmax"
    logit_scale_init: Optional[float] = None  # None: ln(1/0.07) softmax, ln(10) sigmoid
    logit_bias_init: Optional[float] = None  # None: -10 for sigmoid, no bias for softmax
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    stem: str = "patch"  # image tower's patch embedding: 'patch' or 'conv' (ViT.stem)
    num_registers: int = 0  # the flat ViT's register tokens (VPT's prompt slots: fmjax.adapt)
    patch_bias: bool = True  # False: open_clip / OpenAI conv1 (bias=False); see _without_patch_bias
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image: Optional[Mapping[str, Any]] = None  # image tower sub-config (registry model, 'pooled')
    text: Optional[Mapping[str, Any]] = None   # text tower sub-config (TextTransformer fields)

    def __post_init__(self):
        # Sub-configs arrive as dicts / ConfigDicts; linen fields must hash (clone, transforms).
        for key in ("image", "text"):
            object.__setattr__(self, key, _frozen(getattr(self, key)))
        super().__post_init__()

    def _common(self) -> Dict[str, Any]:
        return dict(dropout=self.dropout, drop_path=self.drop_path,
                    layernorm_eps=self.layernorm_eps, attention_impl=self.attention_impl,
                    remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype,
                    param_dtype=self.param_dtype)

    def image_tower(self):
        """``(registry name, class, kwargs)`` of the image tower: a class-token ViT with ln_pre
        from the flat keys, or the ``image`` sub-config's model. One-line ValueErrors."""
        if self.image is None:
            missing = [k for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")
                       if getattr(self, k) is None]
            if missing:
                raise ValueError(f"CLIP needs the image tower's {missing} (the flat ViT keys) or "
                                 "an image tower sub-config config.model.image=dict(name=..., ...).")
            kwargs = dict(width=self.width, depth=self.depth, num_heads=self.num_heads,
                          mlp_dim=self.mlp_dim, patch_size=self.patch_size,
                          activation=self.activation, pool="cls", class_token=True,
                          pos_embed="learned", pre_norm=True, num_classes=0, stem=self.stem,
                          num_registers=self.num_registers, **self._common())
            return "vit", ViT, kwargs
        flat = [k for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")
                if getattr(self, k) is not None]
        flat += [k for k, default in (("stem", "patch"), ("patch_bias", True), ("num_registers", 0))
                 if getattr(self, k) != default]
        if flat:
            raise ValueError(f"CLIP: config.model.image sets the image tower; drop the flat image "
                             f"keys {flat} (put them in config.model.image).")
        return tower_from_sub_config(self.image, self.dtype, self.param_dtype)

    def text_tower(self) -> Dict[str, Any]:
        """``TextTransformer`` kwargs: the flat ``text_*`` / shared keys, then the ``text``
        sub-config's (``variant`` a ``TEXT_PRESETS`` name). One-line ValueErrors."""
        kwargs = dict(
            vocab_size=self.vocab_size, context_length=self.context_length,
            width=self.text_width, depth=self.text_depth, num_heads=self.text_heads,
            mlp_dim=self.text_mlp_dim, embed_dim=self.embed_dim,
            activation=self.text_activation or self.activation, pool=self.text_pool,
            eos_token_id=self.eos_token_id, **self._common())
        if self.text is None:
            return kwargs
        cfg = _plain(self.text)
        variant = cfg.pop("variant", None)
        if variant:
            cfg = text_kwargs(variant, **cfg)
        _check_sub_config("config.model.text", cfg, TextTransformer,
                          f" takes TextTransformer fields (and variant: {', '.join(TEXT_PRESETS)}); unknown")
        if cfg.get("embed_dim", self.embed_dim) != self.embed_dim:
            raise ValueError(f"config.model.text.embed_dim={cfg['embed_dim']} differs from "
                             f"config.model.embed_dim={self.embed_dim}; set only the latter.")
        kwargs.update(cfg)
        return kwargs

    def check_towers(self):
        """Both towers' configs and the image tower's 'pooled' capability (one-line
        ValueErrors; the objective calls it at construction). Returns ``image_tower()``."""
        name, cls, kwargs = self.image_tower()
        if self.image is not None:
            from fmjax.models import registry
            registry.require(cls(**kwargs, parent=None), ("pooled",), "CLIP's image tower", name,
                             key="config.model.image.name", carries=True)
        self.text_tower()
        return name, cls, kwargs

    def state_collections_of(self) -> tuple:
        """The image tower's state collections (a ResNet's ``('batch_stats',)``; they live
        under ``image/...`` in those collections), () for a ViT."""
        from fmjax.models import registry
        return registry.state_collections(self.image_tower()[1])

    @property
    def image_patch_size(self) -> Optional[int]:
        """The image tower's patch size (None for a tower without one)."""
        if self.image is None:
            return self.patch_size
        return self.image_tower()[2].get("patch_size")

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown CLIP loss {self.loss!r}; valid: {LOSSES}.")
        _, cls, kwargs = self.check_towers()
        if not self.patch_bias:
            if self.stem != "patch":
                raise ValueError("patch_bias=False needs stem='patch' (the conv stem has its own "
                                 "biases and norms).")
            cls = nn.map_variables(ViT, "params", self._without_patch_bias,
                                   init=self.is_initializing())
        # Submodule names are explicit: the fields ``image`` / ``text`` hold the sub-configs,
        # the param tree keeps ``image/...`` and ``text/...`` either way.
        self.image_encoder = cls(**kwargs, name="image")
        self.image_proj = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=layers.part(_shape_scaled_normal, ("embed", None)))
        self.text_encoder = TextTransformer(**self.text_tower(), name="text")
        sigmoid = self.loss == "sigmoid"
        scale = self.logit_scale_init
        if scale is None:
            scale = math.log(10.0) if sigmoid else math.log(1 / 0.07)
        self.logit_scale = self.param(
            "logit_scale", layers.part(nn.initializers.constant(scale), ()), (),
            self.param_dtype)
        bias = self.logit_bias_init
        if bias is None and sigmoid:
            bias = -10.0
        self.logit_bias = None if bias is None else self.param(
            "logit_bias", layers.part(nn.initializers.constant(bias), ()), (), self.param_dtype)

    def _without_patch_bias(self, variables):
        """The image tower sees a zero patch-embedding bias: open_clip's and OpenAI's ``conv1``
        has none. The param stays in the tree (checkpoints and converters keep one layout) at its
        zero init; it gets no gradient, so Adam leaves it at zero and clipping norms ignore it."""
        if self.is_initializing():
            return variables
        params = dict(variables["params"])
        embed = dict(params["patch_embed"])
        proj = dict(embed["proj"])
        proj["bias"] = jnp.zeros_like(proj["bias"])
        embed["proj"], params["patch_embed"] = proj, embed
        return dict(variables, params=params)

    def encode_image(self, images: jax.Array, train: bool = False,
                     normalize: bool = True) -> jax.Array:
        """(B, H, W, C) images -> (B, embed_dim) embeddings (L2-normalised by default)."""
        pooled = self.image_encoder(images, train=train)["pre_logits"]
        emb = self.image_proj(pooled)
        return l2_normalize(emb) if normalize else emb

    def encode_text(self, tokens: jax.Array, train: bool = False,
                    normalize: bool = True) -> jax.Array:
        """(B, L) token ids -> (B, embed_dim) embeddings (L2-normalised by default)."""
        emb = self.text_encoder(tokens, train=train)["embedding"]
        return l2_normalize(emb) if normalize else emb

    def logit_terms(self):
        """``(logit_scale, logit_bias)`` as the loss takes them, float32 scalars: exp(param)
        (unclamped) and the bias param, or None without one."""
        bias = None if self.logit_bias is None else self.logit_bias.astype(jnp.float32)
        return jnp.exp(self.logit_scale.astype(jnp.float32)), bias

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 train: bool = False) -> Dict[str, jax.Array]:
        """Embed both modalities; see the class docstring for the outputs."""
        return self.pair_outputs(self.encode_image(images, train), self.encode_text(tokens, train))

    def pair_outputs(self, image_embeds: jax.Array, text_embeds: jax.Array) -> Dict[str, jax.Array]:
        """``__call__``'s outputs from the normalised embeddings: the embeddings,
        ``logit_scale``, ``logits_per_image`` (scale * image @ text.T + bias) and
        ``logit_bias`` when the model has one."""
        scale, bias = self.logit_terms()
        logits = scale * jnp.einsum("id,td->it", image_embeds.astype(jnp.float32),
                                    text_embeds.astype(jnp.float32))
        out = dict(image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=scale)
        if bias is not None:
            out["logit_bias"] = bias
            logits = logits + bias
        out["logits_per_image"] = logits
        return out

