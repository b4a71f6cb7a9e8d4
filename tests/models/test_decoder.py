"""fmjax.models.decoder.Decoder and fmjax.models.generate: shapes, causality, the cross-attention
mask, scan == unrolled, the KV cache (learned and rotary positions, scanned), and decoding
(greedy, sampling determinism, top-k / top-p, beam search)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import generate
from fmjax.models import scan as scan_lib
from fmjax.models.decoder import Decoder, apply_rotary, decoder_kwargs
from fmjax.models.registry import build_model
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules, param_shardings

KW = dict(vocab_size=41, max_length=24, width=32, depth=2, num_heads=4, mlp_dim=64)
TOK = jnp.asarray(np.random.default_rng(0).integers(0, 41, (2, 9)), jnp.int32)
CTX = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 24)), jnp.float32)


def _init(model, tokens=TOK, **kw):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, **kw)["params"])


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_shapes_and_causality(position):
    m = Decoder(**KW, position=position)
    params = _init(m)
    assert ("pos_embed" in params) == (position == "learned")
    out = m.apply({"params": params}, TOK)
    assert out["logits"].shape == (2, 9, 41) and out["tokens"].shape == (2, 9, 32)
    assert out["logits"].dtype == jnp.float32
    changed = TOK.at[:, 6].set((TOK[:, 6] + 1) % 41)
    out2 = m.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(out["logits"][:, :6]), np.asarray(out2["logits"][:, :6]))
    assert not np.allclose(out["logits"][:, 6:], out2["logits"][:, 6:])


def test_untied_head_and_length_check():
    m = Decoder(**KW, tie_embeddings=False)
    params = _init(m)
    assert params["lm_head"]["kernel"].shape == (32, 41)
    with pytest.raises(ValueError, match="max_length"):
        m.apply({"params": params}, jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="valid"):
        decoder_kwargs("nope")
    assert build_model(dict(name="decoder", variant="tiny", vocab_size=41)).width == 128


def test_cross_attention_layers_and_mask():
    m = Decoder(**{**KW, "depth": 4}, cross_attention_every=2)
    params = _init(m, context=CTX)
    assert [("cross_attn" in params[f"block_{i}"]) for i in range(4)] == [False, True, False, True]
    assert params["block_1"]["cross_attn"]["key"]["kernel"].shape == (24, 4, 8)
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    out = m.apply({"params": params}, TOK, context=CTX, context_mask=mask)["logits"]
    # masked context tokens do not matter; unmasked ones do
    ctx2 = CTX.at[1, 3:].set(100.0)
    out2 = m.apply({"params": params}, TOK, context=ctx2, context_mask=mask)["logits"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=1e-6)
    ctx3 = CTX.at[1, 0].set(100.0)
    out3 = m.apply({"params": params}, TOK, context=ctx3, context_mask=mask)["logits"]
    assert not np.allclose(out[1], out3[1])
    with pytest.raises(ValueError, match="context"):
        m.apply({"params": params}, TOK)


@pytest.mark.parametrize("cross", [0, 1])
def test_scan_equals_unrolled(cross):
    kw = dict(context=CTX) if cross else {}
    m = Decoder(**KW, cross_attention_every=cross)
    params = _init(m, **kw)
    ms = Decoder(**KW, cross_attention_every=cross, scan_layers=True, remat="full")
    stacked = scan_lib.stack_layers(params)
    assert jax.tree.map(jnp.shape, _init(ms, **kw)) == jax.tree.map(jnp.shape, stacked)
    a = m.apply({"params": params}, TOK, **kw)["logits"]
    b = ms.apply({"params": stacked}, TOK, **kw)["logits"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="identical blocks"):
        Decoder(**KW, cross_attention_every=2, scan_layers=True).init(
            jax.random.PRNGKey(0), TOK, context=CTX)


@pytest.mark.parametrize("position,scan", [("learned", False), ("rotary", False), ("learned", True)])
def test_kv_cache_equals_full_forward(position, scan):
    m = Decoder(**KW, position=position, scan_layers=scan, cross_attention_every=1)
    params = _init(m, context=CTX)
    full = m.apply({"params": params}, TOK, context=CTX)["logits"]
    cache = generate.init_cache(m, 2, 12, context=CTX)
    dec = m.clone(decode=True)
    pieces, variables = [], {"params": params, "cache": cache}
    for lo, hi in [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9)]:
        out, mut = dec.apply(variables, TOK[:, lo:hi], context=CTX, mutable=["cache"])
        variables = {"params": params, **mut}
        pieces.append(out["logits"])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=1e-5)


def test_rotary_is_a_rotation_of_relative_position():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32) for _ in range(2))
    dot = lambda a, b: jnp.einsum("bqhd,bqhd->h", apply_rotary(q, jnp.array([a])),
                                  apply_rotary(k, jnp.array([b])))
    np.testing.assert_allclose(np.asarray(dot(3, 1)), np.asarray(dot(7, 5)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_rotary(q, jnp.array([0]))), np.asarray(q))


def test_dropout_only_in_training():
    m = Decoder(**KW, dropout=0.3, attention_dropout=0.3)
    params = _init(m)
    a = m.apply({"params": params}, TOK)["logits"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(m.apply({"params": params}, TOK)["logits"]))
    b = m.apply({"params": params}, TOK, train=True, rngs={"dropout": jax.random.PRNGKey(1)})["logits"]
    assert not np.allclose(a, b)


def _is_greedy(m, params, tokens, prompt_length):
    """Whether every new token is the argmax of an uncached forward over its prefix."""
    logits = m.apply({"params": params}, tokens)["logits"]
    picks = np.asarray(jnp.argmax(logits[:, prompt_length - 1:-1], -1))
    return np.array_equal(picks, np.asarray(tokens[:, prompt_length:]))


def test_greedy_sampling_and_beam_search():
    m = Decoder(**KW, position="rotary")
    params = _init(m)
    prompt = TOK[:, :3]
    greedy = generate.sample(m, params, prompt, 7, greedy=True)
    assert _is_greedy(m, params, greedy, 3)
    # sampling: a function of the key; temperature -> 0 is greedy
    s1 = generate.sample(m, params, prompt, 7, jax.random.PRNGKey(3), top_k=5, top_p=0.9)
    s2 = generate.sample(m, params, prompt, 7, jax.random.PRNGKey(3), top_k=5, top_p=0.9)
    s3 = generate.sample(m, params, prompt, 7, jax.random.PRNGKey(4), top_k=5, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert not np.array_equal(np.asarray(s1), np.asarray(s3))
    cold = generate.sample(m, params, prompt, 7, jax.random.PRNGKey(3), temperature=1e-4,
                           top_k=5, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
    # beam search: 1 beam is greedy; 4 beams find a sequence at least as likely
    b1, _ = generate.beam_search(m, params, prompt, 7, num_beams=1, length_penalty=0.0)
    np.testing.assert_array_equal(np.asarray(b1[:, 0]), np.asarray(greedy))
    b4, scores = generate.beam_search(m, params, prompt, 7, num_beams=4, length_penalty=0.0)
    assert b4.shape == (2, 4, 10) and scores.shape == (2, 4)
    assert (np.diff(np.asarray(scores), axis=1) <= 1e-6).all()
    lp_beam = generate.sequence_logprob(m, params, b4[:, 0], 3)
    lp_greedy = generate.sequence_logprob(m, params, greedy, 3)
    np.testing.assert_allclose(np.asarray(lp_beam), np.asarray(scores[:, 0]), atol=1e-4)
    assert (np.asarray(lp_beam) >= np.asarray(lp_greedy) - 1e-5).all()


def test_eos_padding_and_filters():
    m = Decoder(**KW)
    params = _init(m)
    prompt = TOK[:, :2]
    greedy = np.asarray(generate.sample(m, params, prompt, 8, greedy=True))
    eos = int(greedy[0, 3])                       # row 0's 2nd new token as the eos
    stop = 2 + int(np.flatnonzero(greedy[0, 2:] == eos)[0])
    out = np.asarray(generate.sample(m, params, prompt, 8, greedy=True, eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(out[0, :stop + 1], greedy[0, :stop + 1])
    assert (out[0, stop + 1:] == 0).all()
    beams, _ = generate.beam_search(m, params, prompt, 8, num_beams=3, eos_token_id=eos, pad_token_id=0)
    for row in np.asarray(beams).reshape(-1, 10):
        hits = np.flatnonzero(row[2:] == eos)
        if hits.size:
            assert (row[2 + hits[0] + 1:] == 0).all()
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.asarray(generate.filter_logits(logits, **kw) > -1e8)[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.1) == [True, False, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    with pytest.raises(ValueError, match="max_length"):
        generate.sample(m, params, prompt, 30, greedy=True)
    with pytest.raises(ValueError, match="rng"):
        generate.sample(m, params, prompt, 3)


def test_logical_axes_and_sharded_forward_and_decoding():
    m = Decoder(**{**KW, "vocab_size": 48}, scan_layers=True, cross_attention_every=1)
    tok = TOK % 48
    boxed = jax.eval_shape(m.init, jax.random.PRNGKey(0), tok, context=CTX)["params"]
    specs = nn.get_partition_spec(boxed)
    P = jax.sharding.PartitionSpec
    assert specs["token_embed"]["embedding"] == P("vocab", "embed")
    assert specs["block_stack"]["attn"]["query"]["kernel"] == P("layers", "embed", "heads", "kv")
    assert specs["block_stack"]["cross_attn"]["out"]["kernel"] == P("layers", "heads", "kv", "embed")
    assert specs["block_stack"]["mlp"]["fc1"]["kernel"] == P("layers", "embed", "mlp")
    params = _init(m, tok, context=CTX)
    want = m.apply({"params": params}, tok, context=CTX)["logits"]
    want_gen = generate.sample(m, params, tok[:, :3], 5, greedy=True, context=CTX)
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = get_rules("fsdp_tensor")
    placed = jax.device_put(params, param_shardings(boxed, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(lambda p: m.apply({"params": p}, tok, context=CTX)["logits"])(placed)
        got_gen = generate.sample(m, placed, tok[:, :3], 5, greedy=True, context=CTX)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_gen), np.asarray(want_gen))
    assert _is_greedy_with(m, params, want_gen, 3, CTX)


def _is_greedy_with(m, params, tokens, prompt_length, context):
    logits = m.apply({"params": params}, tokens, context=context)["logits"]
    picks = np.asarray(jnp.argmax(logits[:, prompt_length - 1:-1], -1))
    return np.array_equal(picks, np.asarray(tokens[:, prompt_length:]))


def test_left_padding_changes_nothing():
    """A prompt left-padded with an attention mask gives the unpadded prompt's logits at its
    real tokens, the same greedy continuation and the same beams (rotary, scanned; learned
    positions: tests/interop/test_gpt2_parity.py against transformers)."""
    m = Decoder(**KW, position="rotary", scan_layers=True)
    params = _init(m)
    short = TOK[1:, :4]
    padded = jnp.concatenate([jnp.full((1, 3), 7, jnp.int32), short], 1)
    mask = jnp.array([[False] * 3 + [True] * 4])
    a = m.apply({"params": params}, short)["logits"]
    b = m.apply({"params": params}, padded, attention_mask=mask)["logits"][:, 3:]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    ga = generate.sample(m, params, short, 6, greedy=True)
    gb = generate.sample(m, params, padded, 6, greedy=True, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(ga[:, 4:]), np.asarray(gb[:, 7:]))
    ba, sa = generate.beam_search(m, params, short, 4, num_beams=3)
    bb, sb = generate.beam_search(m, params, padded, 4, num_beams=3, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(ba[..., 4:]), np.asarray(bb[..., 7:]))
    np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), atol=1e-5)


def test_float64_decoder_needs_x64_and_then_computes_in_float64():
    """dtype='float64' (library use, e.g. the LM trajectory test): refused without 64-bit JAX;
    under jax.enable_x64 the logits and the attention softmax stay float64."""
    cfg = dict(name="decoder", vocab_size=32, max_length=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match="needs 64-bit JAX"):
        build_model(cfg, "float64")
    with jax.enable_x64(True):
        model = build_model(cfg, "float64")
        tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), tokens)["params"])
        out = model.apply({"params": params}, tokens)["logits"]
        assert out.dtype == jnp.float64
        ref = build_model(cfg).apply({"params": jax.tree.map(lambda a: a.astype(jnp.float32), params)}, tokens)["logits"]
        assert ref.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
