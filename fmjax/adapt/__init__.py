"""Adapters applied from outside the model, selected by ``config.adapter``.

``config.adapter = dict(name='lora', rank=8, alpha=16.0, targets='attn/(query|value)$',
train=('head/.*',))`` (or ``name='houlsby', bottleneck=64, kind='serial'``) wraps the objective (``fmjax.objectives.base.make_objective``)
in an ``AdaptedObjective``: every method of the objective runs inside the adapter's
``inject.hooks`` context, so the adapter params are created by ``init`` beside the modules
they adapt (``.../attn/query/lora_a``) and used by the loss, the evaluators, the pictures and
sampling alike, with no edit to the model, the objective or the trainer. Only the adapter
params, plus the params whose '/'-joined path matches a ``train`` regex (``re.fullmatch``;
e.g. a new classifier head), are updated: the rest is frozen through the objective's
``update_mask`` (no update, no weight decay; the trainer's frozen-param path), so the base
params stay bit-identical. The base weights come from ``config.model_init`` (a workdir or a
converted checkpoint) as for any fine-tuning.

Adapters: ``lora`` (``fmjax.adapt.lora``: dense layers, attention projections and ungrouped
convolutions; mergeable into the kernels for export),
``houlsby`` (``fmjax.adapt.houlsby``: serial or parallel bottleneck adapters) and ``prefix``
(``fmjax.adapt.prefix``: learned key / value prefixes per attention, through the attention
hook); export refuses the last two (the plain model has no place for them). ``name=''`` (or no ``config.adapter``): none.

``prompt`` is VPT-shallow: ``length`` prompt tokens in a ViT (its register tokens, see
``prepare_config``), trained alone; with ``deep=True`` VPT-deep (``fmjax.adapt.prompt``): every
encoder block gets its own ``length`` prompts, through the block hook. ``text_length`` = n > 0
adds CoOp's text soft prompts to a CLIP model's text tower (``TextTransformer.num_prompts``: n
learned context vectors after the start token of every caption and class prompt).

Checkpoints hold the trained arrays alone (``checkpoint='adapter'``, the default: the frozen
base is read again from ``config.model_init`` and checked against a digest stored with them;
``fmjax.train.adapter_ckpt``), or every array (``checkpoint='full'``).

LoRA takes ``dropout`` (PEFT's ``lora_dropout``, on training passes; ``fmjax.adapt.lora``).

``dropout`` works for every adapter in training passes: LoRA's branch input, the bottleneck
adapters' output, each example's prefix keys / values, VPT-deep's per-layer prompts (VPT-shallow's
prompts are register tokens: refused). VPT on a CLIP-like model prompts its image tower (the
flat ViT's ``num_registers``, or the ``image`` sub-config's; VPT-deep's default targets are the
image tower's blocks, ``IMAGE_TOWER_TARGETS``), CoOp its text tower.
"""
from __future__ import annotations

import inspect
import math
import re

import flax.linen as nn
import jax

from fmjax.adapt import houlsby as houlsby_lib
from fmjax.adapt import lora as lora_lib
from fmjax.adapt import prefix as prefix_lib
from fmjax.adapt import prompt as prompt_lib
from fmjax.errors import ConfigError
from fmjax.models import inject
from fmjax.train.param_groups import path_str, paths

ADAPTERS = ("lora", "houlsby", "prefix", "prompt")
CHECKPOINT_MODES = ("adapter", "full")  # see fmjax.train.adapter_ckpt
KEYS = {"lora": ("name", "rank", "alpha", "targets", "train", "dropout", "checkpoint"),
        "houlsby": ("name", "bottleneck", "kind", "scale", "targets", "train", "dropout", "checkpoint"),
        "prefix": ("name", "length", "targets", "train", "dropout", "checkpoint"),
        "prompt": ("name", "length", "deep", "text_length", "targets", "train", "dropout", "checkpoint")}
DEFAULT_TARGETS = {"lora": r"attn/(query|value)$", "houlsby": r"attn/out$|mlp/fc2$", "prefix": r"attn$",
                   "prompt": ""}
# What a dense adapter's hooks reach (the trainer's unreachable-targets warning names it).
REACH = {"lora": "dense layers, attention projections or ungrouped convolutions",
         "houlsby": "dense layers or attention projections"}
PROMPT_PARAM = "reg_tokens"  # VPT-shallow prompts are the ViT's register tokens
ADAPTER_PARAMS = lora_lib.LORA_PARAMS + houlsby_lib.PARAMS + prefix_lib.PARAMS + prompt_lib.PARAMS
# config.adapter keys that only the other adapter reads (base_config lists every key).
_SHARED_DEFAULTS = dict(rank=8, alpha=None, bottleneck=64, kind="serial", scale=1.0, length=10, targets="",
                        deep=False, text_length=0)


def _get(a, key, default):
    v = a.get(key, default) if hasattr(a, "get") else default
    return default if v is None else v


def spec(config) -> dict | None:
    """The checked ``config.adapter`` as a plain dict, or None when no adapter is set.
    Bad values are one-line ConfigErrors."""
    a = config.get("adapter") if hasattr(config, "get") else None
    name = _get(a, "name", "") if a is not None else ""
    if not name:
        return None
    if name not in ADAPTERS:
        raise ConfigError(f"config.adapter.name={name!r}; valid: {list(ADAPTERS)} (or '' for none).")
    known = set().union(*KEYS.values())
    unknown = sorted(set(a.keys()) - known)
    if unknown:
        raise ConfigError(f"config.adapter has unknown keys {unknown} for {name!r}; valid: {list(KEYS[name])}.")
    for k in sorted(set(a.keys()) - set(KEYS[name])):  # another adapter's key, left at its default
        if a.get(k) is not None and a.get(k) != _SHARED_DEFAULTS.get(k):
            raise ConfigError(f"config.adapter.{k}={a.get(k)!r} is not an option of the {name!r} adapter; "
                              f"its options: {list(KEYS[name])}.")
    targets = _get(a, "targets", "") or DEFAULT_TARGETS[name]
    train = _get(a, "train", ())
    train = (train,) if isinstance(train, str) else tuple(train)
    for what, pats in (("targets", (targets,)), ("train", train)):
        for p in pats:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise ConfigError(f"config.adapter.{what}={p!r} is not a regex ({e}).") from None
    checkpoint = _get(a, "checkpoint", "adapter")
    if checkpoint not in CHECKPOINT_MODES:
        raise ConfigError(f"config.adapter.checkpoint={checkpoint!r}; valid: {list(CHECKPOINT_MODES)} "
                          "('adapter': checkpoints hold the trained arrays, the base is read again from "
                          "config.model_init; 'full': every array).")
    dropout = _get(a, "dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.adapter.dropout={dropout!r} must be in [0, 1).")
    dropout = float(dropout)
    if dropout and name == "prompt" and not _get(a, "deep", False):
        raise ConfigError(f"config.adapter.dropout={dropout}: VPT-shallow's prompts are the ViT's register "
                          "tokens, which have no dropout here; use deep=True (dropout on every layer's prompts) or 0.")
    if name == "lora":
        rank, alpha = _get(a, "rank", 8), _get(a, "alpha", None)
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"config.adapter.rank={rank!r} must be an int >= 0 (0: no LoRA params).")
        alpha = float(2 * rank if alpha is None else alpha)
        return dict(name=name, rank=rank, alpha=alpha, targets=targets, train=train, checkpoint=checkpoint,
                    dropout=dropout)
    if name in ("prefix", "prompt"):
        length = _get(a, "length", 10)
        if not isinstance(length, int) or length < 0:
            raise ConfigError(f"config.adapter.length={length!r} must be an int >= 0 (0: none).")
        out = dict(name=name, length=length, targets=targets, train=train, checkpoint=checkpoint,
                   dropout=dropout)
        if name == "prompt":
            out.update(_deep_prompt(config, a, length))
            text_length = _get(a, "text_length", 0)
            if not isinstance(text_length, int) or text_length < 0:
                raise ConfigError(f"config.adapter.text_length={text_length!r} must be an int >= 0 (0: none).")
            out["text_length"] = text_length
        return out
    bottleneck, kind = _get(a, "bottleneck", 64), _get(a, "kind", "serial")
    if not isinstance(bottleneck, int) or bottleneck < 0:
        raise ConfigError(f"config.adapter.bottleneck={bottleneck!r} must be an int >= 0.")
    if kind not in houlsby_lib.KINDS:
        raise ConfigError(f"config.adapter.kind={kind!r}; valid: {list(houlsby_lib.KINDS)}.")
    return dict(name=name, bottleneck=bottleneck, kind=kind, scale=float(_get(a, "scale", 1.0)),
                targets=targets, train=train, checkpoint=checkpoint, dropout=dropout)


# VPT-deep's blocks in a two-tower (CLIP-like) model: the image tower's alone.
IMAGE_TOWER_TARGETS = r"(^|/)image/encoder/block(_\d+|_stack)$"


def _vit_config(config):
    """The ViT's config that VPT prompts: ``config.model``, or a CLIP-like model's image tower
    (its ``image`` sub-config, else the flat image keys of ``config.model``)."""
    m = config.get("model") if hasattr(config, "get") else None
    image = m.get("image", None) if m is not None and hasattr(m, "get") else None
    return image if image else m


def _deep_prompt(config, a, length: int) -> dict:
    """VPT-deep's fields of the spec: ``deep``, and where the prompt slots start (``offset``: class
    and distillation tokens plus the model's own registers) and VPT's init bound; in a two-tower
    model the default targets are the image tower's blocks."""
    deep = _get(a, "deep", False)
    if not isinstance(deep, bool):
        raise ConfigError(f"config.adapter.deep={deep!r} must be True (VPT-deep) or False (VPT-shallow).")
    if not deep:
        return dict(deep=False)
    m = _vit_config(config)
    get = (lambda k, d: m.get(k, d)) if m is not None else (lambda k, d: d)
    offset = (int(bool(get("class_token", True))) + int(bool(get("distill_token", False)))
              + int(get("num_registers", 0) or 0))
    bound = prompt_lib.init_bound(int(get("patch_size", 16) or 16), int(get("width", 768) or 768))
    out = dict(deep=True, offset=offset, bound=bound)
    model = config.get("model") if hasattr(config, "get") else None
    if model is not None and "text" in _model_fields(model.get("name")) and not _get(a, "targets", ""):
        out["targets"] = IMAGE_TOWER_TARGETS
    return out


def _model_fields(name) -> dict:
    from fmjax.models.registry import model_class
    try:
        return getattr(model_class(name), "__dataclass_fields__", {})
    except (KeyError, ValueError):
        return {}


def hooks(adapter: dict) -> dict:
    """The ``inject.hooks`` keyword arguments (dense= / attention= / block= / conv=) of a checked
    adapter spec."""
    if adapter["name"] == "lora":
        args = (adapter["rank"], adapter["alpha"], adapter["targets"], adapter.get("dropout", 0.0))
        return dict(dense=lora_lib.lora_hook(*args), conv=lora_lib.lora_conv_hook(*args))
    if adapter["name"] == "prefix":
        return dict(attention=prefix_lib.prefix_hook(adapter["length"], adapter["targets"],
                                                     adapter.get("dropout", 0.0)))
    if adapter["name"] == "prompt":  # the prompt slots are model tokens (prepare_config)
        if not adapter.get("deep"):
            return {}
        return dict(block=prompt_lib.deep_hook(adapter["length"], adapter["targets"] or prompt_lib.DEFAULT_TARGETS,
                                               adapter["offset"], adapter["bound"], adapter.get("dropout", 0.0)))
    return dict(dense=houlsby_lib.adapter_hook(adapter["bottleneck"], adapter["targets"],
                                               adapter["kind"], adapter["scale"], adapter.get("dropout", 0.0)))


def trainable_mask(params, adapter: dict):
    """Tree of bools like ``params``: True for the adapter params and the ``train`` regexes."""
    train = [re.compile(p) for p in adapter["train"]]

    def keep(path, _):
        name = path_str(path)
        leaf = name.rpartition("/")[2]
        if path and (leaf in ADAPTER_PARAMS or (adapter["name"] == "prompt" and not adapter.get("deep")
                                                 and leaf == PROMPT_PARAM)):
            return True
        return any(p.fullmatch(name) for p in train)
    return jax.tree_util.tree_map_with_path(keep, params)


class HookedObjective:
    """An objective whose every method runs with ``dense_hook`` / ``attention_hook`` / ``block_hook`` /
    ``conv_hook`` active (an ``inject.hooks`` context entered around each call, so every trace
    inside sees it); ``supports()`` sees exactly the inner objective's capabilities."""

    def __init__(self, inner, dense_hook=None, attention_hook=None, block_hook=None, conv_hook=None):
        self._inner = inner
        self._hooks = inject.hooks(dense=dense_hook, attention=attention_hook, block=block_hook, conv=conv_hook)

    def _wrap(self, fn):
        def call(*args, **kwargs):
            with self._hooks:
                return fn(*args, **kwargs)
        call.__name__ = getattr(fn, "__name__", "call")
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def __getattr__(self, name):
        inner = self.__dict__["_inner"]
        attr = getattr(inner, name)
        # An unsupported capability stays unsupported: None (optional hooks) or the base class's
        # NotImplementedError stub (marked ``is_stub`` by fmjax.objectives.base), which
        # ``supports()`` must not see as a method of the wrapper.
        if attr is None or getattr(getattr(type(inner), name, None), "is_stub", False):
            return None
        return self._wrap(attr) if inspect.ismethod(attr) else attr


class AdaptedObjective(HookedObjective):
    """An objective whose every method runs with the adapter's hooks active, and whose
    ``update_mask`` freezes every non-adapter param (see the module docstring)."""

    def __init__(self, inner, adapter: dict):
        h = hooks(adapter)
        super().__init__(inner, h.get("dense"), h.get("attention"), h.get("block"), h.get("conv"))
        self.adapter = adapter
        self.reach = REACH.get(adapter["name"], "")

    def update_mask(self, params, step):
        mask = trainable_mask(params, self.adapter)
        if callable(getattr(self._inner, "update_mask", None)):
            with self._hooks:
                inner = self._inner.update_mask(params, step)
            mask = jax.tree.map(lambda a, b: a & b, mask, inner)
        return mask

    def unreached_targets(self, params) -> list[str]:
        """Layers with a ``kernel`` whose path matches a dense adapter's (LoRA's, Houlsby's)
        ``targets`` but which hold no adapter params: for LoRA neither a ``DenseND`` nor an
        ungrouped ``core.Conv`` (a grouped convolution, a plain ``nn.Dense``, the dVAE's own
        convs), for Houlsby not a ``DenseND``, so the hook never saw them and they stay frozen. The trainer warns
        about them in one line (a regex alternative naming only such layers would otherwise be
        skipped in silence while the others train)."""
        if self.adapter["name"] not in ("lora", "houlsby"):
            return []
        pattern = re.compile(self.adapter["targets"])
        names: dict = {}
        for name in paths(nn.unbox(params)):
            module, _, leaf = name.rpartition("/")
            names.setdefault(module, set()).add(leaf)
        return sorted(m for m, leaf in names.items()
                      if "kernel" in leaf and not leaf & set(ADAPTER_PARAMS) and pattern.search(m))

    def trainable_count(self, params, nbytes: bool = False) -> int:
        """Parameters the adapter trains (the banner's 'trainable'), or their bytes."""
        params = nn.unbox(params)
        return sum(math.prod(x.shape) * (x.dtype.itemsize if nbytes else 1)
                   for x, m in zip(jax.tree.leaves(params),
                                   jax.tree.leaves(trainable_mask(params, self.adapter))) if m)


def prepare_config(config):
    """The config the objective is built from: ``config`` itself, or for ``prompt`` a copy whose
    model holds the prompt slots. VPT (Jia et al. 2022): the ViT gets ``length`` more register
    tokens, exactly VPT-shallow's prompts (learned tokens inserted after the class token, with
    no position embedding, through every block, dropped before pooling; the adapter trains them
    alone, a pretrained model's own registers too) and VPT-deep's slots. CoOp: a CLIP model's
    text tower gets ``num_prompts = text_length`` learned context vectors."""
    a = spec(config)
    if a is None or a["name"] != "prompt" or (a["length"] == 0 and a["text_length"] == 0):
        return config
    from fmjax.models.registry import model_class
    name = config.model.get("name")
    fields = getattr(model_class(name), "__dataclass_fields__", {})  # an unknown name: its ValueError
    image = config.model.get("image", None) if "image" in fields else None
    holder, holder_fields = (name, fields) if not image else (
        f"{name}'s image tower {image.get('name')!r}", _model_fields(image.get("name")))
    if a["length"] and "num_registers" not in holder_fields:
        raise ConfigError(f"config.adapter.name='prompt' (VPT) inserts config.adapter.length={a['length']} prompt "
                          f"tokens into a ViT; model {holder!r} has no register tokens to hold them"
                          + (" (for CLIP's text prompts alone set length=0 and text_length)." if "text" in fields else "."))
    if a["text_length"] and "text" not in fields:
        raise ConfigError(f"config.adapter.text_length={a['text_length']} adds text soft prompts (CoOp) to a CLIP "
                          f"text tower; model {name!r} has none.")
    import copy
    config = copy.deepcopy(config)
    with config.unlocked() if hasattr(config, "unlocked") else _nullcontext():
        if a["length"] and image:  # a two-tower model's image tower sub-config
            image = dict(image.to_dict() if hasattr(image, "to_dict") else image)
            image["num_registers"] = int(image.get("num_registers", 0) or 0) + a["length"]
            config.model.image = image
        elif a["length"]:
            config.model.num_registers = int(config.model.get("num_registers", 0) or 0) + a["length"]
        if a["text_length"]:
            text = config.model.get("text")
            text = dict(text.to_dict() if hasattr(text, "to_dict") else (text or {}))
            text["num_prompts"] = int(text.get("num_prompts", 0) or 0) + a["text_length"]
            config.model.text = text
    return config


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def wrap(objective, config):
    """``objective`` wrapped by ``config.adapter``'s adapter, or unchanged when none is set."""
    a = spec(config)
    return objective if a is None else AdaptedObjective(objective, a)
