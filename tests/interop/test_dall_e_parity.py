"""fmjax's DVAE against openai/DALL-E's dVAE on the same (random) weights, float32.

The reference is ``dall_e``'s ``utils.py`` (Conv2d, map_pixels), ``encoder.py`` and
``decoder.py`` at commit 5be4b236bc3ade6943662354117a0e83752cc322, transcribed in plain torch
in tests/reference/dall_e_model.py (shared with the training-trajectory test) with the same
parameter names, so ``state_dict()`` has the published keys
(``blocks.group_1.block_1.res_path.conv_1.w``, ...). Weights are dall_e's own init plus
noise on the biases (zero at init), converted by ``fmjax.interop.dall_e``; logits, tokens
and decoder outputs must agree to 1e-5.
"""
import os
import sys

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fmjax.interop import dall_e as interop  # noqa: E402
from fmjax.models import dvae as dvae_lib  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from dall_e_model import Decoder, Encoder, map_pixels, perturbed, unmap_pixels  # noqa: E402


# -- helpers ----------------------------------------------------------------------------------
def _images(b, size, seed=0):
    return np.random.default_rng(seed).uniform(size=(b, size, size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


ARCHS = [
    # The published architecture's pattern (4 groups, 2 blocks), narrow to stay fast.
    dict(group_count=4, n_hid=16, n_blk_per_group=2, vocab_size=64, n_init=8),
    # The CPU model's (3 groups, 1 block).
    dict(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32, n_init=12),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_logits_and_tokens_match_dall_e(arch):
    torch.manual_seed(0)
    enc = perturbed(Encoder(arch["group_count"], arch["n_hid"], arch["n_blk_per_group"], 3,
                             arch["vocab_size"]), 1).eval()
    sd = enc.state_dict()
    assert "blocks.group_1.block_1.res_path.conv_1.w" in sd and "blocks.output.conv.w" in sd
    assert interop.encoder_config(sd) == dict(group_count=arch["group_count"], n_blk_per_group=arch["n_blk_per_group"],
                                              n_hid=arch["n_hid"], channels=3, vocab_size=arch["vocab_size"])
    params = interop.convert_encoder(sd)
    size = 8 * 2 ** (arch["group_count"] - 1) // 2
    x = _images(3, size)
    with torch.no_grad():
        ref = enc(map_pixels(_nchw(x))).numpy().transpose(0, 2, 3, 1)
    model = dvae_lib.DVAE(**{k: v for k, v in arch.items() if k != "n_init"})
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), method=dvae_lib.DVAE.encode))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    tokens = np.asarray(model.apply({"params": params}, jnp.asarray(x), method=dvae_lib.DVAE.tokens))
    np.testing.assert_array_equal(tokens, ref.argmax(-1))   # BEiT's get_codebook_indices


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_outputs_match_dall_e(arch):
    torch.manual_seed(1)
    dec = perturbed(Decoder(arch["group_count"], arch["n_init"], arch["n_hid"], arch["n_blk_per_group"], 3,
                             arch["vocab_size"]), 2).eval()
    sd = dec.state_dict()
    cfg = interop.decoder_config(sd)
    assert cfg == dict(arch, channels=3, output="logit_laplace")
    params = interop.convert_decoder(sd)
    h = 3
    codes = np.random.default_rng(3).integers(0, arch["vocab_size"], (2, h, h))
    soft = jax.nn.softmax(jnp.asarray(np.random.default_rng(4).normal(size=(2, h, h, arch["vocab_size"])),
                                      jnp.float32) * 3, -1)
    model = dvae_lib.DVAE(**arch)
    for z in (np.asarray(jax.nn.one_hot(codes, arch["vocab_size"])), np.asarray(soft)):
        with torch.no_grad():
            ref = dec(_nchw(z)).numpy().transpose(0, 2, 3, 1)
            ref_rec = unmap_pixels(torch.sigmoid(torch.from_numpy(ref[..., :3]))).numpy()
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(z), method=dvae_lib.DVAE.decode))
        assert ours.shape == ref.shape == (2, h * 2 ** (arch["group_count"] - 1), h * 2 ** (arch["group_count"] - 1), 6)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(dvae_lib.reconstruction(jnp.asarray(ours))), ref_rec, atol=1e-6)
    # decode_tokens is the decoder on the one-hot codes.
    ours = model.apply({"params": params}, jnp.asarray(codes), method=dvae_lib.DVAE.decode_tokens)
    with torch.no_grad():
        ref = dec(_nchw(np.asarray(jax.nn.one_hot(codes, arch["vocab_size"])))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_both_halves_and_the_published_defaults():
    """convert_dall_e on a matching pair; the published defaults are the 'openai' variant."""
    torch.manual_seed(2)
    arch = ARCHS[1]
    enc = Encoder(arch["group_count"], arch["n_hid"], arch["n_blk_per_group"], 3, arch["vocab_size"])
    dec = Decoder(arch["group_count"], arch["n_init"], arch["n_hid"], arch["n_blk_per_group"], 3, arch["vocab_size"])
    params, kwargs = interop.convert_dall_e(enc.state_dict(), dec.state_dict())
    assert kwargs == dict(arch, channels=3, output="logit_laplace") and set(params) == {"encoder", "decoder"}
    # Copies, not views of the torch tensors: a later optimizer step on the torch model (in
    # place) must not reach the converted params.
    before = jax.tree.map(np.array, params)
    with torch.no_grad():
        for p in list(enc.parameters()) + list(dec.parameters()):
            p.add_(1.0)
    jax.tree.map(np.testing.assert_array_equal, params, before)
    model = dvae_lib.DVAE(**kwargs)
    x = jnp.asarray(_images(2, 16))
    init = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), x)["params"])
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init)
    other = Decoder(arch["group_count"], arch["n_init"], 2 * arch["n_hid"], arch["n_blk_per_group"], 3, arch["vocab_size"])
    with pytest.raises(ValueError, match="differ in n_hid"):
        interop.convert_dall_e(enc.state_dict(), other.state_dict())
    # The published dVAE: dall_e.Encoder() / Decoder() defaults == DVAE_VARIANTS['openai'].
    assert dvae_lib.dvae_kwargs("openai") == dict(group_count=4, n_hid=256, n_blk_per_group=2,
                                                  vocab_size=8192, n_init=128)


def test_converter_errors():
    enc = Encoder(3, 8, 1, 3, 32)
    with pytest.raises(ValueError, match="not a dall_e Decoder"):
        interop.decoder_config({"foo.w": np.zeros(1)})
    with pytest.raises(ValueError, match=r"not 7x7 \(a Decoder's\?\)"):
        interop.encoder_config(Decoder(3, 12, 8, 1, 3, 32).state_dict())
    sd = dict(enc.state_dict())
    del sd["blocks.group_2.block_1.res_path.conv_1.w"]
    sd["blocks.group_2.block_1.res_path.conv_9.w"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        interop.encoder_config(sd)


def test_load_tokenizer_from_a_torch_state_dict(tmp_path):
    """load_tokenizer(dict(torch=FILE), size): the architecture read off the file, the tokens
    dall_e's argmax; OpenAI's pickled module is refused with the one-line fix."""
    torch.manual_seed(4)
    enc = perturbed(Encoder(3, 8, 1, 3, 32), 5).eval()
    path = str(tmp_path / "encoder.pt")
    torch.save(enc.state_dict(), path)
    module, params = dvae_lib.load_tokenizer({"torch": path}, 16)
    assert (module.group_count, module.n_hid, module.n_blk_per_group, module.vocab_size) == (3, 8, 1, 32)
    assert set(params) == {"encoder"}
    x = _images(2, 16, seed=7)
    codes = module.apply({"params": params}, jnp.asarray(x), method=dvae_lib.DVAE.tokens)
    with torch.no_grad():
        ref = enc(map_pixels(_nchw(x))).argmax(1).numpy()
    np.testing.assert_array_equal(np.asarray(codes), ref)
    whole = str(tmp_path / "encoder.pkl")
    torch.save(enc, whole)   # a pickled module, as OpenAI publishes it
    with pytest.raises(ValueError, match=r"not a plain state dict .*state_dict\(\)"):
        dvae_lib.load_tokenizer({"torch": whole}, 16)
