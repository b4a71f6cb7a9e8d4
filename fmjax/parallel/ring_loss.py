"""Chunked ring contrastive losses (CLIP softmax, SigLIP sigmoid) without the B x B matrix.

The gathered losses in ``fmjax.objectives.clip`` form the global [B, B] logits, so each
device holds O(B x B_local) or O(B x B) floats. Here the batch stays split over the mesh's
batch axes (``BATCH_AXES``, flattened into one ring of ``n`` devices, ``b = B / n`` rows
each): inside ``shard_map`` every device keeps its ``b`` image embeddings and the ``b``-row
text chunks (with the hard-negative chunks) travel around the ring by ``ppermute``, as in the
SigLIP paper's chunked implementation. Every ring step forms one [b, b] block only.

* sigmoid: each block's log-sigmoid terms are summed on the spot (the diagonal, +1 labels,
  is in the device's own block, step 0).
* softmax: the image->text log-sum-exp of each local row is accumulated online (running
  max and sum) over the visiting text (and hard-negative) chunks; the text->image
  log-sum-exp of a column travels WITH its text chunk as a running (max, sum) pair, and
  comes home after the last step (one more ``ppermute`` of two [b] vectors).
* metrics: i2t / t2i accuracy by a running first-occurrence argmax in the same two
  directions, so they equal ``argmax`` on the gathered [B, B] logits.

Gradients come from a ``jax.custom_vjp`` whose backward is a second ring pass: it recomputes
each [b, b] block from the saved per-row / per-column log-sum-exps ([b] vectors), adds the
image gradient locally and sends the text (and negative) gradient accumulators around with
their chunks, home at the end. So forward and backward keep O(b x b + b x D) per device and
per step, never the n blocks of one pass (plain autodiff through the loop would store them).

The mesh is the ambient one (``jax.set_mesh``, which the trainer's ``mesh_context`` enters
around tracing), read with ``jax.sharding.get_abstract_mesh()``; or passed as ``mesh=``.
With no mesh, or batch axes of total size 1, the same code runs on the whole batch as one
chunk (n = 1, no collectives).
"""
from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fmjax.parallel.mesh import BATCH_AXES

try:
    from jax import shard_map as _shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map

KINDS = ("softmax", "sigmoid")
_SCALARS = ("scale", "bias")
_warned_no_mesh = False


def context_mesh():
    """The ambient mesh (``jax.set_mesh`` / ``with mesh:``), or None when there is none."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is not None:
        mesh = get()
        return None if mesh.empty else mesh
    try:  # older jax: ``with mesh:``
        from jax.interpreters import pxla
        mesh = pxla.thread_resources.env.physical_mesh
        return None if mesh.empty else mesh
    except (ImportError, AttributeError):
        return None


def ring_axes(mesh) -> tuple[tuple[str, ...], int]:
    """The mesh's batch axes (the ring, flattened data-major) and the ring's length."""
    if mesh is None:
        return (), 1
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes, math.prod(mesh.shape[a] for a in axes)


def ring_loss(kind: str, image_embeds, text_embeds, logit_scale, logit_bias=None,
              neg_embeds=None, neg_valid=None, *, mesh=None):
    """The global-batch contrastive loss by a ring over the mesh's batch axes.

    ``kind``: 'softmax' (CLIP's symmetric InfoNCE, ``softmax_clip_loss``) or 'sigmoid'
    (SigLIP, ``sigmoid_loss``, needs ``logit_bias``); ``neg_embeds`` / ``neg_valid``: NegCLIP
    hard negatives, with the same meaning as there. The arguments are GLOBAL arrays (inside
    jit), their batch dimension split over the batch axes. Returns ``(loss, metrics)`` with
    ``metrics = {'i2t_acc', 't2i_acc'}``; loss and gradients equal the gathered functions'.
    """
    global _warned_no_mesh
    if kind not in KINDS:
        raise ValueError(f"ring_loss kind={kind!r}; valid: {list(KINDS)}.")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("ring_loss kind='sigmoid' needs logit_bias.")
    if mesh is None:
        mesh = context_mesh()
        if mesh is None and jax.device_count() > 1 and not _warned_no_mesh:
            _warned_no_mesh = True
            print("fmjax: warning: the ring contrastive loss found no mesh (jax.set_mesh); it "
                  "runs on the global arrays as one chunk, which XLA gathers.", file=sys.stderr,
                  flush=True)
    axes, n = ring_axes(mesh)
    batch = image_embeds.shape[0]
    if batch % n:
        raise ValueError(f"ring loss: batch {batch} does not split over the {n} devices of "
                         f"the mesh axes {axes}.")
    f32 = jnp.float32
    arrays = {"img": image_embeds.astype(f32), "txt": text_embeds.astype(f32),
              "scale": jnp.asarray(logit_scale, f32)}
    if kind == "sigmoid":
        arrays["bias"] = jnp.asarray(logit_bias, f32)
    if neg_embeds is not None:
        arrays["neg"] = neg_embeds.astype(f32)
        arrays["valid"] = (jnp.ones(batch, f32) if neg_valid is None
                           else (jnp.asarray(neg_valid) > 0).astype(f32))
    loss, i2t, t2i = _ring_fn(kind, mesh if n > 1 else None, axes, n)(arrays)
    return loss, {"i2t_acc": i2t, "t2i_acc": t2i}


# -- the custom_vjp over global arrays ----------------------------------------------------

def _smap(body, mesh, in_specs, out_specs):
    try:
        return _shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                          check_vma=False)
    except TypeError:  # older jax
        return _shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                          check_rep=False)


def _ring_fn(kind, mesh, axes, n):
    def specs(arrays):
        return {k: P() if k in _SCALARS else P(axes) for k in arrays}

    def run(body, args, in_specs, out_specs):
        if n == 1:  # one chunk: no shard_map, no collectives
            return body(*args)
        return _smap(body, mesh, in_specs, out_specs)(*args)

    def fwd(arrays):
        body = functools.partial(_forward, kind=kind, axes=axes, n=n)
        loss, i2t, t2i, lse_r, lse_c = run(body, (arrays,), (specs(arrays),),
                                           (P(), P(), P(), P(axes), P(axes)))
        return (loss, i2t, t2i), (arrays, lse_r, lse_c)

    def bwd(res, cts):
        arrays, lse_r, lse_c = res
        body = functools.partial(_backward, kind=kind, axes=axes, n=n)
        grads = run(body, (arrays, lse_r, lse_c), (specs(arrays), P(axes), P(axes)),
                    specs(arrays))
        g = cts[0]  # the metrics' cotangents are ignored: they have no gradient
        return (jax.tree.map(lambda x: x * g, grads),)

    @jax.custom_vjp
    def fn(arrays):
        return fwd(arrays)[0]

    fn.defvjp(fwd, bwd)
    return fn


# -- per-device bodies (inside shard_map; n == 1: the whole batch) -------------------------

def _shift(tree, axes, n):
    """Device i sends to i + 1 (mod n): after r shifts device k holds chunk (k - r) mod n."""
    return jax.lax.ppermute(tree, axes, [(i, (i + 1) % n) for i in range(n)])


def _index(axes, n):
    return jax.lax.axis_index(axes) if n > 1 else jnp.zeros((), jnp.int32)


def _psum(x, axes, n):
    return jax.lax.psum(x, axes) if n > 1 else x


def _ring(step, row, chunk, k, axes, n):
    """step(row, chunk, origin, first) at ring step 0 (own chunk) and steps 1..n-1."""
    row, chunk = step(row, chunk, k, True)
    if n > 1:
        def body(r, carry):
            row, chunk = carry
            return step(row, _shift(chunk, axes, n), (k - r) % n, False)
        row, chunk = jax.lax.fori_loop(1, n, body, (row, chunk))
    return row, chunk


def _lse_update(m, s, x, axis):
    """Online log-sum-exp along ``axis``: running max ``m`` and sum ``s`` of exp(x - m)."""
    m_new = jnp.maximum(m, x.max(axis))
    return m_new, s * jnp.exp(m - m_new) + jnp.exp(x - jnp.expand_dims(m_new, axis)).sum(axis)


def _argmax_update(best, idx, x, offset, axis):
    """Running first-occurrence argmax: ``idx`` the global index of the max so far."""
    val, at = x.max(axis), x.argmax(axis).astype(jnp.int32) + offset
    take = (val > best) | ((val == best) & (at < idx))
    return jnp.where(take, val, best), jnp.where(take, at, idx)


def _logits(arrays, img, other):
    """As the gathered loss computes them: (scale * img) @ other.T (+ bias)."""
    s = (arrays["scale"] * img) @ other.T
    return s + arrays["bias"] if "bias" in arrays else s


def _forward(arrays, *, kind, axes, n):
    img = arrays["img"]
    b = img.shape[0]
    k = _index(axes, n)
    has_neg = "neg" in arrays
    vec = lambda v, dtype=jnp.float32: jnp.full((b,), v, dtype)  # noqa: E731
    big = jnp.iinfo(jnp.int32).max

    def step(row, chunk, j, first):
        s = _logits(arrays, img, chunk["txt"])              # [b local images, b visiting texts]
        row = dict(row)
        chunk = dict(chunk)
        row["best"], row["idx"] = _argmax_update(row["best"], row["idx"], s, j * b, 1)
        chunk["best"], chunk["idx"] = _argmax_update(chunk["best"], chunk["idx"], s, k * b, 0)
        if has_neg:
            sn = _logits(arrays, img, chunk["neg"])
        if kind == "softmax":
            cand = s
            if has_neg:
                cand = jnp.concatenate([s, jnp.where(chunk["valid"][None, :] > 0, sn, -jnp.inf)], 1)
            row["m"], row["s"] = _lse_update(row["m"], row["s"], cand, 1)
            chunk["m"], chunk["s"] = _lse_update(chunk["m"], chunk["s"], s, 0)
            if first:
                row["pos"] = jnp.diagonal(s)
        else:
            z = 2.0 * jnp.eye(b) - 1.0 if first else -1.0
            total = jnp.sum(jax.nn.log_sigmoid(z * s))
            if has_neg:
                total += jnp.sum(jax.nn.log_sigmoid(-sn) * (chunk["valid"][None, :] > 0))
            row["total"] = row["total"] + total
        return row, chunk

    row = dict(best=vec(-jnp.inf), idx=vec(big, jnp.int32))
    chunk = dict(txt=arrays["txt"], best=vec(-jnp.inf), idx=vec(big, jnp.int32))
    if has_neg:
        chunk.update(neg=arrays["neg"], valid=arrays["valid"])
    if kind == "softmax":
        row.update(m=vec(-jnp.inf), s=vec(0.0), pos=vec(0.0))
        chunk.update(m=vec(-jnp.inf), s=vec(0.0))
    else:
        row["total"] = jnp.zeros((), jnp.float32)
    row, chunk = _ring(step, row, chunk, k, axes, n)
    # The column statistics travel with their text chunk: after n - 1 shifts device k holds
    # chunk k + 1's; one more shift brings each home.
    home = {key: chunk[key] for key in ("idx", "m", "s") if key in chunk}
    if n > 1:
        home = _shift(home, axes, n)

    labels = k * b + jnp.arange(b, dtype=jnp.int32)
    batch = n * b
    i2t = _psum(jnp.sum(row["idx"] == labels).astype(jnp.float32), axes, n) / batch
    t2i = _psum(jnp.sum(home["idx"] == labels).astype(jnp.float32), axes, n) / batch
    if kind == "softmax":
        lse_r = row["m"] + jnp.log(row["s"])
        lse_c = home["m"] + jnp.log(home["s"])
        local = jnp.sum(lse_r - row["pos"]) + jnp.sum(lse_c - row["pos"])
        loss = _psum(local, axes, n) / (2 * batch)
    else:
        lse_r = lse_c = jnp.zeros((b,), jnp.float32)  # unused by the sigmoid backward
        loss = -_psum(row["total"], axes, n) / batch
    return loss, i2t, t2i, lse_r, lse_c


def _backward(arrays, lse_r, lse_c, *, kind, axes, n):
    """d(loss)/d(arrays) for a unit cotangent, by a second ring pass."""
    img = arrays["img"]
    b = img.shape[0]
    k = _index(axes, n)
    batch = n * b
    has_neg = "neg" in arrays

    def step(acc, chunk, j, first):
        del j
        acc, chunk = dict(acc), dict(chunk)
        s = _logits(arrays, img, chunk["txt"])
        eye = jnp.eye(b)
        if kind == "softmax":
            # d/dS of (sum_i lse_row_i + sum_t lse_col_t - 2 sum_i S_ii) / 2B
            g = (jnp.exp(s - lse_r[:, None]) + jnp.exp(s - chunk["lse"][None, :])) / (2 * batch)
            if first:
                g = g - eye / batch
        else:
            # d/dS of -sum log_sigmoid(z S) / B
            z = 2.0 * eye - 1.0 if first else -1.0
            g = -z * jax.nn.sigmoid(-z * s) / batch
        # S = scale * img @ txt.T: d img = scale * g @ txt, d scale = sum(g * img @ txt.T)
        d_img = g @ chunk["txt"]
        chunk["d_txt"] = chunk["d_txt"] + arrays["scale"] * (g.T @ img)
        d_bias = jnp.sum(g)
        if has_neg:
            sn = _logits(arrays, img, chunk["neg"])
            valid = chunk["valid"][None, :] > 0
            if kind == "softmax":
                gn = jnp.exp(jnp.where(valid, sn - lse_r[:, None], -jnp.inf)) / (2 * batch)
            else:
                gn = jnp.where(valid, jax.nn.sigmoid(sn), 0.0) / batch
            d_img = d_img + gn @ chunk["neg"]
            chunk["d_neg"] = chunk["d_neg"] + arrays["scale"] * (gn.T @ img)
            d_bias = d_bias + jnp.sum(gn)
        acc["img"] = acc["img"] + arrays["scale"] * d_img
        acc["scale"] = acc["scale"] + jnp.sum(img * d_img)
        acc["bias"] = acc["bias"] + d_bias
        return acc, chunk

    zero = jnp.zeros((), jnp.float32)
    acc = dict(img=jnp.zeros_like(img), scale=zero, bias=zero)
    chunk = dict(txt=arrays["txt"], d_txt=jnp.zeros_like(arrays["txt"]))
    if kind == "softmax":
        chunk["lse"] = lse_c
    if has_neg:
        chunk.update(neg=arrays["neg"], valid=arrays["valid"], d_neg=jnp.zeros_like(arrays["neg"]))
    acc, chunk = _ring(step, acc, chunk, k, axes, n)
    home = {key: chunk[key] for key in ("d_txt", "d_neg") if key in chunk}
    if n > 1:
        home = _shift(home, axes, n)
    grads = {"img": acc["img"], "txt": home["d_txt"], "scale": _psum(acc["scale"], axes, n)}
    if "bias" in arrays:
        grads["bias"] = _psum(acc["bias"], axes, n)
    if has_neg:
        grads["neg"] = home["d_neg"]
        grads["valid"] = jnp.zeros_like(arrays["valid"])
    return grads
