"""Model construction from ``config.model`` (``name``, ``variant`` and field overrides), and
the backbone contract objectives check.

Models are found by name in a registry that imports a model's module only when it is used
(``register_model`` adds one from anywhere; the built-ins are listed below by module path).
Each model class declares the **capabilities** it offers (``CAPABILITIES``), and each
objective states the ones it needs (``require``), so an objective never tests
``config.model.name``: any backbone with the right capabilities serves it, and a mismatch is
one line naming the models that would fit.

A model may also keep **state** besides its params, updated by its training forward pass
(``state_collections``, e.g. TinyViT's BatchNorm running statistics in ``'batch_stats'``): an
objective threads it through ``extra`` only if it says so (``require(..., carries=...)``), and
``require`` refuses such a model for any other objective, in one line, instead of letting flax
fail on a missing collection.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp

# What a backbone can do, and the interface each capability promises.
CAPABILITIES = {
    "pooled": "__call__(images, train) -> {'pre_logits': [B, D], ...}: one vector per image",
    "tokens": "__call__(images, train) -> {'patch_tokens': [B, N, D], ...}",
    "classifier": "__call__(images, train) -> {'logits': [B, num_classes], 'pre_logits': ...} "
                  "when built with num_classes > 0",
    "any_resolution": "accepts images of another size than it was built for (e.g. DINO's local crops)",
    "attention_maps": "method attention_maps(images) -> [B, heads, N] last-layer attention",
    "mask_input": "__call__(images, train, mask=[B, h, w] at the patch grid, mask_token=[1, 1, D]) puts "
                  "the token at the masked patches; attribute encoder_stride (pixels per final token); "
                  "SimMIM on a hierarchical backbone (Swin)",
    "masked_autoencoder": "__call__(images, train) -> {'loss', 'pred', 'mask', ...}; encode(images)",
    "image_text": "encode_image(images), encode_text(tokens); logit_terms() -> (scale, bias or "
                  "None); __call__(images, tokens) -> embeddings",
    "denoiser": "__call__(x_t, t, y=None, context=None, train) -> the noise / v / x0 prediction",
    "class_conditional": "a denoiser taking class labels y (num_classes > 0; row num_classes is null)",
    "text_conditional": "a denoiser taking a context sequence (context_dim > 0)",
    "tokenizer": "a discrete image tokenizer: tokens(images01) -> [B, h, w] int32 codes in "
                 "[0, vocab_size) (images in [0, 1], sides a multiple of `downsample`); "
                 "encode(images01) -> [B, h, w, vocab_size] logits; decode(z) -> pixels",
    "promptable_masks": "SAM-style: encode_image(images) -> [B, h, w, C]; predict(embeddings, points, "
                        "labels, boxes, masks) -> (mask logits [B, P, M, 4h, 4w], iou [B, P, M])",
    "open_vocab_detection": "OWL-ViT-style: encode_queries(tokens) -> [Q, E]; detect(images, query_embeds) "
                            "-> {'logits': [B, N, Q], 'boxes': [B, N, 4] cxcywh in [0, 1], ...}",
    "captioning": "image_tokens(images) -> [B, S, D]; caption_logits_from(image_tokens, tokens) -> "
                  "[B, L, vocab] next-token logits (CoCa)",
    "image_text_matching": "match_probability(images, tokens) -> [B] P(image i matches caption i) "
                           "(BLIP's ITM head)",
    "interleaved_lm": "__call__(images [B, T_img, H, W, C], tokens [B, T], valid=None, train) -> "
                      "{'logits': [B, T, vocab]}: text interleaved with one image_token_id per image "
                      "(Flamingo); encode_media(images), lm_logits(media, tokens, valid)",
    "causal_lm": "__call__(tokens [B, T], train, context=None, context_mask=None) -> {'logits': "
                 "[B, T, vocab], ...}, causal; decode=True keeps a KV cache (fmjax.models.generate)",
}

# name -> ("module:Class", "module:variant_kwargs function" or None). Imported on first use.
_BUILTIN = {
    "vit": ("fmjax.models.vit:ViT", "fmjax.models.vit:vit_kwargs"),
    "mae": ("fmjax.models.mae:MAE", "fmjax.models.vit:vit_kwargs"),
    "clip": ("fmjax.models.clip:CLIP", "fmjax.models.clip:clip_kwargs"),
    "coca": ("fmjax.models.coca:CoCa", "fmjax.models.coca:coca_kwargs"),
    "blip": ("fmjax.models.blip:BLIP", "fmjax.models.blip:blip_kwargs"),
    "unet": ("fmjax.models.unet:UNet", "fmjax.models.unet:unet_kwargs"),
    "dit": ("fmjax.models.dit:DiT", "fmjax.models.dit:dit_kwargs"),
    "dvae": ("fmjax.models.dvae:DVAE", "fmjax.models.dvae:dvae_kwargs"),
    "convnext": ("fmjax.models.convnext:ConvNeXt", "fmjax.models.convnext:convnext_kwargs"),
    "swin": ("fmjax.models.swin:Swin", "fmjax.models.swin:swin_kwargs"),
    "tinyvit": ("fmjax.models.tinyvit:TinyViT", "fmjax.models.tinyvit:tinyvit_kwargs"),
    "resnet": ("fmjax.models.resnet:ResNet", "fmjax.models.resnet:resnet_kwargs"),
    "sam": ("fmjax.models.sam:SAM", "fmjax.models.sam:sam_kwargs"),
    "owl": ("fmjax.models.owl:OWLViT", None),
    "decoder": ("fmjax.models.decoder:Decoder", "fmjax.models.decoder:decoder_kwargs"),
    "flamingo": ("fmjax.models.flamingo:Flamingo", None),
    "dalle": ("fmjax.models.dalle:DalleTransformer", "fmjax.models.dalle:dalle_kwargs"),
}
_REGISTERED: dict[str, tuple[Any, Optional[Callable]]] = {}
# float64: library use only, under jax.enable_x64 (e.g. the LM trajectory test runs fmjax's step
# in float64 against the reference's float64 run); configs take float32 / bfloat16.
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def _resolve(ref):
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_model(name: str, variants: Optional[Callable] = None):
    """Class decorator: ``@register_model('convnext', convnext_kwargs)`` makes
    ``config.model.name='convnext'`` build it. ``variants(variant, **overrides) -> kwargs``
    reads ``config.model.variant``. The class should set ``capabilities``."""
    def wrap(cls):
        if name in _BUILTIN or name in _REGISTERED:
            raise ValueError(f"model {name!r} is already registered.")
        _REGISTERED[name] = (cls, variants)
        return cls
    return wrap


def available() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def _entry(name):
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        cls, variants = _BUILTIN[name]
        return _resolve(cls), _resolve(variants)
    raise ValueError(f"Unknown model {name!r}; valid models: {available()}.")


def model_class(name: str):
    return _entry(name)[0]


class _Models(Mapping):
    """``MODELS[name]`` -> the model class (imported on access)."""

    def __getitem__(self, name):
        if name not in _BUILTIN and name not in _REGISTERED:
            raise KeyError(name)
        return model_class(name)

    def __iter__(self):
        return iter(available())

    def __len__(self):
        return len(available())


MODELS = _Models()


def _plain(value):
    """Nested ml_collections ConfigDicts (e.g. a composite model's tower sub-configs,
    ``config.model.image``) as plain dicts."""
    if hasattr(value, "items") and hasattr(value, "keys") and not isinstance(value, dict):
        value = dict(value.items())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_kwargs(model_config: Mapping[str, Any]) -> dict:
    cfg = _plain(model_config)   # a fresh dict: the pops below leave the config alone
    name = cfg.pop("name", None)
    _, variants = _entry(name)
    variant = cfg.pop("variant", None)
    if variant and variants is None:
        raise ValueError(f"model {name!r} has no variants; drop config.model.variant={variant!r}.")
    return variants(variant, **cfg) if variant else cfg


def model_fields(model_config: Optional[Mapping[str, Any]]) -> dict:
    """``model_kwargs(model_config)``, or {} when there is no config or it cannot be resolved
    (a checkpoint converter then falls back to its own defaults, e.g. for head counts)."""
    if not model_config:
        return {}
    try:
        return model_kwargs(model_config)
    except (ValueError, TypeError, KeyError):
        return {}


def build_model(model_config: Mapping[str, Any], dtype: str = "float32", **extra):
    """``dict(name='mae', variant='S/16', decoder_depth=4)`` -> ``MAE(...)``."""
    kwargs = model_kwargs(model_config)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; valid: {sorted(_DTYPES)}.")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs 64-bit JAX: run under jax.enable_x64(True) "
                         "(or JAX_ENABLE_X64=1), or use float32.")
    kwargs.update(extra)
    return model_class(model_config["name"])(dtype=_DTYPES[dtype], **kwargs)


def capabilities(model) -> frozenset:
    """The capabilities of a built model (instance-dependent ones, e.g. ``classifier`` only
    with ``num_classes > 0``, come from its ``capabilities_of``), or of a model name."""
    if isinstance(model, str):
        return frozenset(getattr(model_class(model), "capabilities", ()))
    fn = getattr(type(model), "capabilities_of", None)
    return frozenset(fn(model) if fn else getattr(model, "capabilities", ()))


def state_collections(model) -> tuple:
    """The variable collections besides ``params`` that a model (built, a model class, or a
    registered name) keeps and updates in training, e.g. ``('batch_stats',)`` for BatchNorm
    running statistics; () for most models. A built composite model whose state depends on its
    sub-configs (CLIP with a ResNet image tower) answers through its ``state_collections_of``."""
    if not isinstance(model, (str, type)):
        fn = getattr(type(model), "state_collections_of", None)
        if fn is not None:
            return tuple(fn(model))
    cls = model_class(model) if isinstance(model, str) else (model if isinstance(model, type) else type(model))
    return tuple(getattr(cls, "state_collections", ()))


def require(model, needs: Iterable[str], who: str, name: Optional[str] = None,
            key: str = "config.model.name", carries: Union[Iterable[str], bool] = ()) -> None:
    """Raises a one-line ValueError if ``model`` (built, or a registered name: the class's
    capabilities) lacks one of ``needs``, or keeps state collections (``state_collections``)
    that the caller does not carry, naming the registered models that fit. ``carries``: the
    collections the caller threads through training and evaluation (True: whichever the model
    keeps). ``key``: the config key that chose the model (a composite model's tower names its own)."""
    needs, carried = tuple(needs), (True if carries is True else set(carries))
    unknown = [n for n in needs if n not in CAPABILITIES]
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; valid: {sorted(CAPABILITIES)}.")

    def uncarried(m):
        return [] if carried is True else [c for c in state_collections(m) if c not in carried]

    have = capabilities(model)
    missing = [n for n in needs if n not in have]
    if missing or uncarried(model):
        fits = [m for m in available() if set(needs) <= capabilities(m) and not uncarried(m)]
        label = name or (model if isinstance(model, str) else type(model).__name__)
        if missing:
            raise ValueError(f"{who} needs a model with {missing} ({'; '.join(CAPABILITIES[n] for n in missing)}); "
                             f"{key}={label!r} has {sorted(have)}; models that fit: {fits}.")
        raise ValueError(f"{who} does not carry the model state {uncarried(model)} that {key}={label!r} keeps "
                         f"(e.g. BatchNorm running statistics); models that fit: {fits}.")
