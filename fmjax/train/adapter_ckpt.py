"""Adapter-only checkpoints: a run with ``config.adapter`` stores what it trains, not its base.

With an adapter (``fmjax.adapt``) every param outside the adapter's trainable mask is frozen:
it never changes from what ``create_state`` made of it (the fresh init of ``config.seed``
with ``config.model_init``'s weights put in), and neither do its optimizer slots (the
trainer's ``mask_update`` keeps them at ``tx.init``). So a checkpoint step stores:

- the trainable params (adapter params and the ``adapter.train`` regexes) and their optimizer
  slots, the step, the rng and the objective state (EMA teachers, queues: stored whole);
- in place of each frozen array, a 0-d placeholder of its dtype (Orbax writes no empty arrays);
- in its meta, ``stored='adapter'`` and ``adapter_base``: the ``model_init`` the base came
  from and an exact digest of the frozen arrays.

A restore builds the base again (``create_state`` with ``model_init``), reads the stored arrays
over it and checks the digest: a base that changed since (another ``model_init`` file, a
retrained workdir) is a one-line ``IncompatibleCheckpointError``, never a silently different
model. ``config.adapter.checkpoint='full'`` stores every array, as a run without an adapter
does; checkpoints of either kind restore in either mode (the meta says which it is).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import adapt
from fmjax.train import step as step_lib

_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant: position weights


def _leaf_digest(x: jax.Array) -> jax.Array:
    """Two uint32 sums of the raw bits of ``x``: plain and position-weighted. Integer sums wrap
    and are associative, so the digest is exact for any sharding or reduction order."""
    nbits = 8 * x.dtype.itemsize
    if nbits > 32:  # float64: fold the two halves
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
        bits = bits[..., 0] ^ (bits[..., 1] * _GOLDEN)
    elif x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[nbits])
        bits = bits.astype(jnp.uint32)
    pos = jax.lax.iota(jnp.uint32, max(bits.size, 1))[:bits.size].reshape(bits.shape)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                      jnp.sum(bits * (pos * _GOLDEN + jnp.uint32(1)), dtype=jnp.uint32)])


@dataclasses.dataclass
class AdapterStore:
    """What a run with an adapter stores, and how it gets its base back.

    ``masks``: a TrainState of bools (True: stored); ``param_mask`` its params part;
    ``make_base()``: a full fresh state (the base weights in place), built when a restore needs
    it and not kept (a train step donates the state's buffers, and a second copy of the base
    would double the memory).
    """
    masks: Any
    param_mask: Any
    make_base: Callable[[], Any]
    model_init: Any = None
    prune_saves: bool = True     # 'adapter' mode; 'full' saves every array but restores either kind
    _digest: Optional[str] = None

    def digest(self, params) -> str:
        """The exact digest of the frozen params (their paths, shapes, dtypes and bits)."""
        frozen = [(jax.tree_util.keystr(k), v) for (k, v), m in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(self.param_mask)) if not m]
        sums = jax.jit(lambda vs: [_leaf_digest(v) for v in vs])([v for _, v in frozen])
        h = hashlib.sha1()
        for (key, v), s in zip(frozen, jax.device_get(sums)):
            h.update(f"{key}:{tuple(v.shape)}:{v.dtype}:{int(s[0])}:{int(s[1])};".encode())
        return h.hexdigest()[:20]

    def meta(self, state) -> dict:
        """``meta['adapter_base']`` of a save (the digest is computed once: the base is frozen)."""
        if self._digest is None:
            self._digest = self.digest(state.params)
        return dict(digest=self._digest, model_init=self.model_init)

    def check(self, state, meta: dict, directory) -> None:
        """Raises a one-line ``IncompatibleCheckpointError`` if the base put under a restored
        adapter differs from the one it was trained on."""
        from fmjax.train.checkpoint import IncompatibleCheckpointError
        saved = (meta.get("adapter_base") or {}).get("digest")
        now = self.digest(state.params)
        if saved != now:
            raise IncompatibleCheckpointError(
                f"{directory} holds adapter-only checkpoints whose base weights (config.model_init="
                f"{(meta.get('adapter_base') or {}).get('model_init')!r}, digest {saved}) differ from "
                f"the base this config loads now (digest {now}); restore the original base weights, "
                "or use a new --workdir.")
        self._digest = now

    def prune(self, state):
        """What is saved: ``state`` with every frozen array replaced by a 0-d placeholder (Orbax
        writes no empty arrays)."""
        return jax.tree.map(lambda x, m: x if m else np.zeros((), x.dtype), state, self.masks)

    def prune_target(self, target):
        """The restore target of a pruned checkpoint: ``target`` (ShapeDtypeStructs with
        shardings) with the placeholders' 0-d shape where arrays are frozen."""
        def one(t, m):
            if m:
                return t
            sh = t.sharding
            rep = NamedSharding(sh.mesh, P()) if isinstance(sh, NamedSharding) else sh
            return jax.ShapeDtypeStruct((), t.dtype, sharding=rep)
        return jax.tree.map(one, target, self.masks)

    def fill(self, restored, with_opt_state: bool = True):
        """``restored`` (a pruned state) with the base's arrays in place of the placeholders."""
        base = self.make_base()
        masks = self.masks
        if not with_opt_state:
            base, masks = base.replace(opt_state=None), masks.replace(opt_state=None)
        return jax.tree.map(lambda r, b, m: r if m else b, restored, base, masks)


def for_run(config, tx, abstract_state, make_base: Callable[[], Any]) -> Optional[AdapterStore]:
    """The ``AdapterStore`` of a run with an adapter (its saves are pruned in 'adapter' mode),
    else None (every array is stored, and adapter-only steps cannot be restored)."""
    a = adapt.spec(config)
    if a is None:
        return None
    param_mask = adapt.trainable_mask(abstract_state.params, a)
    masks = abstract_state.replace(step=True, params=param_mask,
                                   opt_state=step_lib.slot_mask(tx, abstract_state.opt_state, param_mask),
                                   extra=jax.tree.map(lambda _: True, abstract_state.extra), rng=True)
    mi = config.get("model_init")
    mi = mi.to_dict() if hasattr(mi, "to_dict") else mi
    return AdapterStore(masks=masks, param_mask=param_mask, make_base=make_base, model_init=mi,
                        prune_saves=a["checkpoint"] == "adapter")
