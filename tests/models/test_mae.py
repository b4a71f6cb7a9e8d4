"""Unit tests for fmjax.models.mae (tiny models, CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fmjax.models import layers
from fmjax.models.mae import MAE, mae_loss, patchify, random_masking, unpatchify
from fmjax.models.vit import ViT

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8,
            decoder_width=16, decoder_depth=1, decoder_heads=2)


def _images(b=2, h=32, w=32, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, 3))


@pytest.fixture(scope="module")
def tiny():
    model = MAE(**TINY)
    variables = model.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                           _images())
    return model, variables


def test_outputs_and_partitioning(tiny):
    model, variables = tiny
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(variables),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(leaves) == len(specs) > 20
    for leaf, spec in zip(leaves, specs):
        assert isinstance(leaf, nn.Partitioned) and len(spec) == leaf.value.ndim > 0
    out = model.apply(variables, _images(), rngs={"mask": jax.random.PRNGKey(2)})
    assert out["pred"].shape == (2, 16, 8 * 8 * 3)
    assert out["mask"].shape == (2, 16) and out["ids_restore"].shape == (2, 16)
    assert out["latent"].shape == (2, 1 + 4, 32)
    assert out["loss"].shape == () and np.isfinite(out["loss"])
    plain = nn.meta.unbox(variables)
    out2 = model.apply(plain, _images(), rngs={"mask": jax.random.PRNGKey(2)})
    np.testing.assert_allclose(out2["loss"], out["loss"], rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_mask_ratio_keeps_right_number(ratio):
    x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    noise = jax.random.uniform(jax.random.PRNGKey(0), (2, 16))
    kept, mask, ids_restore = random_masking(x, noise, ratio)
    keep = int(16 * (1 - ratio))
    assert kept.shape == (2, keep, 3)
    np.testing.assert_array_equal(mask.sum(1), 16 - keep)
    np.testing.assert_array_equal(mask, (ids_restore >= keep).astype(np.float32))
    # Kept tokens are the lowest-noise ones, in ascending-noise order.
    order = np.argsort(np.asarray(noise), axis=1)[:, :keep]
    np.testing.assert_array_equal(kept[..., 0], np.take_along_axis(np.asarray(x[..., 0]), order, 1))


def test_model_mask_ratio_latent_length():
    model = MAE(**dict(TINY, mask_ratio=0.5))
    noise = jax.random.uniform(jax.random.PRNGKey(3), (2, 16))
    out, _ = model.init_with_output(jax.random.PRNGKey(0), _images(), noise=noise)
    assert out["latent"].shape == (2, 1 + 8, 32)
    assert float(out["mask"].sum()) == 16.0


def test_noise_comes_from_mask_rng(tiny):
    model, variables = tiny
    run = lambda seed: model.apply(variables, _images(), rngs={"mask": jax.random.PRNGKey(seed)})
    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["ids_restore"], c["ids_restore"])
    noise = jax.random.uniform(jax.random.PRNGKey(9), (2, 16))
    d = model.apply(variables, _images(), noise=noise)  # no rng needed with explicit noise
    np.testing.assert_array_equal(d["ids_restore"], jnp.argsort(jnp.argsort(noise, 1), 1))


def test_encode_matches_vit_with_sincos(tiny):
    model, variables = tiny
    feats = model.apply(variables, _images(), method=MAE.encode)
    assert feats["cls"].shape == (2, 32) and feats["mean"].shape == (2, 32)
    assert feats["tokens"].shape == (2, 17, 32)
    np.testing.assert_allclose(feats["mean"], feats["tokens"][:, 1:].mean(1), atol=1e-6)
    # The MAE encoder params load straight into a sin-cos ViT for fine-tuning.
    p = nn.meta.unbox(variables)["params"]
    vit_params = {k: p[k] for k in ("patch_embed", "cls_token", "encoder")}
    vit = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, pos_embed="sincos")
    out = vit.apply({"params": vit_params}, _images())
    np.testing.assert_allclose(out["tokens"], feats["tokens"], atol=1e-5)
    np.testing.assert_allclose(out["pre_logits"], feats["cls"], atol=1e-5)


def test_encode_gap_pools_before_the_final_norm(tiny):
    """'gap' is the reference's global_pool representation: the mean patch token of the last
    block, before the encoder's final LayerNorm (which 'mean' and 'tokens' come after)."""
    model, variables = tiny
    feats, inter = model.apply(variables, _images(), method=MAE.encode, capture_intermediates=True)
    last = inter["intermediates"]["encoder"]["block_1"]["__call__"][0]
    np.testing.assert_allclose(feats["gap"], last[:, 1:].mean(1), atol=1e-6)
    norm = nn.meta.unbox(variables)["params"]["encoder"]["norm"]
    mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
    np.testing.assert_allclose(feats["tokens"], (last - mu) / np.sqrt(var + 1e-6) * norm["scale"]
                               + norm["bias"], atol=1e-5)
    assert np.abs(np.asarray(feats["gap"] - feats["mean"])).max() > 1e-2


def test_loss_definition():
    images = _images(b=2)
    target = patchify(images, 8)
    mask = jnp.array([[1.0] * 4 + [0.0] * 12, [0.0] * 8 + [1.0] * 8])
    assert float(mae_loss(images, target, mask, 8, norm_pix_loss=False)) == 0.0
    pred = jnp.zeros_like(target)
    t = np.asarray(target)
    normed = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = (normed ** 2).mean(-1)
    expect = (per_patch * np.asarray(mask)).sum() / np.asarray(mask).sum()
    np.testing.assert_allclose(mae_loss(images, pred, mask, 8, True), expect, rtol=1e-5)


def test_patchify_roundtrip_non_square():
    images = _images(h=16, w=24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    # Per patch: p rows, p cols, channels last.
    np.testing.assert_array_equal(patches[0, 1].reshape(8, 8, 3), images[0, :8, 8:16])
    np.testing.assert_array_equal(unpatchify(patches, 8, grid=(2, 3)), images)
    with pytest.raises(ValueError, match="divisible"):
        patchify(_images(h=30), 8)


def test_decoder_uses_fixed_sincos_and_grads_finite(tiny):
    model, variables = tiny
    params = nn.meta.unbox(variables)["params"]
    assert "pos_embed" not in params and "decoder_pos_embed" not in params
    noise = jax.random.uniform(jax.random.PRNGKey(4), (2, 16))
    grad_fn = jax.jit(jax.grad(
        lambda p: model.apply({"params": p}, _images(), train=True, noise=noise)["loss"]))
    grads = grad_fn(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["mask_token"]).sum()) > 0


def test_sincos_reference_layout():
    pos = layers.get_2d_sincos_pos_embed(8, 2, cls_token=False)
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    # Patch (row 1, col 0) is index 2: column terms first, then row terms.
    expect = np.concatenate([np.sin(0 * omega), np.cos(0 * omega),
                             np.sin(1 * omega), np.cos(1 * omega)])
    np.testing.assert_allclose(pos[2], expect, atol=1e-7)


def test_bad_channels_error():
    with pytest.raises(ValueError, match="images"):
        MAE(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                         noise=jnp.zeros((1, 16)))
