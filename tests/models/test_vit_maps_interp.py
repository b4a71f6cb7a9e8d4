"""ViT.attention_maps and the position-embedding interpolation choices (pure JAX)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import vit as vit_lib
from fmjax.models.vit import ViT

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)


def _images(b=2, h=16, w=16, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, 3))


@pytest.mark.parametrize("registers", [0, 2])
def test_attention_maps_rows_are_distributions(registers):
    model = ViT(**TINY, num_registers=registers)
    x = _images()
    variables = model.init(jax.random.PRNGKey(1), x)
    maps = model.apply(variables, x, method=ViT.attention_maps)
    row = jax.jit(lambda v, x: model.apply(v, x, method=ViT.attention_maps,
                                           include_prefix=True))(variables, x)
    assert maps.shape == (2, 4, 16) and maps.dtype == jnp.float32
    assert row.shape == (2, 4, 1 + registers + 16)
    assert float(maps.min()) >= 0
    np.testing.assert_allclose(np.asarray(row.sum(-1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(row[..., 1 + registers:]), np.asarray(maps), atol=1e-6)
    assert float(maps.sum(-1).max()) < 1.0  # the class token / registers take some weight


def test_attention_maps_recompute_the_last_block():
    """Explicit softmax(q k^T / sqrt(d)) from the last block's own q/k projections."""
    model = ViT(**TINY)
    x = _images()
    variables = model.init(jax.random.PRNGKey(2), x)
    params = nn.meta.unbox(variables["params"])
    # Inputs of the last block: run the embedding and block_0 via a depth-1 model.
    tokens = {}

    def grab(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and tuple(ctx.module.path) == ("encoder", "block_1"):
            tokens["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        out = model.apply(variables, x)
    blk = params["encoder"]["block_1"]
    h = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False).apply(
        {"params": blk["norm1"]}, tokens["x"])
    q = jnp.einsum("bld,dhk->blhk", h, blk["attn"]["query"]["kernel"]) + blk["attn"]["query"]["bias"]
    k = jnp.einsum("bld,dhk->blhk", h, blk["attn"]["key"]["kernel"]) + blk["attn"]["key"]["bias"]
    ref = jax.nn.softmax(jnp.einsum("bhk,blhk->bhl", q[:, 0], k) / np.sqrt(8), axis=-1)
    maps = model.apply(variables, x, method=ViT.attention_maps)
    np.testing.assert_allclose(np.asarray(maps), np.asarray(ref[..., 1:]), atol=1e-6)
    # The default forward is unaffected by the maps' machinery.
    np.testing.assert_array_equal(np.asarray(model.apply(variables, x)["tokens"]),
                                  np.asarray(out["tokens"]))


def test_attention_maps_needs_class_token():
    model = ViT(**TINY, class_token=False, pool="mean")
    x = _images()
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="class_token"):
        model.apply(variables, x, method=ViT.attention_maps)


def test_pos_interp_modes():
    pos = jax.random.normal(jax.random.PRNGKey(3), (1, 1 + 16, 8))
    same = vit_lib.resize_pos_embed(pos, (4, 4), (4, 4), 1, "torch_bicubic")
    np.testing.assert_allclose(np.asarray(same), np.asarray(pos), atol=1e-6)
    a = vit_lib.resize_pos_embed(pos, (4, 4), (6, 5), 1, "resize")
    b = vit_lib.resize_pos_embed(pos, (4, 4), (6, 5), 1, "torch_bicubic")
    c = vit_lib.resize_pos_embed(pos, (4, 4), (6, 5), 1, "torch_bicubic", 0.1)
    assert a.shape == b.shape == c.shape == (1, 1 + 30, 8)
    np.testing.assert_array_equal(np.asarray(b[:, :1]), np.asarray(pos[:, :1]))
    assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(b - c).max()) > 1e-4
    # Rows of the torch weight matrix sum to 1 (interpolation of a constant is exact).
    np.testing.assert_allclose(vit_lib.torch_bicubic_matrix(4, 7, 0.1).sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="pos_interp"):
        vit_lib.resize_pos_embed(pos, (4, 4), (6, 5), 1, "nearest")


def test_pos_interp_field_used_at_new_resolution_only():
    x16, x24 = _images(), _images(h=24, w=24)
    base = ViT(**TINY)
    variables = base.init(jax.random.PRNGKey(4), x16)
    torchy = ViT(**TINY, pos_interp="torch_bicubic", pos_interp_offset=0.1)
    np.testing.assert_array_equal(np.asarray(base.apply(variables, x16)["tokens"]),
                                  np.asarray(torchy.apply(variables, x16)["tokens"]))
    assert float(jnp.abs(base.apply(variables, x24)["tokens"]
                         - torchy.apply(variables, x24)["tokens"]).max()) > 1e-4
    with pytest.raises(ValueError, match="pos_interp"):
        ViT(**TINY, pos_interp="bilinear").init(jax.random.PRNGKey(0), x16)
