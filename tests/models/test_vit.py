"""Unit tests for fmjax.models.layers and fmjax.models.vit (tiny models, CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fmjax import testing
from fmjax.models import layers
from fmjax.models.vit import VIT_PRESETS, ViT, vit_kwargs

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8)


def _images(b=2, h=32, w=32, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, 3))


def _assert_all_partitioned(variables):
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    specs = jax.tree_util.tree_leaves(
        nn.get_partition_spec(variables), is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(specs) == len(leaves)
    for leaf, spec in zip(leaves, specs):
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert isinstance(spec, PartitionSpec) and len(spec) == leaf.value.ndim > 0


def test_presets_and_parsing():
    assert vit_kwargs("S/16") == dict(width=384, depth=12, num_heads=6, mlp_dim=1536,
                                      patch_size=16)
    widths = {k: v["width"] for k, v in VIT_PRESETS.items()}
    assert widths == dict(Ti=192, S=384, B=768, L=1024, H=1280, g=1408)
    assert [VIT_PRESETS[k]["depth"] for k in "Ti S B L H g".split()] == [12, 12, 12, 24, 32, 40]
    assert vit_kwargs("g/14")["mlp_dim"] == 6144 and vit_kwargs("H/14")["num_heads"] == 16
    assert vit_kwargs("Ti/4", width=32, depth=1)["width"] == 32


@pytest.mark.parametrize("bad", ["X/16", "B", "B/", "B/x", "b/16"])
def test_unknown_variant_lists_valid(bad):
    with pytest.raises(ValueError, match=r"valid: Ti/<patch>, S/<patch>.*g/<patch>"):
        vit_kwargs(bad)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(pool="mean", num_registers=2, num_classes=7),
    dict(pos_embed="sincos", class_token=False, pool="mean", layerscale=1e-4),
])
def test_shapes_and_partitioning(kw):
    model = ViT(**TINY, **kw)
    x = _images()
    variables = model.init(jax.random.PRNGKey(0), x)
    _assert_all_partitioned(variables)
    out = model.apply(variables, x)
    prefix = int(model.class_token) + model.num_registers
    assert out["tokens"].shape == (2, prefix + 16, 32)
    assert out["patch_tokens"].shape == (2, 16, 32)
    assert out["pre_logits"].shape == (2, 32)
    assert ("logits" in out) == (model.num_classes > 0)
    if model.num_classes:
        assert out["logits"].shape == (2, model.num_classes)
    if kw.get("pool") == "mean":
        np.testing.assert_allclose(out["pre_logits"], out["patch_tokens"].mean(1), atol=1e-6)
    # Plain (unboxed) trees work for init output and apply alike.
    plain = nn.meta.unbox(variables)
    np.testing.assert_allclose(model.apply(plain, x)["tokens"], out["tokens"], atol=1e-6)


def test_param_tree_names():
    params = nn.meta.unbox(ViT(**TINY, num_classes=3).init(jax.random.PRNGKey(0), _images()))
    p = params["params"]
    assert set(p) == {"patch_embed", "cls_token", "pos_embed", "encoder", "head"}
    attn = p["encoder"]["block_0"]["attn"]
    assert attn["query"]["kernel"].shape == (32, 4, 8) and attn["query"]["bias"].shape == (4, 8)
    assert attn["out"]["kernel"].shape == (4, 8, 32)
    assert p["patch_embed"]["proj"]["kernel"].shape == (8 * 8 * 3, 32)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="class_token"):
        ViT(**TINY, class_token=False).init(jax.random.PRNGKey(0), _images())
    with pytest.raises(ValueError, match="attention_impl"):
        ViT(**TINY, attention_impl="flash").init(jax.random.PRNGKey(0), _images())


def test_conv_stem():
    """stem='conv': the same token layout as the patch stem, every param partitioned, and
    overlapping receptive fields (a pixel on a patch border moves the neighbouring token
    too; with the linear patch stem it moves only its own)."""
    model = ViT(**TINY, stem="conv", pool="mean")
    variables = model.init(jax.random.PRNGKey(0), _images())
    _assert_all_partitioned(variables)
    stem = variables["params"]["patch_embed"]
    assert sorted(stem) == ["conv_0", "conv_1", "conv_2", "norm_0", "norm_1", "norm_2", "proj"]
    assert [stem[f"conv_{i}"]["kernel"].value.shape[-1] for i in range(3)] == [8, 8, 16]
    x = _images()
    base = model.apply(variables, x)
    assert base["tokens"].shape == (2, 1 + 16, 32)
    x2 = x.at[:, 3, 8].add(5.0)  # row 3, first column of patch (0, 1)
    moved = model.apply(variables, x2)
    # Through attention every token moves; the stem alone:
    assert (jnp.abs(moved["patch_tokens"] - base["patch_tokens"]).max(axis=(0, 2)) > 1e-5).all()
    # (3, 8) is in patch (0, 1); the 3x3 stride-2 convs reach down into patch (1, 1) too.
    for stem, expect in ((layers.ConvStem(32, 8), {1, 5}), (layers.PatchEmbed(32, 8), {1})):
        v = {"params": variables["params"]["patch_embed"]} if isinstance(stem, layers.ConvStem) \
            else stem.init(jax.random.PRNGKey(0), x)
        d = jnp.abs(stem.apply(v, x2) - stem.apply(v, x)).max(axis=(0, 2))
        assert set(np.flatnonzero(np.asarray(d) > 1e-5).tolist()) == expect
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ViT(**dict(TINY, patch_size=6), stem="conv").init(jax.random.PRNGKey(0), _images(h=36, w=36))
    with pytest.raises(ValueError, match="Unknown stem"):
        ViT(**TINY, stem="hybrid").init(jax.random.PRNGKey(0), x)


def test_attention_impls_agree_and_remat():
    x = _images()
    ref_model = ViT(**TINY)
    variables = ref_model.init(jax.random.PRNGKey(0), x)
    ref = ref_model.apply(variables, x)["tokens"]
    dp = ViT(**TINY, attention_impl="dot_product").apply(variables, x)["tokens"]
    np.testing.assert_allclose(dp, ref, atol=1e-5)

    def loss(params, model):
        return model.apply(params, x, train=True)["tokens"].sum()

    rm = ViT(**TINY, remat=True)
    np.testing.assert_allclose(rm.apply(variables, x)["tokens"], ref, atol=1e-6)
    g1 = jax.grad(loss)(nn.meta.unbox(variables), ref_model)
    g2 = jax.grad(loss)(nn.meta.unbox(variables), rm)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_attention_mask_and_cross_attention():
    mha = layers.MultiHeadAttention(num_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    kv = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 16))
    variables = mha.init(jax.random.PRNGKey(2), x, kv)
    mask = jnp.arange(7)[None, None, None, :] < 4
    full = mha.apply(variables, x, kv[:, :4])
    masked = mha.apply(variables, x, kv, mask=mask)
    np.testing.assert_allclose(masked, full, atol=1e-5)
    dp = layers.MultiHeadAttention(num_heads=2, attention_impl="dot_product")
    np.testing.assert_allclose(dp.apply(variables, x, kv, mask=mask), full, atol=1e-5)


def test_drop_path_and_dropout_need_rng_only_in_train():
    model = ViT(**TINY, drop_path=0.5, dropout=0.1)
    x = _images()
    variables = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(variables, x)["tokens"]
    b = model.apply(variables, x)["tokens"]
    np.testing.assert_array_equal(a, b)
    c = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})["tokens"]
    assert not np.allclose(a, c)
    dp = layers.DropPath(0.5)
    y = dp.apply({}, jnp.ones((64, 3)), deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    kept = np.asarray(y[:, 0])
    assert set(np.unique(kept)) <= {0.0, 2.0} and 0 < (kept > 0).sum() < 64


def test_activations():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(layers.get_activation("gelu")(x),
                               jax.nn.gelu(x, approximate=False), atol=1e-7)
    np.testing.assert_allclose(layers.get_activation("quick_gelu")(x),
                               x * jax.nn.sigmoid(1.702 * x), atol=1e-7)
    with pytest.raises(ValueError, match="quick_gelu"):
        layers.get_activation("swish2")


def test_learned_pos_embed_resizes_to_new_resolution():
    model = ViT(**TINY, num_registers=1)
    variables = model.init(jax.random.PRNGKey(0), _images())
    out = model.apply(variables, _images(h=48, w=64))
    assert out["tokens"].shape == (2, 2 + 6 * 8, 32)


def test_sincos_values():
    pos = layers.get_2d_sincos_pos_embed(16, (2, 3), cls_token=True)
    assert pos.shape == (7, 16) and pos.dtype == np.float32
    np.testing.assert_array_equal(pos[0], 0)
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    row, col = 1, 2  # patch index 1 * 3 + 2 = 5, +1 for the cls row
    expect = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                             np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(pos[1 + 5], expect, atol=1e-6)


def test_bf16_compute_keeps_f32_params():
    model = ViT(**TINY, num_classes=3, dtype=jnp.bfloat16)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), _images()))
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, _images())
    assert out["tokens"].dtype == jnp.bfloat16 and out["logits"].shape == (2, 3)


def test_sharded_jit_with_logical_rules():
    model = ViT(**TINY, num_classes=4)
    x = _images(b=8)
    variables, out = testing.init_and_apply_on_mesh(model.init, model.apply, x)
    fc1 = variables["params"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"].value
    assert fc1.sharding.spec == PartitionSpec(None, "model")
    ref = model.apply(nn.meta.unbox(jax.device_get(variables)), x)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5)


def test_fc_norm_tokens_is_ft_clips_pooling():
    """fc_norm='tokens': LayerNorm on each patch token, then the mean (FT-CLIP's
    models/finetune_clip.py: ``self.head(self.fc_norm(x[:, 1:, :]).mean(1))``); fc_norm=True
    normalises the mean instead. Neither has the encoder's final norm."""
    images = _images()
    m_tok = ViT(**TINY, pool="mean", fc_norm="tokens", num_classes=3)
    variables = m_tok.init(jax.random.PRNGKey(0), images)
    p = variables["params"]
    assert "norm" not in p["encoder"] and set(p["fc_norm"]) == {"scale", "bias"}
    p = jax.tree_util.tree_map(lambda x: x, nn.unbox(p))
    rng = np.random.default_rng(0)
    p["fc_norm"] = {"scale": jnp.asarray(rng.normal(1, 0.3, 32), jnp.float32),
                    "bias": jnp.asarray(rng.normal(0, 0.3, 32), jnp.float32)}
    p["head"]["kernel"] = jnp.asarray(rng.normal(0, 0.1, (32, 3)), jnp.float32)
    out = m_tok.apply({"params": p}, images)
    t = np.asarray(out["patch_tokens"], np.float64)
    ln = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    ln = ln * np.asarray(p["fc_norm"]["scale"]) + np.asarray(p["fc_norm"]["bias"])
    np.testing.assert_allclose(out["pre_logits"], ln.mean(1), rtol=1e-4, atol=1e-5)
    # fc_norm=True (after the mean) differs for the same params.
    out_after = ViT(**TINY, pool="mean", fc_norm=True, num_classes=3).apply({"params": p}, images)
    assert np.abs(np.asarray(out_after["pre_logits"]) - ln.mean(1)).max() > 1e-2
    with pytest.raises(ValueError, match="Unknown fc_norm 'token'"):
        ViT(**TINY, fc_norm="token").init(jax.random.PRNGKey(0), images)
