"""The injection points (fmjax.models.inject): a LoRA dense hook and a Swin-style relative
position bias injected into an unmodified ViT, the attention bias against a hand-written
reference, and the default path unchanged (bit-identical / the pre-split numbers)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fmjax import testing
from fmjax.models import core, inject, layers
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.vit import ViT

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8)
HI = jax.lax.Precision.HIGHEST


def _images(b=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, 32, 32, 3))


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- the two example hooks a researcher would write --------------------------------------

def lora(rank=2, alpha=4.0, targets=("query", "value", "fc1")):
    """LoRA: y = x.stop_gradient(W) + b + (alpha / rank) * (x.A).B, with A (in dims, rank)
    random, B (rank, out dims) zero, so the model is unchanged at init."""
    def hook(dense, x, call_next):
        if dense.name not in targets:
            return call_next(x)
        in_shape, out_shape = dense.in_shape(x), tuple(dense.features)
        kernel = dense.kernel_param(in_shape)  # created first: base params keep their init
        y = dense.project(x, kernel=jax.lax.stop_gradient(kernel))  # frozen base kernel
        a = dense.param("lora_a", core.part(nn.initializers.normal(rank ** -0.5),
                                            dense.kernel_axes[:dense.contract] + (None,)),
                        in_shape + (rank,), dense.param_dtype)
        b = dense.param("lora_b", core.part(nn.initializers.zeros,
                                            (None,) + dense.kernel_axes[dense.contract:]),
                        (rank,) + out_shape, dense.param_dtype)
        low = jnp.tensordot(dense.contract_with(x, a), b.astype(dense.dtype), axes=1)
        return y + (alpha / rank) * low
    return hook


def relative_position_bias(grid):
    """Swin's learned relative position bias over an (h, w) token grid: a table
    ((2h-1)(2w-1), heads) indexed by the (dy, dx) of each query/key pair."""
    h, w = grid
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)  # (N, N)

    def fn(attn, q, k):
        if q.shape[1] != h * w or k.shape[1] != h * w:
            return None
        table = attn.param("relative_position_bias_table",
                           core.part(nn.initializers.normal(0.02), (None, "heads")),
                           ((2 * h - 1) * (2 * w - 1), attn.num_heads), attn.param_dtype)
        return table[index].transpose(2, 0, 1)  # (heads, N, N)
    return inject.additive_bias(fn)


# --- (a) LoRA into an unmodified ViT -------------------------------------------------------

@pytest.fixture(scope="module")
def lora_vit():
    model = ViT(**TINY, num_classes=3)
    x = _images()
    plain = model.init(jax.random.PRNGKey(0), x)
    with inject.hooks(dense=lora()):
        boxed = model.init(jax.random.PRNGKey(0), x)
    return model, x, plain, boxed


def test_lora_adds_params_and_keeps_the_base(lora_vit):
    model, x, plain, boxed = lora_vit
    flat_plain, flat_lora = _flat(nn.meta.unbox(plain)), _flat(nn.meta.unbox(boxed))
    added = sorted(set(flat_lora) - set(flat_plain))
    want = sorted(f"params/encoder/block_{i}/{m}/lora_{ab}" for i in range(2)
                  for m in ("attn/query", "attn/value", "mlp/fc1") for ab in "ab")
    assert added == want
    for k, v in flat_plain.items():  # every base param: same init, bit for bit
        np.testing.assert_array_equal(flat_lora[k], v, err_msg=k)
    q = boxed["params"]["encoder"]["block_0"]["attn"]["query"]
    assert q["lora_a"].names == ("embed", None) and q["lora_a"].value.shape == (32, 2)
    assert q["lora_b"].names == (None, "heads", "kv") and q["lora_b"].value.shape == (2, 4, 8)
    assert not np.any(q["lora_b"].value) and np.any(q["lora_a"].value)
    fc1 = boxed["params"]["encoder"]["block_1"]["mlp"]["fc1"]
    assert fc1["lora_b"].names == (None, "mlp")


def test_lora_output_at_init_equals_the_plain_vit_then_moves_with_b(lora_vit):
    model, x, plain, boxed = lora_vit
    leaves, tdef = jax.tree_util.tree_flatten(nn.meta.unbox(plain)["params"])
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    params = tdef.unflatten([v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
    lora_params = jax.tree_util.tree_map_with_path(  # trained base params, fresh adapters
        lambda p, v: v if "lora" in jax.tree_util.keystr(p) else _flat(params)[
            "/".join(str(k.key) for k in p)], nn.meta.unbox(boxed)["params"])
    ref = model.apply({"params": params}, x)["logits"]
    with inject.hooks(dense=lora()):
        out = model.apply({"params": lora_params}, x)["logits"]
    np.testing.assert_array_equal(out, ref)  # B = 0: exactly the plain ViT
    apply = jax.jit(inject.hooks(dense=lora())(lambda p, x: model.apply({"params": p}, x)))
    np.testing.assert_allclose(apply(lora_params, x)["logits"], ref, atol=1e-6)

    # perturb B (and A): the output moves and equals the plain ViT with merged kernels
    # W + (alpha / rank) * A.B
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    moved = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(next(keys), v.shape)
        if "lora" in jax.tree_util.keystr(p) else v, lora_params)
    out = apply(moved, x)["logits"]
    assert not np.allclose(out, ref, atol=1e-4)

    def merge(tree):
        if isinstance(tree, dict) and "lora_a" in tree:
            tree = dict(tree)
            a, b = tree.pop("lora_a"), tree.pop("lora_b")
            tree["kernel"] = tree["kernel"] + 2.0 * jnp.tensordot(a, b, axes=1, precision=HI)
            return tree
        return {k: merge(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
    merged = model.apply({"params": merge(moved)}, x)["logits"]
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)


def test_lora_freezes_the_base_kernel_and_trains_the_adapter(lora_vit):
    model, x, _, boxed = lora_vit
    params = nn.meta.unbox(boxed)["params"]

    @jax.jit
    @inject.hooks(dense=lora())
    def loss(p):
        return jnp.sum(model.apply({"params": p}, x)["pre_logits"] ** 2)

    g = _flat(jax.grad(loss)(params))
    for m in ("attn/query", "attn/value", "mlp/fc1"):
        assert not np.any(g[f"encoder/block_0/{m}/kernel"]), m  # frozen
        assert np.any(g[f"encoder/block_0/{m}/lora_b"]), m      # trained
        assert not np.any(g[f"encoder/block_0/{m}/lora_a"]), m  # zero while B = 0
    assert np.any(g["encoder/block_0/attn/key/kernel"])           # not targeted


def test_lora_and_bias_hooks_shard_under_a_mesh():
    model = ViT(**TINY, class_token=False, pool="mean", num_classes=4)
    x = _images(b=8)
    hooked = inject.hooks(dense=lora(), attention=relative_position_bias((4, 4)))
    variables, out = testing.init_and_apply_on_mesh(hooked(model.init), hooked(model.apply), x)
    blk = variables["params"]["encoder"]["block_0"]
    assert blk["mlp"]["fc1"]["lora_b"].value.sharding.spec == PartitionSpec(None, "model")
    assert blk["attn"]["relative_position_bias_table"].value.sharding.spec == \
        PartitionSpec(None, "model")
    with hooked:
        ref = model.apply(nn.meta.unbox(jax.device_get(variables)), x)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5)


# --- (b) additive attention bias -----------------------------------------------------------

def _reference_attention(params, x, bias):
    """softmax(q k^T * scale + bias) v, then the out projection, written out by hand."""
    p = nn.meta.unbox(params)
    q, k, v = (jnp.einsum("bld,dhk->blhk", x, p[n]["kernel"], precision=HI) + p[n]["bias"]
               for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HI) * q.shape[-1] ** -0.5 + bias
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v, precision=HI)
    return jnp.einsum("bqhd,hdo->bqo", o, p["out"]["kernel"], precision=HI) + p["out"]["bias"]


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
@pytest.mark.parametrize("bias_shape", [(4, 5, 5), (2, 4, 5, 5), (5,)])
def test_attention_bias_matches_reference(impl, bias_shape):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    bias = 2.0 * jax.random.normal(jax.random.PRNGKey(2), bias_shape)
    mha = MultiHeadAttention(4, attention_impl=impl)
    params = mha.init(jax.random.PRNGKey(0), x)["params"]
    out = mha.apply({"params": params}, x, bias=bias)
    np.testing.assert_allclose(out, _reference_attention(params, x, bias), atol=2e-5)
    assert not np.allclose(out, mha.apply({"params": params}, x), atol=1e-3)
    # the same bias through the attention hook: the same numbers
    with inject.hooks(attention=inject.additive_bias(lambda attn, q, k: bias)):
        hooked = mha.apply({"params": params}, x)
    np.testing.assert_array_equal(hooked, out)


def test_attention_bias_refused_by_cudnn():
    x = jnp.ones((1, 4, 16))
    mha = MultiHeadAttention(4, attention_impl="cudnn")
    params = MultiHeadAttention(4).init(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(ValueError, match="attention bias needs attention_impl 'xla' or"):
        mha.apply({"params": params}, x, bias=jnp.zeros((4, 4, 4)))


def test_relative_position_bias_in_an_unmodified_vit():
    model = ViT(**TINY, class_token=False, pool="mean")
    x = _images()
    plain = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x))
    with inject.hooks(attention=relative_position_bias((4, 4))):
        boxed = model.init(jax.random.PRNGKey(0), x)
        params = nn.meta.unbox(boxed)["params"]
        out = model.apply({"params": params}, x)["tokens"]
    table = boxed["params"]["encoder"]["block_1"]["attn"]["relative_position_bias_table"]
    assert table.names == (None, "heads") and table.value.shape == (49, 4)
    assert sorted(set(_flat(params)) - set(_flat(plain["params"]))) == [
        f"encoder/block_{i}/attn/relative_position_bias_table" for i in range(2)]
    ref = model.apply(plain, x)["tokens"]
    assert not np.allclose(out, ref, atol=1e-4)
    # a zero table is no bias at all
    zero = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "relative" in jax.tree_util.keystr(p) else v, params)
    with inject.hooks(attention=relative_position_bias((4, 4))):
        np.testing.assert_allclose(model.apply({"params": zero}, x)["tokens"], ref, atol=1e-6)


def test_attention_maps_see_an_injected_bias():
    model = ViT(**TINY)
    x = _images()
    variables = model.init(jax.random.PRNGKey(0), x)
    bias = jnp.zeros((17,)).at[1].set(30.0)  # every query prefers the first patch
    with inject.hooks(attention=inject.additive_bias(lambda attn, q, k: bias)):
        maps = model.apply(variables, x, method=ViT.attention_maps)
    assert maps.shape == (2, 4, 16) and np.all(maps[..., 0] > 0.99)


# --- (c) the default path is unchanged ------------------------------------------------------

def test_hooks_compose_outermost_first_and_a_noop_hook_changes_nothing():
    model = ViT(**TINY, num_classes=3, remat=True)
    x = _images()
    variables = model.init(jax.random.PRNGKey(0), x)
    ref = model.apply(variables, x)
    seen = []

    def tag(label):
        def hook(module, inputs, call_next):
            seen.append((label, module.name))
            return call_next(inputs)
        return hook
    with inject.hooks(dense=tag("outer"), attention=tag("outer")):
        with inject.hooks(dense=tag("inner")):
            out = model.apply(variables, x)
        assert len(inject.active().dense) == 1
    assert inject.active().dense == () and inject.active().attention == ()
    reused = inject.hooks(dense=tag("again"))
    with reused, reused:  # reusable and re-entrant
        assert len(inject.active().dense) == 2
    assert inject.active().dense == ()
    with pytest.raises(TypeError, match="dense hook must be callable"):
        inject.hooks(dense="lora")
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, ref)
    names = [n for _, n in seen]
    assert seen[:2] == [("outer", "proj"), ("inner", "proj")]  # patch embedding first
    assert names.count("attn") == 2 and names.count("query") == 4 and names.count("fc2") == 4


def test_dense_is_nn_dense_bit_for_bit():
    """Mlp fc1/fc2 and PatchEmbed proj were nn.Dense before the split; core.dense keeps their
    params (names, logical axes, init) and outputs exactly."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 12))
    old = nn.Dense(24, name="fc1", kernel_init=core.part(core.xavier_uniform, ("embed", "mlp")),
                   bias_init=core.part(core.zeros, ("mlp",)))
    new = core.dense(24, ("embed", "mlp"), jnp.float32, jnp.float32, "fc1")
    vo, vn = old.init(jax.random.PRNGKey(4), x), new.init(jax.random.PRNGKey(4), x)
    assert jax.tree_util.tree_structure(vo) == jax.tree_util.tree_structure(vn)
    boxed = lambda v: isinstance(v, nn.Partitioned)
    for a, b in zip(jax.tree_util.tree_leaves(vo, is_leaf=boxed),
                    jax.tree_util.tree_leaves(vn, is_leaf=boxed)):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(
            old.clone(dtype=dtype).apply(vo, x), new.clone(dtype=dtype).apply(vo, x))


def test_default_path_matches_the_pre_split_numbers():
    """Numbers printed before the split (fmjax/models/layers.py as last changed by 8b8f273)."""
    model = ViT(**TINY, num_classes=5, layerscale=0.1)
    x = _images()
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x))
    flat = _flat(variables["params"])
    expect = {  # path: (sum, first two values)
        "patch_embed/proj/kernel":
            (-2.2146101337821165, [0.010904055088758469, 0.12908583879470825]),
        "encoder/block_0/attn/query/kernel":
            (-2.77382655958354, [0.18250398337841034, -0.25080230832099915]),
        "encoder/block_0/attn/out/kernel":
            (-8.423318591732823, [0.1292722523212433, 0.06319411098957062]),
        "encoder/block_1/mlp/fc1/kernel":
            (1.8974537253379822, [-0.03363567590713501, -0.03271681070327759]),
        "encoder/block_1/mlp/fc2/kernel":
            (-1.787617802619934, [-0.19282466173171997, -0.23143678903579712]),
    }
    for k, (total, head) in expect.items():
        np.testing.assert_allclose(np.float64(flat[k]).sum(), total, rtol=1e-9, err_msg=k)
        np.testing.assert_array_equal(np.asarray(flat[k]).reshape(-1)[:2], np.float32(head))
    tokens = model.apply(variables, x)["tokens"]
    np.testing.assert_allclose(
        tokens[0, :2, :3], [[-0.9985426664352417, -0.3477265238761902, -2.2274255752563477],
                            [-0.16908283531665802, -0.09130368381738663, -1.514642596244812]],
        rtol=1e-5, atol=1e-6)


def test_layers_reexports_the_split_modules():
    from fmjax.models import attention, blocks, embeddings
    assert layers.MultiHeadAttention is attention.MultiHeadAttention
    assert layers.Block is blocks.Block and layers.Encoder is blocks.Encoder
    assert layers.PatchEmbed is embeddings.PatchEmbed and layers.DenseND is core.DenseND
    from fmjax.models.layers import get_2d_sincos_pos_embed, patchify
    assert get_2d_sincos_pos_embed is embeddings.get_2d_sincos_pos_embed
    assert patchify is embeddings.patchify
