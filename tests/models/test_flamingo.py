"""Flamingo's blocks (fmjax.models.flamingo) and the decoder with gated cross-attention:
parity with open_flamingo's helpers (a transcription, random weights, float32), the media
masking, and the decoder's output exactly unchanged at init (tanh gates at 0)."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.decoder import Decoder
from fmjax.models.flamingo import GatedCrossAttentionBlock, PerceiverResampler

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, DIM_V, HEADS, DIM_HEAD = 32, 24, 2, 8


def _media_locations():
    # row 0: text, <image>, text, text, <image>, text; row 1: <image> first, one image only
    return jnp.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)


def test_gated_decoder_is_exactly_the_plain_decoder_at_init():
    kw = dict(vocab_size=50, max_length=16, width=DIM, depth=4, num_heads=2, mlp_dim=64)
    tokens = jnp.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    media = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 5, DIM_V)), jnp.float32)
    gated = Decoder(**kw, gated_cross_every=2, gated_heads=HEADS, gated_dim_head=DIM_HEAD)
    params = gated.init(jax.random.PRNGKey(0), tokens, media=media,
                        media_locations=_media_locations())["params"]
    assert {"gated_1", "gated_3"} <= set(params) and "gated_0" not in params
    plain = Decoder(**kw)
    lm = {k: v for k, v in params.items() if not k.startswith("gated_")}
    want = plain.apply({"params": lm}, tokens)["logits"]
    got = gated.apply({"params": params}, tokens, media=media,
                      media_locations=_media_locations())["logits"]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # opened gates change it
    opened = jax.tree.map(lambda x: x, params)
    opened["gated_1"] = dict(opened["gated_1"], attn_gate=jnp.ones((1,)))
    moved = gated.apply({"params": opened}, tokens, media=media, media_locations=_media_locations())
    assert float(jnp.abs(moved["logits"] - want).max()) > 1e-4
    with pytest.raises(ValueError, match="media"):
        gated.apply({"params": params}, tokens)


def test_text_attends_only_to_its_immediately_preceding_image():
    block = GatedCrossAttentionBlock(HEADS, DIM_HEAD)
    g = np.random.default_rng(1)
    x = jnp.asarray(g.normal(size=(2, 6, DIM)), jnp.float32)
    media = jnp.asarray(g.normal(size=(2, 2, 3, DIM_V)), jnp.float32)
    params = block.init(jax.random.PRNGKey(0), x, media, _media_locations())["params"]
    params = dict(params, attn_gate=jnp.ones((1,)), ff_gate=jnp.zeros((1,)))
    f = lambda m: block.apply({"params": params}, x, m, _media_locations())  # noqa: E731
    base = f(media)
    np.testing.assert_allclose(base[0, 0], x[0, 0], atol=1e-6)   # before any image: unchanged
    changed = f(media.at[0, 1].add(1.0))                          # the second image of row 0
    delta = np.abs(np.asarray(changed - base)).max(-1)
    assert np.all(delta[0, :4] < 1e-6) and np.all(delta[0, 4:] > 1e-4)


@pytest.mark.parametrize("immediate", [True, False])
def test_blocks_match_open_flamingo(immediate):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "reference"))
    import open_flamingo_helpers as of
    torch.manual_seed(0)
    ref_res = of.PerceiverResampler(dim=DIM_V, depth=2, dim_head=DIM_HEAD, heads=HEADS,
                                    num_latents=4, max_num_media=3, ff_mult=2)
    ref_xattn = of.GatedCrossAttentionBlock(dim=DIM, dim_visual=DIM_V, dim_head=DIM_HEAD,
                                            heads=HEADS, ff_mult=2,
                                            only_attend_immediate_media=immediate)
    with torch.no_grad():
        for p in list(ref_res.parameters()) + list(ref_xattn.parameters()):
            p.add_(0.1 * torch.randn_like(p))  # gates and norms away from 0 / identity
    g = np.random.default_rng(2)
    vis = g.normal(size=(2, 2, 5, DIM_V)).astype(np.float32)
    x = g.normal(size=(2, 6, DIM)).astype(np.float32)
    loc = np.asarray(_media_locations())
    lat_ref = ref_res(torch.tensor(vis))
    out_ref = ref_xattn(torch.tensor(x), lat_ref, torch.tensor(loc))

    t = lambda p: p.detach().numpy()  # noqa: E731
    ln = lambda m: {"scale": t(m.weight), "bias": t(m.bias)}  # noqa: E731
    lin = lambda m: {"kernel": t(m.weight).T}  # noqa: E731
    ff = lambda s: {"norm": ln(s[0]), "fc1": lin(s[1]), "fc2": lin(s[3])}  # noqa: E731
    res_params = {"latents": t(ref_res.latents), "media_time_embs": t(ref_res.media_time_embs),
                  "norm": ln(ref_res.norm)}
    for i, (a, f) in enumerate(ref_res.layers):
        res_params[f"attn_{i}"] = {"norm_media": ln(a.norm_media), "norm_latents": ln(a.norm_latents),
                                   "to_q": lin(a.to_q), "to_kv": lin(a.to_kv), "to_out": lin(a.to_out)}
        res_params[f"ff_{i}"] = ff(f)
    a = ref_xattn.attn
    x_params = {"attn_gate": t(ref_xattn.attn_gate), "ff_gate": t(ref_xattn.ff_gate),
                "attn": {"norm": ln(a.norm), "to_q": lin(a.to_q), "to_kv": lin(a.to_kv),
                         "to_out": lin(a.to_out)}, "ff": ff(ref_xattn.ff)}
    res = PerceiverResampler(depth=2, heads=HEADS, dim_head=DIM_HEAD, num_latents=4, max_num_media=3,
                             ff_mult=2)
    xattn = GatedCrossAttentionBlock(HEADS, DIM_HEAD, 2, immediate)
    lat = res.apply({"params": res_params}, jnp.asarray(vis))
    out = xattn.apply({"params": x_params}, jnp.asarray(x), lat, jnp.asarray(loc))
    np.testing.assert_allclose(lat, t(lat_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, t(out_ref), rtol=1e-5, atol=1e-5)
    # the param trees are complete (init makes the same tree)
    init = nn.unbox(xattn.init(jax.random.PRNGKey(0), jnp.asarray(x), lat, jnp.asarray(loc))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(x_params)
    init = nn.unbox(res.init(jax.random.PRNGKey(0), jnp.asarray(vis))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(res_params)
