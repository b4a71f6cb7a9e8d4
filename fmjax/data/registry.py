"""Registries of the data layer: pp ops by name, data-source kinds by name prefix.

Both import the module that defines an entry only when the entry is first used (the built-ins
are listed below by module path, as ``fmjax/models/registry.py`` does for models), and both
take new entries from any module through a decorator:

    @register_op                       # pp strings can now say "my_op(3, key='image')"
    class my_op(Transform): ...

    @register_source("coco")           # get_source("coco/2017", "train") -> CocoKind().get(...)
    class CocoKind(SourceKind): ...

A module outside the built-in tables must be imported before its names are used (list it
in ``_BUILTIN_OPS`` / ``_BUILTIN_SOURCES`` when it joins fmjax). An unknown name is a
one-line ``ValueError`` naming the valid ones.
"""
from __future__ import annotations

import ast
import importlib
from typing import Any, Callable, Mapping, Optional

# -- pp ops -----------------------------------------------------------------------------------

# op name -> module that registers it (imported on first use of the name).
_BUILTIN_OPS = {
    **{name: "fmjax.data.transforms" for name in (
        "resize", "center_crop", "random_resized_crop", "flip_lr", "normalize", "keep",
        "apply_crop", "apply_flip_lr")},
    **{name: "fmjax.data.sam_ops" for name in ("resize_longest", "pad_to")},
    **{name: "fmjax.data.color_ops" for name in (
        "color_jitter", "grayscale", "gaussian_blur", "solarize", "multi_crop", "two_views")},
    **{name: "fmjax.data.text_ops" for name in ("tokenize", "swap_words")},
    **{name: "fmjax.data.autoaugment" for name in ("randaugment", "random_erasing")},
    "silhouette": "fmjax.data.shape_ops",
    **{name: "fmjax.data.mask_ops" for name in ("simmim_mask", "beit_mask")},
    "teacher_topk": "fmjax.data.stored_logits",
}
_OPS: dict[str, Callable] = {}


def register_op(name_or_op=None):
    """Registers a pp op: ``@register_op`` (named after the class or function) or
    ``@register_op("name")``. The op is any callable ``op(*literal_args, **literal_kwargs) ->
    transform``, usually a ``Transform`` subclass. Returns the op unchanged."""
    def wrap(op, name=None):
        name = name or op.__name__
        if not name.isidentifier():
            raise ValueError(f"pp op name {name!r} must be a Python identifier.")
        home = _BUILTIN_OPS.get(name)
        if home is not None and home != op.__module__:
            raise ValueError(f"pp op {name!r} is a built-in of {home}; register it under another name.")
        old = _OPS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (op.__module__, op.__qualname__):
            raise ValueError(f"pp op {name!r} is already registered ({old.__module__}.{old.__qualname__}).")
        _OPS[name] = op
        return op

    if isinstance(name_or_op, str):
        return lambda op: wrap(op, name_or_op)
    if name_or_op is None:
        return wrap
    return wrap(name_or_op)


def available_ops() -> list:
    """Every op name (built-in or registered), sorted; imports nothing."""
    return sorted(set(_BUILTIN_OPS) | set(_OPS))


def has_op(name) -> bool:
    return isinstance(name, str) and (name in _OPS or name in _BUILTIN_OPS)


def get_op(name: str) -> Callable:
    """The op registered as ``name``, importing its built-in module on first use."""
    if name not in _OPS and name in _BUILTIN_OPS:
        importlib.import_module(_BUILTIN_OPS[name])
        if name not in _OPS:
            raise RuntimeError(f"module {_BUILTIN_OPS[name]} did not register pp op {name!r}.")
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(available_ops())}")
    return _OPS[name]


def split_pp(pp: str) -> list:
    """The op specs of a pp string: split on ``|`` outside brackets and string literals."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in pp:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def build_op(spec: str):
    """``name`` or ``name(literal args...)`` (Python literals, read with ``ast.literal_eval``)
    -> the registered op's transform instance."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse op {spec!r}: {e.msg}") from None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"op {spec!r}: arguments must be Python literals") from None
        if any(k is None for k in kwargs):
            raise ValueError(f"op {spec!r}: **kwargs are not supported")
    else:
        raise ValueError(f"cannot parse op {spec!r}: expected name or name(args)")
    if not has_op(name):
        raise ValueError(f"unknown op {name!r} in {spec!r}; valid ops: {', '.join(available_ops())}")
    op = get_op(name)
    try:
        return op(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for op {spec!r}: {e}") from None


class _Ops(Mapping):
    """``OPS[name]`` -> the op (its module imported on access); ``name in OPS``, ``sorted(OPS)``."""

    def __getitem__(self, name):
        if not has_op(name):
            raise KeyError(name)
        return get_op(name)

    def __contains__(self, name):
        return has_op(name)

    def __iter__(self):
        return iter(available_ops())

    def __len__(self):
        return len(available_ops())


OPS = _Ops()

# -- data sources -----------------------------------------------------------------------------


class SourceKind:
    """A family of data sources whose names are ``<kind>``, ``<kind>/<rest>`` or
    ``<kind>:<rest>`` (e.g. ``fmjax_shapes/32``, ``image_folder:/data/pets``).

    ``get`` is required; ``check`` (cheap validation before any compile: bad name, split or
    missing files, as one-line ValueError / FileNotFoundError) and ``class_names`` are
    optional. ``forms`` says how the names look, for the unknown-name error."""

    forms: str = ""

    def get(self, name: str, split: str, data_dir: str, **options) -> Any:
        """A random-access source: ``len()`` and ``[i] -> dict of numpy``, picklable."""
        raise NotImplementedError

    def check(self, name: str, split: str, data_dir: str) -> None:
        """Raises a one-line error if ``get`` would fail; must not prepare or download."""

    def class_names(self, name: str, data_dir: str) -> Optional[list]:
        return None

    def num_classes(self, name: str, data_dir: str) -> Optional[int]:
        names = self.class_names(name, data_dir)
        return len(names) if names else None


class _FunctionKind(SourceKind):
    """A source kind made from a plain function ``fn(name, split, data_dir, **options)``."""

    def __init__(self, fn, forms):
        self.fn, self.forms = fn, forms

    def get(self, name, split, data_dir, **options):
        return self.fn(name, split, data_dir, **options)


# kind -> module that registers it (imported on first use of a name of that kind).
_BUILTIN_SOURCES = {
    "fmjax_shapes": "fmjax.data.sources",
    "image_folder": "fmjax.data.image_folder",
    "tfds": "fmjax.data.sources",
    "array_record": "fmjax.data.records",
    "wds": "fmjax.data.wds",
    "sa1b": "fmjax.data.sa1b",
}
_SOURCES: dict[str, SourceKind] = {}
_SOURCE_ORIGIN: dict[str, tuple] = {}   # kind -> (module, qualname) of what registered it


def register_source(kind: str, forms: Optional[str] = None):
    """Decorator: ``@register_source('coco')`` on a ``SourceKind`` subclass (instantiated with
    no arguments) or on a function ``fn(name, split, data_dir, **options) -> source`` makes
    names ``coco``, ``coco/<rest>`` and ``coco:<rest>`` resolve to it. ``forms`` (default: the
    class's, else ``'<kind>:<arg>'``) is shown in the unknown-name error."""
    if not kind or any(c in kind for c in ":/") or kind != kind.strip():
        raise ValueError(f"source kind {kind!r} must be non-empty without ':' or '/'.")

    def wrap(obj):
        home = _BUILTIN_SOURCES.get(kind)
        if home is not None and home != obj.__module__:
            raise ValueError(f"data source kind {kind!r} is a built-in of {home}.")
        origin = (obj.__module__, obj.__qualname__)
        old = _SOURCE_ORIGIN.get(kind)
        if old is not None and old != origin:
            raise ValueError(f"data source kind {kind!r} is already registered ({'.'.join(old)}).")
        inst = obj() if isinstance(obj, type) else _FunctionKind(obj, None)
        inst.forms = forms or inst.forms or f"'{kind}:<arg>'"
        _SOURCES[kind], _SOURCE_ORIGIN[kind] = inst, origin
        return obj
    return wrap


def source_kind_name(name) -> Optional[str]:
    """The kind a dataset name belongs to (``'image_folder'`` for ``'image_folder:/x'``), or
    None when it names no registered kind (then it is read as a TFDS catalog name)."""
    if not isinstance(name, str):
        return None
    head = name.split(":", 1)[0].split("/", 1)[0]
    return head if head in _SOURCES or head in _BUILTIN_SOURCES else None


def get_source_kind(kind: str) -> SourceKind:
    if kind not in _SOURCES and kind in _BUILTIN_SOURCES:
        importlib.import_module(_BUILTIN_SOURCES[kind])
    if kind not in _SOURCES:
        raise ValueError(f"Unknown data source kind {kind!r}; valid kinds: {available_sources()}.")
    return _SOURCES[kind]


def available_sources() -> list:
    """Every source kind (built-in or registered), sorted; imports nothing."""
    return sorted(set(_BUILTIN_SOURCES) | set(_SOURCES))


def source_forms() -> str:
    """How every kind's names look, for errors (imports the built-in kinds' modules)."""
    forms = [get_source_kind(k).forms for k in available_sources() if k != "tfds"]
    return ", ".join(forms) + ", or a TFDS catalog name such as 'imagenet2012'"
