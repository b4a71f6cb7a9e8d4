"""Parameter groups by regex: ``config.optimizer.frozen``, ``lr_mult``, ``wd_mult`` and ``llrd``.

As big_vision's ``optax.py`` (``schedule=None`` freezes, ``lr_mults`` / ``wd_mults``), every
pattern is a regex that must match a param's WHOLE '/'-joined path (``re.fullmatch``, as
big_vision's ``make_mask_trees``), e.g. ``'backbone/.*'``, ``'head/.*'``, ``'.*/bias'``. Paths
have no leading '/'. (``optimizer.no_decay`` keeps its own ``re.search`` rule.)

- ``frozen``: a tuple of patterns. A matching param gets a zero update (no weight decay either)
  and keeps no optimizer state (0-d placeholders instead of Adam moments or momentum); its
  gradient is left out of gradient clipping, as torch leaves out a ``requires_grad=False`` param.
- ``lr_mult``: a tuple of ``(pattern, multiplier)`` pairs; the FIRST matching pattern gives the
  param's multiplier (big_vision's rule), default 1. Multipliers must be > 0 (freeze with
  ``frozen``). The multiplier scales the whole step of the param, its decoupled weight decay
  included, as torch's per-group ``lr`` (MAE's ``lr_scale``) does.
- ``llrd``: ``dict(decay=0.75, num_layers=None)`` (``decay=1.0`` or None: off), layer-wise lr decay as BEiT / MAE
  (``util/lr_decay.py``: ``param_groups_lrd`` and ``get_layer_id_for_vit``). A param's
  multiplier is ``decay ** (num_layers + 1 - layer_id)`` with ``num_layers`` the number of
  transformer blocks (None: counted from the param tree, the largest ``block_<i>`` + 1; MAE's
  code calls ``num_layers + 1`` "num_layers") and ``layer_id`` from ``layer_id``: embeddings 0,
  block i i + 1, everything else (final norm, head) num_layers + 1. It multiplies ``lr_mult``.
  A scanned encoder's stacked params (``block_stack/...``, leading layer axis; see
  ``fmjax.models.scan``) get one multiplier per layer along that axis, the same numbers.
- ``wd_mult``: ``(pattern, multiplier)`` pairs, first match wins, default 1, multipliers >= 0.
  Precedence: the decay groups decide first (params with < 2 dims, biases and ``no_decay``
  matches never decay, unless ``decay_all=True``); ``wd_mult`` then scales the decay of the
  params that do decay. It cannot turn decay back on for an excluded param.

A pattern that is not a valid regex, starts with '/', or matches no param is a one-line
``ConfigError`` (the last when the optimizer state is first built, in the config check).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.errors import ConfigError

GROUP_KEYS = ("frozen", "lr_mult", "wd_mult", "llrd")

# Layer ids of fmjax's ViT paths (any prefix: 'backbone/...', 'encoder/...'); mae's
# get_layer_id_for_vit maps timm's cls_token / pos_embed / patch_embed.* to 0. fmjax's
# reg_tokens and pre_norm (timm's reg_token, norm_pre) sit below block 0 too: layer 0.
EMBED_LAYER = re.compile(r"(^|.*/)(cls_token|pos_embed|reg_tokens|mask_token|dist_token)$"
                         r"|(^|.*/)(patch_embed|pre_norm)/.*")
BLOCK_LAYER = re.compile(r"(^|.*/)block_(\d+)/.*")
STACK_LAYER = re.compile(r"(^|.*/)block_stack/.*")  # scan_layers: (depth, ...) stacked blocks


def path_str(key_path) -> str:
    """'/'-joined path of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def paths(tree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _compile(pattern, key: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"config.optimizer.{key}: {pattern!r} is not a regex string; "
                          "e.g. 'backbone/.*'.")
    if pattern.startswith("/"):
        raise ConfigError(f"config.optimizer.{key}: pattern {pattern!r} starts with '/'; param paths "
                          f"never do, e.g. {pattern.lstrip('/')!r}.")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config.optimizer.{key}: {pattern!r} is not a valid regex ({e}).") from None


def _pairs(value, key: str, positive: bool) -> list[tuple[re.Pattern, float]]:
    if not value:
        return []
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"config.optimizer.{key}={value!r}; give (regex, multiplier) pairs, "
                          f"e.g. (('head/.*', 10.0),).")
    out = []
    for item in value:
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
            raise ConfigError(f"config.optimizer.{key}: {item!r} is not a (regex, multiplier) pair, "
                              "e.g. ('head/.*', 10.0).")
        pattern, mult = item
        if isinstance(mult, bool) or not isinstance(mult, (int, float)):
            raise ConfigError(f"config.optimizer.{key}: multiplier {mult!r} of {pattern!r} is not a number.")
        mult = float(mult)
        if not (mult > 0 if positive else mult >= 0) or mult != mult or mult == float("inf"):
            raise ConfigError(f"config.optimizer.{key}: multiplier {mult} of {pattern!r} must be "
                              + ("> 0 (freeze params with config.optimizer.frozen)." if positive else ">= 0."))
        out.append((_compile(pattern, key), mult))
    return out


class Groups(NamedTuple):
    frozen: list        # compiled patterns
    lr_mult: list       # [(compiled, mult)]
    wd_mult: list
    llrd: Any           # None or (decay, num_layers or None)

    @property
    def active(self) -> bool:
        return bool(self.frozen or self.lr_mult or self.wd_mult or self.llrd)


def parse(opt: Mapping[str, Any]) -> Groups:
    """The groups of ``config.optimizer``, validated (one-line ``ConfigError``s)."""
    frozen = opt.get("frozen") or ()
    if isinstance(frozen, str) or not isinstance(frozen, Sequence):
        raise ConfigError(f"config.optimizer.frozen={frozen!r}; give a tuple of regexes, e.g. ('backbone/.*',).")
    llrd = opt.get("llrd")
    parsed_llrd = None
    if llrd is not None and not (hasattr(llrd, "keys") and not list(llrd.keys())):
        if not hasattr(llrd, "keys"):
            raise ConfigError(f"config.optimizer.llrd={llrd!r}; give dict(decay=0.75, num_layers=None).")
        unknown = set(llrd.keys()) - {"decay", "num_layers"}
        if unknown:
            raise ConfigError(f"config.optimizer.llrd has unknown keys {sorted(unknown)}; valid: decay, num_layers.")
        decay, num_layers = llrd.get("decay"), llrd.get("num_layers")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < float(decay) <= 1:
            raise ConfigError(f"config.optimizer.llrd.decay={decay!r}; must be a number in (0, 1], e.g. 0.75 "
                              "(None or {} turns layer-wise lr decay off).")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 0):
            raise ConfigError(f"config.optimizer.llrd.num_layers={num_layers!r}; the number of transformer "
                              "blocks (an int >= 0), or None to count them in the param tree.")
        parsed_llrd = None if float(decay) == 1.0 else (float(decay), num_layers)  # 1.0: off
    return Groups(frozen=[_compile(p, "frozen") for p in frozen],
                  lr_mult=_pairs(opt.get("lr_mult"), "lr_mult", positive=True),
                  wd_mult=_pairs(opt.get("wd_mult"), "wd_mult", positive=False),
                  llrd=parsed_llrd)


def first_match(path: str, pairs, default: float = 1.0) -> float:
    for pattern, mult in pairs:
        if pattern.fullmatch(path):
            return mult
    return default


def layer_id(path: str, num_layers: int) -> int:
    """mae's ``get_layer_id_for_vit`` on fmjax paths: embeddings 0, ``block_<i>`` i + 1, the
    rest (final norm, head, projections) ``num_layers + 1``."""
    if EMBED_LAYER.fullmatch(path):
        return 0
    m = BLOCK_LAYER.fullmatch(path)
    if m:
        return int(m.group(2)) + 1
    return num_layers + 1


def count_blocks(all_paths, stacked_lengths=()) -> int:
    """The number of transformer blocks: the largest ``block_<i>`` + 1, or a scanned stack's
    length (``stacked_lengths``), whichever is larger."""
    ids = [int(m.group(2)) for p in all_paths if (m := BLOCK_LAYER.fullmatch(p))]
    return max([max(ids) + 1 if ids else 0, *stacked_lengths])


def llrd_mult(path: str, decay: float, num_layers: int) -> float:
    return decay ** (num_layers + 1 - layer_id(path, num_layers))


def check_matches(groups: Groups, all_paths) -> None:
    """Every pattern must match at least one param (a typo would silently freeze nothing)."""
    named = ([("frozen", p) for p in groups.frozen] + [("lr_mult", p) for p, _ in groups.lr_mult]
             + [("wd_mult", p) for p, _ in groups.wd_mult])
    for key, pattern in named:
        if not any(pattern.fullmatch(p) for p in all_paths):
            example = ", ".join(repr(p) for p in list(all_paths)[:3])
            raise ConfigError(f"config.optimizer.{key}: {pattern.pattern!r} matches no param (patterns match "
                              f"the whole '/'-joined path, e.g. {example}).")


def lr_multipliers(groups: Groups, params) -> dict[str, Any]:
    """{path: lr multiplier} for every param of ``params`` (the whole tree: LLRD counts its
    blocks): lr_mult's first match times the LLRD factor. With LLRD, a stacked param
    (``block_stack/...``) gets a numpy vector, one multiplier per layer (its leading axis)."""
    flat = [(path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    all_paths = [p for p, _ in flat]
    out = {p: first_match(p, groups.lr_mult) for p in all_paths}
    if groups.llrd:
        decay, n = groups.llrd
        stacked = {p: x.shape[0] for p, x in flat if STACK_LAYER.fullmatch(p) and x.ndim}
        n = count_blocks(all_paths, stacked.values()) if n is None else n
        out = {p: (m * np.array([decay ** (n - i) for i in range(stacked[p])]) if p in stacked
                   else m * llrd_mult(p, decay, n)) for p, m in out.items()}
    return out


def is_frozen(groups: Groups, path: str) -> bool:
    return any(p.fullmatch(path) for p in groups.frozen)


def without_frozen(inner: optax.GradientTransformation, groups: Groups) -> optax.GradientTransformation:
    """``inner`` on the trained params only: a frozen param is a 0-d zero there, so its optimizer
    slots (Adam moments, momentum, count) are 0-d placeholders, its gradient adds nothing to
    clipping norms (torch: no grad), and its update is zero. The state keeps one leaf per param
    (unlike ``optax.multi_transform``'s MaskedNodes), so sharding by ``optax.tree_map_params``
    and the step's ``update_mask`` handling work unchanged."""
    def shrink(tree):
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: jnp.zeros((), x.dtype) if is_frozen(groups, path_str(kp)) else x, tree)

    def init(params):
        return inner.init(shrink(params))

    def update(updates, state, params=None):
        out, state = inner.update(shrink(updates), state, None if params is None else shrink(params))
        out = jax.tree_util.tree_map_with_path(
            lambda kp, o, u: jnp.zeros_like(u) if is_frozen(groups, path_str(kp)) else o, out, updates)
        return out, state
    return optax.GradientTransformation(init, update)


def keep_frozen(groups: Groups) -> optax.GradientTransformation:
    """The last transformation: a frozen param's update is -0.0, and p + (-0.0) == p bit for
    bit for every p (-0.0 included, which p + 0.0 would turn into +0.0). No state."""
    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(
            lambda kp, u: jnp.full_like(u, -0.0) if is_frozen(groups, path_str(kp)) else u,
            updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_multipliers(groups: Groups) -> optax.GradientTransformation:
    """Each update times its param's lr multiplier (``lr_multipliers``); sees the whole tree.
    Its init checks that every pattern matches some param."""
    def init(params):
        all_paths = paths(params)
        if all_paths:  # optax.tree_map_params inits with a leafless placeholder
            check_matches(groups, all_paths)
        return optax.EmptyState()

    def update(updates, state, params=None):
        mults = lr_multipliers(groups, updates)

        def scale(kp, u):
            m = mults[path_str(kp)]
            if isinstance(m, np.ndarray):  # per layer of a stacked param (leading axis)
                return u * jnp.asarray(m, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)
        return jax.tree_util.tree_map_with_path(scale, updates), state
    return optax.GradientTransformation(init, update)


def add_decayed_weights(weight_decay, groups: Groups, decays) -> optax.GradientTransformation:
    """``u + weight_decay * wd_mult * p`` for the params ``decays(path, leaf)`` selects (the decay
    groups: fmjax's mask, or every param with ``decay_all``); ``optax.add_decayed_weights``'s
    arithmetic where wd_mult is 1."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def add(kp, u, p):
            path = path_str(kp)
            if not decays(path, p):
                return u
            mult = first_match(path, groups.wd_mult)
            if mult == 0.0:
                return u
            wd = weight_decay if mult == 1.0 else weight_decay * mult
            return u + wd * p
        return jax.tree_util.tree_map_with_path(add, updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
