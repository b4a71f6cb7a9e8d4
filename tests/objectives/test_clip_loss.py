"""CLIP's loss over a sharded batch equals the single-device global-batch loss (and gradients).

The objective computes the loss on global arrays inside jit; XLA gathers the shards, so
every example sees every negative. We check it against (a) the 1-device value, (b) an
explicit open_clip-style shard_map implementation (all_gather features, local loss rows),
and show that (c) a non-gathering per-device loss gives a different value and gradients.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.objectives.clip import sigmoid_loss, softmax_clip_loss

try:
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map

B, D = 32, 16


def _data():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, D)).astype(np.float32)
    x_img = rng.normal(size=(B, 24)).astype(np.float32)
    x_txt = rng.normal(size=(B, 24)).astype(np.float32)
    return w, x_img, x_txt


def _embed(w, x):
    e = x @ w
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _global_loss(w, x_img, x_txt, kind="softmax"):
    img, txt = _embed(w, x_img), _embed(w * 0.5 + 0.1, x_txt)
    neg = {}
    if kind.endswith("_neg"):  # hard negatives: perturbed captions, every 4th one missing
        neg = dict(neg_embeds=_embed(w * 0.5 + 0.1, x_txt[::-1] * 0.7 + 0.2),
                   neg_valid=(jnp.arange(x_txt.shape[0]) % 4 != 3).astype(jnp.int32))
    if kind.startswith("softmax"):
        return softmax_clip_loss(img, txt, 10.0, **neg)[0]
    return sigmoid_loss(img, txt, 10.0, -10.0, **neg)[0]


def _mesh():
    return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _local_rows_loss(w, x_img, x_txt, gather: bool):
    """Per-device: all_gather the other side's features (with grad) when ``gather``;
    loss rows for the local examples only, averaged over devices (open_clip local_loss)."""
    img, txt = _embed(w, x_img), _embed(w * 0.5 + 0.1, x_txt)
    axes = ("data", "fsdp")
    if gather:
        all_img = jax.lax.all_gather(img, axes, tiled=True)
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        offset = jax.lax.axis_index(axes) * img.shape[0]
    else:
        all_img, all_txt, offset = img, txt, 0
    labels = offset + jnp.arange(img.shape[0])
    li = -jax.nn.log_softmax(10.0 * img @ all_txt.T)[jnp.arange(img.shape[0]), labels]
    lt = -jax.nn.log_softmax(10.0 * txt @ all_img.T)[jnp.arange(img.shape[0]), labels]
    return jax.lax.pmean((li.mean() + lt.mean()) / 2, axes)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "softmax_neg", "sigmoid_neg"])
def test_sharded_loss_and_grads_equal_single_device(kind):
    w, x_img, x_txt = _data()
    fn = jax.jit(jax.value_and_grad(functools.partial(_global_loss, kind=kind)))
    loss1, grad1 = jax.device_put(fn(w, x_img, x_txt), jax.devices()[0])
    mesh = _mesh()
    shard = NamedSharding(mesh, P(("data", "fsdp")))
    xi, xt = jax.device_put(x_img, shard), jax.device_put(x_txt, shard)
    wr = jax.device_put(w, NamedSharding(mesh, P()))
    loss8, grad8 = fn(wr, xi, xt)
    assert len(xi.sharding.device_set) == 8
    # float32 sums of B^2 terms in another order: 1.5e-6 apart for the sigmoid losses when XLA's
    # optimizations are off (tests/conftest.py), within 1e-6 with them; the suite's 1e-5
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad8), np.asarray(grad1), rtol=1e-5, atol=1e-7)


def test_explicit_gather_matches_and_non_gathering_differs():
    w, x_img, x_txt = _data()
    loss1, grad1 = jax.jit(jax.value_and_grad(_global_loss))(w, x_img, x_txt)
    mesh = _mesh()
    results = {}
    for gather in (True, False):
        f = shard_map(functools.partial(_local_rows_loss, gather=gather), mesh=mesh,
                      in_specs=(P(), P(("data", "fsdp")), P(("data", "fsdp"))), out_specs=P())
        results[gather] = jax.jit(jax.value_and_grad(f))(w, x_img, x_txt)
    loss_g, grad_g = results[True]
    np.testing.assert_allclose(float(loss_g), float(loss1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_g), np.asarray(grad1), rtol=1e-5, atol=1e-7)
    loss_l, grad_l = results[False]  # each device only sees its 4 local negatives
    assert abs(float(loss_l) - float(loss1)) > 1e-2
    assert np.abs(np.asarray(grad_l) - np.asarray(grad1)).max() > 1e-3


def test_softmax_loss_matches_numpy_reference():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(6, 5)); img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(6, 5)); txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    logits = 7.0 * img @ txt.T

    def ce(l):
        l = l - l.max(1, keepdims=True)
        return -(np.diag(l) - np.log(np.exp(l).sum(1))).mean()

    ref = (ce(logits) + ce(logits.T)) / 2
    got = softmax_clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 7.0)[0]
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    z = 2 * np.eye(6) - 1
    ref_sig = -np.sum(np.log(1 / (1 + np.exp(-z * (logits - 2.0))))) / 6
    got_sig = sigmoid_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 7.0, -2.0)[0]
    np.testing.assert_allclose(float(got_sig), ref_sig, rtol=1e-5)


def test_hard_negative_losses_match_numpy_reference():
    """NegCLIP: each image also scores against its swapped caption (image->text only);
    invalid negatives drop out; with none valid the plain loss comes back."""
    rng = np.random.default_rng(4)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    img, txt, neg = (unit(rng.normal(size=(6, 5))) for _ in range(3))
    valid = np.array([1, 1, 0, 1, 0, 1])
    logits, neg_logits = 7.0 * img @ txt.T, 7.0 * img @ neg.T

    def ce(l, labels):
        l = l - l.max(1, keepdims=True)
        return -(l[np.arange(len(l)), labels] - np.log(np.exp(l).sum(1))).mean()

    i2t = np.concatenate([logits, neg_logits[:, valid == 1]], axis=1)
    ref = (ce(i2t, np.arange(6)) + ce(logits.T, np.arange(6))) / 2
    f = lambda *a: jnp.asarray(np.stack(a) if len(a) > 1 else a[0], jnp.float32)
    kw = dict(neg_embeds=f(neg), neg_valid=jnp.asarray(valid))
    got = softmax_clip_loss(f(img), f(txt), 7.0, **kw)[0]
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    z = 2 * np.eye(6) - 1
    log_sig = lambda x: -np.log1p(np.exp(-x))
    ref_sig = -(log_sig(z * (logits - 2.0)).sum() + log_sig(-(neg_logits - 2.0))[:, valid == 1].sum()) / 6
    got_sig = sigmoid_loss(f(img), f(txt), 7.0, -2.0, **kw)[0]
    np.testing.assert_allclose(float(got_sig), ref_sig, rtol=1e-5)
    none = dict(neg_embeds=f(neg), neg_valid=jnp.zeros(6, jnp.int32))
    np.testing.assert_allclose(float(softmax_clip_loss(f(img), f(txt), 7.0, **none)[0]),
                               float(softmax_clip_loss(f(img), f(txt), 7.0)[0]), rtol=1e-6)
    grads = jax.grad(lambda n: softmax_clip_loss(f(img), f(txt), 7.0, n, jnp.asarray(valid))[0])(f(neg))
    assert np.isfinite(np.asarray(grads)).all()           # masked columns give no NaN
    assert np.abs(np.asarray(grads)[valid == 0]).max() == 0  # and no gradient
    assert np.abs(np.asarray(grads)[valid == 1]).min() > 0
