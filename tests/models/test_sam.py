"""fmjax.models.sam: output shapes for every prompt kind, window partition / unpartition with
padding, relative-position tables, the registry entry, dense hooks reaching SAM's
projections, and the paper presets' param counts by ``jax.eval_shape`` (no allocation).
Numerical parity and gradients: tests/interop/test_sam_parity.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import inject
from fmjax.models.registry import build_model, capabilities
from fmjax.models.sam import SAM, get_rel_pos, sam_kwargs, window_partition, window_unpartition

# Totals equal to transformers' SamModel (tied Fourier matrix counted once, measured on the
# meta device) and image-encoder totals; the SAM paper quotes ViT-B 91M, ViT-L 308M, ViT-H 636M.
COUNTS = {"vit_b": (93_735_728, 89_670_912, 91e6), "vit_l": (312_343_088, 308_278_272, 308e6),
          "vit_h": (641_090_864, 637_026_048, 636e6)}


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


@pytest.fixture(scope="module")
def small():
    model = SAM()
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *model.init_inputs(2)))()["params"]
    return model, params


def test_shapes_for_every_prompt(small):
    model, params = small
    g = np.random.default_rng(0)
    images = jnp.asarray(g.standard_normal((2, 64, 64, 3)), jnp.float32)
    pts = jnp.asarray(g.uniform(0, 64, (2, 3, 2, 2)), jnp.float32)
    labels = jnp.asarray([[[1, 0], [1, -1], [0, -10]]] * 2)
    boxes = jnp.asarray([[[4, 4, 40, 40]] * 3] * 2, jnp.float32)
    masks = jnp.zeros((2, 32, 32))
    fn = jax.jit(lambda p, x, kw, mm: model.apply({"params": p}, x, multimask_output=mm, **kw),
                 static_argnums=3)
    for kw, p, mm in ((dict(points=pts, labels=labels), 3, True), (dict(boxes=boxes), 3, False),
                      (dict(points=pts, labels=labels, boxes=boxes), 3, True), (dict(masks=masks), 1, True),
                      (dict(points=pts), 3, False)):
        out = fn(params, images, kw, mm)
        m = 3 if mm else 1
        assert out["image_embeddings"].shape == (2, 8, 8, 64)
        assert out["masks"].shape == (2, p, m, 32, 32)
        assert out["iou_predictions"].shape == (2, p, m)
        assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    # single mask = the first of the 4 mask tokens; multimask = the other 3 (same decoder pass)
    one, three = fn(params, images, dict(boxes=boxes), False), fn(params, images, dict(boxes=boxes), True)
    assert not np.allclose(np.asarray(one["masks"][:, :, 0]), np.asarray(three["masks"][:, :, 0]))


def test_predict_reuses_embeddings(small):
    model, params = small
    images = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 64, 3)), jnp.float32)
    boxes = jnp.asarray([[[8, 8, 30, 50]]], jnp.float32)
    emb = model.apply({"params": params}, images, method=SAM.encode_image)
    masks, iou = model.apply({"params": params}, emb, boxes=boxes, method=SAM.predict)
    out = model.apply({"params": params}, images, boxes=boxes)
    np.testing.assert_allclose(np.asarray(masks), np.asarray(out["masks"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(iou), np.asarray(out["iou_predictions"]), atol=1e-6)
    pe = model.apply({"params": params}, method=SAM.image_pe)
    assert pe.shape == (8, 8, 64)


@pytest.mark.parametrize("h, w, window", [(7, 5, 3), (8, 8, 4), (14, 14, 14), (9, 13, 4)])
def test_window_round_trip(h, w, window):
    x = jnp.asarray(np.random.default_rng(h * w).standard_normal((2, h, w, 3)), jnp.float32)
    win, (hp, wp) = window_partition(x, window)
    assert (hp, wp) == (-(-h // window) * window, -(-w // window) * window)
    assert win.shape == (2 * (hp // window) * (wp // window), window, window, 3)
    # window (b, i, j) holds rows i*window.., cols j*window.. of the zero-padded map
    padded = np.pad(np.asarray(x), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    nw = wp // window
    k = 1 * (hp // window) * nw + (hp // window - 1) * nw + nw - 1   # image 1, last window
    np.testing.assert_array_equal(np.asarray(win[k]), padded[1, hp - window:, wp - window:])
    np.testing.assert_array_equal(np.asarray(window_unpartition(win, window, (hp, wp), (h, w))), np.asarray(x))


def test_rel_pos_tables():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((2 * 4 - 1, 5)), jnp.float32)
    r = get_rel_pos(4, 4, table)
    assert r.shape == (4, 4, 5)
    for i in range(4):
        for j in range(4):   # offset i - j, shifted by 3
            np.testing.assert_array_equal(np.asarray(r[i, j]), np.asarray(table[i - j + 3]))
    assert get_rel_pos(6, 6, table).shape == (6, 6, 5)   # interpolated from 7 to 11 entries


def test_registry_and_presets():
    model = build_model(dict(name="sam"))
    assert isinstance(model, SAM) and "promptable_masks" in capabilities(model)
    b = build_model(dict(name="sam", variant="vit_b", depth=2))
    assert (b.width, b.depth, b.num_heads, b.image_size, b.prompt_dim) == (768, 2, 12, 1024, 256)
    with pytest.raises(ValueError, match="vit_x"):
        sam_kwargs("vit_x")


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_preset_param_counts(variant):
    model = SAM(**sam_kwargs(variant))
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.init_inputs(1)))["params"])
    total, encoder, paper = COUNTS[variant]
    assert _count(shapes) == total
    assert _count(shapes["image_encoder"]) == encoder
    assert abs(encoder - paper) / paper < 0.02
    assert shapes["image_encoder"]["pos_embed"].shape == (1, 64, 64, model.width)
    g = model.global_attn_indexes[0]
    assert shapes["image_encoder"][f"block_{g}"]["attn"]["rel_pos_h"].shape == (127, model.width // model.num_heads)
    assert shapes["image_encoder"]["block_0"]["attn"]["rel_pos_h"].shape == (27, model.width // model.num_heads)


def test_dense_hooks_reach_sam(small):
    """LoRA-style dense hooks see every attention / MLP projection (inject.py's contract)."""
    model, params = small
    seen = set()

    def hook(module, x, call_next):
        seen.add("/".join(module.path[-3:]))
        return call_next(x)
    with inject.hooks(dense=hook):
        model.apply({"params": params}, *model.init_inputs(1))
    assert "block_0/attn/query" in seen and "block_1/attn/value" in seen
    assert "layers_0/cross_attn_token_to_image/query" in seen
    assert "transformer/final_attn_token_to_image/value" in seen
    assert "layers_1/mlp/fc1" in seen


def test_sams_coordinate_encoding_is_smooth_at_scale_1_and_a_hash_at_transformers_init():
    """The random-Fourier encoding of a point: with segment_anything's scale 1 (configs/sam.py)
    a point one pixel away encodes almost the same (so a box's corners carry geometry); with
    transformers' init scale (width // 2, the model default, meant for loading weights) the
    encoding of neighbouring pixels is unrelated. Training from scratch at the HF scale left box
    prompts below the filled box itself (mIoU 0.26 vs 0.82 at scale 1 after 300 box-only steps)."""
    from fmjax.models.sam.prompt_encoder import SamPositionalEmbedding
    xy = (jnp.stack([jnp.arange(64.0), jnp.full(64, 31.0)], -1) + 0.5) / 64   # a row of pixel centres

    def neighbour_cosine(scale):
        pe = SamPositionalEmbedding(32, scale)
        enc, _ = pe.init_with_output(jax.random.PRNGKey(0), xy)
        enc = enc / jnp.linalg.norm(enc, axis=-1, keepdims=True)
        return float(jnp.mean(jnp.sum(enc[1:] * enc[:-1], -1)))
    assert neighbour_cosine(1.0) > 0.95
    assert neighbour_cosine(64.0) < 0.3
    from fmjax.testing import load_config
    for preset in ("default", "cpu"):
        c = load_config("sam", preset)
        assert c.model.pe_scale == 1.0 and c.optimizer.frozen == (r".*pe_layer/gaussian",)


def test_remat_keeps_params_and_gradients(small):
    """``remat=True`` (for the large encoders) recomputes the encoder blocks: same param tree, same
    gradients."""
    model, params = small
    remat = model.clone(remat=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, model.image_size, model.image_size, 3))
    # a random projection of the embeddings, not their sum: the sum of the neck's LayerNorm
    # outputs is nearly constant, so its gradients were float32 noise (~1e-7) and compared
    # element by element at 1e-6 they failed on rounding alone
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, method=model.encode_image), params)
    w = jax.random.normal(jax.random.PRNGKey(2), out.shape)
    loss = lambda m: (lambda p: (m.apply({"params": p}, x, method=m.encode_image) * w).sum())  # noqa: E731
    ga, gb = jax.grad(loss(model))(params), jax.grad(loss(remat))(params)
    # the attention key biases' gradients are zero in exact arithmetic (softmax ignores a constant
    # shift per query), so they are pure rounding noise: atol is scaled by the largest gradient of
    # the whole tree, not of each leaf. Rematerialising lets XLA fuse and order the sums
    # differently, and on another CPU the neck's 1x1 conv kernel gradients (sums over every pixel)
    # moved by 1.8e-5 on a largest gradient of 93 (2e-7 of it): atol is 1e-6 of the largest
    # gradient, still five orders below what a wrong recomputation gives
    atol = 1e-6 * max(float(np.abs(b).max()) for b in jax.tree.leaves(gb))
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


def test_drop_path_is_stochastic_depth_of_the_encoder_blocks(small):
    """``drop_path`` (the paper presets' 0.4): the same params; no effect at inference; in training
    (``train=True`` and a 'dropout' rng) it changes the embeddings per draw, and the
    rematerialised encoder makes the same draws."""
    model, params = small
    dp = model.clone(drop_path=0.4)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, model.image_size, model.image_size, 3))
    enc = lambda m, train, seed=0: m.apply({"params": params}, x, train, method=m.encode_image,  # noqa: E731
                                           rngs={"dropout": jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(enc(dp, False), enc(model, False))
    np.testing.assert_array_equal(enc(model, True), enc(model, False))   # rate 0: nothing dropped
    a, b = enc(dp, True, 0), enc(dp, True, 1)
    assert np.abs(np.asarray(a) - np.asarray(enc(dp, False))).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_allclose(enc(dp.clone(remat=True), True, 0), a, rtol=1e-5, atol=1e-5)
