"""Unit tests for fmjax.models.text (CLIP text tower) and fmjax.models.clip (tiny, CPU)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fmjax.models import registry
from fmjax.models.clip import CLIP, clip_kwargs
from fmjax.models.text import TEXT_PRESETS, TextTransformer, pool_positions, text_kwargs

TINY = dict(vocab_size=50, context_length=12, width=32, depth=2, num_heads=4, mlp_dim=64,
            embed_dim=16)
TINY_CLIP = dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=8, embed_dim=16,
                 text_width=32, text_depth=1, text_heads=4, text_mlp_dim=64, vocab_size=50,
                 context_length=12)


def _tokens(b=3, length=10, seed=0):
    """Random ids with the EOT (49, the largest id) at positions 4, 6, 8 (capped), then 0s."""
    ids = np.random.default_rng(seed).integers(1, 40, size=(b, length))
    for row in range(b):
        pos = min(4 + 2 * row, length - 1)
        ids[row, pos] = 49
        ids[row, pos + 1:] = 0
    return jnp.asarray(ids)


def _assert_all_partitioned(variables):
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    specs = jax.tree_util.tree_leaves(
        nn.get_partition_spec(variables), is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert leaves and len(specs) == len(leaves)
    for leaf, spec in zip(leaves, specs):
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert isinstance(spec, PartitionSpec) and len(spec) == leaf.value.ndim


@pytest.fixture(scope="module")
def text_model():
    model = TextTransformer(**TINY)
    variables = model.init(jax.random.PRNGKey(0), _tokens())
    return model, variables, jax.jit(model.apply)


def test_shapes_names_and_partitioning(text_model):
    model, variables, apply = text_model
    _assert_all_partitioned(variables)
    p = nn.meta.unbox(variables)["params"]
    assert set(p) == {"token_embed", "pos_embed", "encoder", "proj"}
    assert p["token_embed"]["embedding"].shape == (50, 32)
    assert p["pos_embed"].shape == (12, 32) and p["proj"]["kernel"].shape == (32, 16)
    assert set(p["encoder"]) == {"block_0", "block_1", "norm"}
    assert variables["params"]["token_embed"]["embedding"].names == ("vocab", "embed")
    out = apply(variables, _tokens())
    assert out["tokens"].shape == (3, 10, 32)
    assert out["pooled"].shape == (3, 32) and out["embedding"].shape == (3, 16)
    # Plain (unboxed) trees work too; shorter texts use the first positions.
    short = apply(nn.meta.unbox(variables), _tokens(length=8))
    assert short["tokens"].shape == (3, 8, 32)


def test_causal_mask(text_model):
    model, variables, apply = text_model
    ids = _tokens()
    changed = ids.at[:, 6].set(7)
    a, b = apply(variables, ids)["tokens"], apply(variables, changed)["tokens"]
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3
    # Without the mask every position sees the change.
    bidir = model.clone(causal=False)
    a, b = bidir.apply(variables, ids)["tokens"], bidir.apply(variables, changed)["tokens"]
    assert np.abs(np.asarray(a[:, :6] - b[:, :6])).max() > 1e-3


def test_eot_pooling(text_model):
    model, variables, apply = text_model
    ids = _tokens()
    out = apply(variables, ids)
    rows = np.arange(3)
    np.testing.assert_allclose(out["pooled"], out["tokens"][rows, [4, 6, 8]], atol=1e-6)
    np.testing.assert_allclose(out["embedding"],
                               out["pooled"] @ variables["params"]["proj"]["kernel"].value,
                               atol=1e-5)
    # 'eos' pools at the first occurrence of eos_token_id, even when it is not the max id.
    ids_eos = ids.at[:, 2].set(45).at[:, 3].set(9).at[2, 9].set(9)
    assert list(pool_positions(ids_eos, "eos", 9)) == [3, 3, 3]
    assert list(pool_positions(ids_eos, "argmax", None)) == [4, 6, 8]
    eos_model = model.clone(pool="eos", eos_token_id=9)
    out = eos_model.apply(variables, ids_eos)
    np.testing.assert_allclose(out["pooled"], out["tokens"][:, 3], atol=1e-6)


def test_errors(text_model):
    model, variables, _ = text_model
    with pytest.raises(ValueError, match="pool='eos' needs eos_token_id"):
        model.clone(pool="eos").apply(variables, _tokens())
    with pytest.raises(ValueError, match="valid: \\('argmax', 'eos', 'first'\\)"):
        model.clone(pool="cls").apply(variables, _tokens())
    with pytest.raises(ValueError, match="exceeds context_length=12"):
        model.apply(variables, _tokens(length=13))
    with pytest.raises(ValueError, match="valid: B, L, H"):
        text_kwargs("XL")


def test_presets():
    assert TEXT_PRESETS["B"] == dict(width=512, depth=12, num_heads=8, mlp_dim=2048)
    assert TEXT_PRESETS["L"] == dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
    assert text_kwargs("L", depth=2)["depth"] == 2
    kw = clip_kwargs("L/14")
    assert (kw["width"], kw["depth"], kw["patch_size"]) == (1024, 24, 14)
    assert (kw["text_width"], kw["text_heads"], kw["embed_dim"]) == (768, 12, 768)
    m = TextTransformer()
    assert (m.vocab_size, m.context_length, m.width, m.embed_dim) == (49408, 77, 512, 512)
    assert m.activation == "quick_gelu" and m.layernorm_eps == 1e-5
    # Abstract init of the real B tower: the parameter count of OpenAI CLIP's text tower.
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
    n = sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
    assert n == 63_428_096  # token + pos embed, 12 blocks, ln_final, text_projection


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_clip_model(loss):
    model = CLIP(**TINY_CLIP, loss=loss)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), images, _tokens())
    _assert_all_partitioned(variables)
    p = variables["params"]
    assert set(p) == {"image", "image_proj", "text", "logit_scale"} | (
        {"logit_bias"} if loss == "sigmoid" else set())
    assert "pre_norm" in p["image"] and "head" not in p["image"]
    out = model.apply(variables, images, _tokens())
    assert out["image_embeds"].shape == (2, 16) and out["text_embeds"].shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1, atol=1e-6)
    scale = 10.0 if loss == "sigmoid" else 1 / 0.07
    np.testing.assert_allclose(float(out["logit_scale"]), scale, rtol=1e-6)
    expect = scale * out["image_embeds"] @ out["text_embeds"].T
    if loss == "sigmoid":
        assert float(out["logit_bias"]) == -10.0
        expect = expect - 10.0
    else:
        assert "logit_bias" not in out
    np.testing.assert_allclose(out["logits_per_image"], expect, rtol=1e-5, atol=1e-5)
    enc = model.apply(variables, images, method=CLIP.encode_image)
    np.testing.assert_allclose(enc, out["image_embeds"], atol=1e-6)


def test_clip_registry_and_bad_loss():
    model = registry.build_model(dict(name="clip", variant="B/16", **TINY_CLIP))
    assert isinstance(model, CLIP) and model.patch_size == 8 and model.width == 32
    with pytest.raises(ValueError, match="valid: \\('softmax', 'sigmoid'\\)"):
        CLIP(**TINY_CLIP, loss="hinge").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), _tokens())
    assert math.isclose(clip_kwargs("B/16")["embed_dim"], 512)


def test_bidirectional_tower_with_pad_mask_and_first_token_pooling():
    """ALIGN's BERT-style tower (causal=False, pad_id=0, pool='first'): position 0 sees later
    words, the padding changes nothing (its keys are masked), the pooled vector is position 0."""
    model = TextTransformer(**TINY, causal=False, pad_id=0, pool="first")
    tokens = _tokens()
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    out = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(out["pooled"]), np.asarray(out["tokens"][:, 0]), rtol=1e-6)
    later = tokens.at[0, 2].set(7 if int(tokens[0, 2]) != 7 else 8)   # a later word changes position 0
    assert np.abs(np.asarray(model.apply({"params": params}, later)["pooled"][0] - out["pooled"][0])).max() > 1e-4
    longer = jnp.concatenate([tokens, jnp.zeros((3, 2), tokens.dtype)], 1)  # more padding
    again = model.apply({"params": params}, longer)
    np.testing.assert_allclose(np.asarray(again["embedding"]), np.asarray(out["embedding"]), rtol=1e-5, atol=1e-6)
    unmasked = TextTransformer(**TINY, causal=False, pool="first")  # without pad_id the padding leaks in
    a = unmasked.apply({"params": params}, tokens)["embedding"]
    b = unmasked.apply({"params": params}, longer)["embedding"]
    assert np.abs(np.asarray(a - b)).max() > 1e-4


@pytest.mark.parametrize("pad_id", [None, 0])
def test_soft_prompts_are_coop_context_tokens(pad_id):
    """num_prompts = n (CoOp): the tower equals the plain tower on tokens with n extra
    vocabulary rows holding the learned context, placed right after the start token (the
    caption n places on, its last n pads dropped, pooling at the moved end-of-text)."""
    vocab, n, eot = 50, 3, 49
    kw = dict(vocab_size=vocab, context_length=12, width=16, depth=2, num_heads=2, mlp_dim=32,
              embed_dim=8, pool="eos", eos_token_id=eot, pad_id=pad_id)
    tokens = jnp.array([[1, 5, 7, eot, 0, 0, 0, 0, 0, 0, 0, 0],
                        [1, 9, 9, 9, 9, 2, eot, 0, 0, 0, 0, 0]])
    model = TextTransformer(**kw, num_prompts=n)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))
    out = model.apply(params, tokens)
    ctx = params["params"]["prompt_embed"]
    assert ctx.shape == (n, 16)
    plain = TextTransformer(**{**kw, "vocab_size": vocab + n})
    p = dict(params["params"])
    p["token_embed"] = {"embedding": jnp.concatenate([p["token_embed"]["embedding"], ctx], 0)}
    del p["prompt_embed"]
    moved = jnp.concatenate([tokens[:, :1], jnp.broadcast_to(vocab + jnp.arange(n), (2, n)),
                             tokens[:, 1:-n]], axis=1)
    ref = plain.apply({"params": p}, moved)
    for key in ("tokens", "pooled", "embedding"):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="num_prompts=3 needs texts longer than 4 tokens"):
        model.apply(params, tokens[:, :4])
