"""fmjax's BLIP against transformers' (random weights converted by fmjax.interop.hf_blip, float32):
``BlipForImageTextRetrieval``'s ITM logits and ITC similarities and every gradient of both,
and ``BlipForConditionalGeneration``'s next-token logits and their gradients. (Training parity
with salesforce/BLIP's own code: tests/reference/test_blip_trajectory.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_blip  # noqa: E402
from fmjax.models.blip import BLIP  # noqa: E402

VOCAB, ENC, DEC = 40, 39, 38
CONFIG = dict(
    text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, encoder_hidden_size=48,
                     bos_token_id=DEC, sep_token_id=2, pad_token_id=0, eos_token_id=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, image_size=16, patch_size=8, attention_dropout=0.0),
    image_text_hidden_size=16)


def _model(cls):
    torch.manual_seed(0)
    model = cls(transformers.BlipConfig(**CONFIG)).eval()
    with torch.no_grad():  # norms away from identity, biases nonzero, so they matter
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs():
    g = np.random.default_rng(0)
    images = g.normal(size=(3, 3, 16, 16)).astype(np.float32)
    tokens = np.array([[1, 5, 6, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0],
                       [1, 11, 12, 13, 14, 15, 16, 2]], np.int64)
    return images, tokens


def _fmjax(model, partial):
    kwargs = hf_blip.blip_kwargs_from_hf_config(model.config)
    fm = BLIP(**{k: v for k, v in kwargs.items()}, enc_token_id=ENC, dec_token_id=DEC)
    images, tokens = _inputs()
    params = fm.init(jax.random.PRNGKey(0), jnp.asarray(images.transpose(0, 2, 3, 1)),
                     jnp.asarray(tokens))["params"]
    params = jax.tree.map(np.asarray, params)

    def merge(dst, src):
        for k, v in src.items():
            dst[k] = merge(dict(dst[k]), v) if isinstance(v, dict) else np.asarray(v)
        return dst
    return fm, merge(dict(params), partial)


def _grads_state_dict(model):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied names too
        sd[name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return sd


def _compare_grads(fm_grads, hf_grads):
    leaves = jax.tree_util.tree_flatten_with_path(hf_grads)[0]
    scale = max(float(np.abs(np.asarray(v)).max()) for _, v in leaves)
    for path, v in leaves:
        got = fm_grads
        for k in path:
            got = got[k.key]
        np.testing.assert_allclose(np.asarray(got), np.asarray(v), rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    return len(leaves)


def test_itm_and_itc_match_transformers_retrieval():
    model = _model(transformers.BlipForImageTextRetrieval)
    images, tokens = _inputs()
    enc = tokens.copy()
    enc[:, 0] = ENC
    px, ids_t, enc_t = torch.tensor(images, requires_grad=False), torch.tensor(tokens), torch.tensor(enc)
    itm = model(pixel_values=px, input_ids=enc_t, attention_mask=(enc_t != 0).long(),
                use_itm_head=True).itm_score
    sim = model(pixel_values=px, input_ids=ids_t, attention_mask=(ids_t != 0).long(),
                use_itm_head=False).itm_score
    (itm.square().sum() + sim.square().sum()).backward()
    partial = hf_blip.convert_hf_blip(model.state_dict(), model.config)
    assert "dec_attn" not in partial["text"]["layer_0"] and "temp" not in partial
    fm, params = _fmjax(model, partial)
    x, t, e = (jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens), jnp.asarray(enc))

    def outputs(p):
        v = {"params": p}
        itm_fm = fm.apply(v, fm.apply(v, x, method=fm.image_tokens), e, method=fm.itm_logits)
        sim_fm = fm.apply(v, x, method=fm.encode_image) @ fm.apply(v, t, method=fm.encode_text).T
        return itm_fm, sim_fm

    itm_fm, sim_fm = jax.jit(outputs)(params)
    np.testing.assert_allclose(itm_fm, itm.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sim_fm, sim.detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(o ** 2) for o in outputs(p))))(params)
    hf_grads = hf_blip.convert_hf_blip(_grads_state_dict(model), model.config)
    assert _compare_grads(grads, hf_grads) > 50


def test_caption_logits_match_transformers_captioner():
    model = _model(transformers.BlipForConditionalGeneration)
    images, tokens = _inputs()
    dec = tokens.copy()
    dec[:, 0] = DEC
    dec_t = torch.tensor(dec)
    logits = model(pixel_values=torch.tensor(images), input_ids=dec_t,
                   attention_mask=(dec_t != 0).long()).logits
    mask = torch.tensor(dec != 0)[..., None]
    (logits.square() * mask).sum().backward()
    partial = hf_blip.convert_hf_blip(model.state_dict(), model.config)
    assert "attn" not in partial["text"]["layer_0"] and "lm_head" in partial["text"]
    fm, params = _fmjax(model, partial)
    x, d = jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(dec)

    def lm(p):
        v = {"params": p}
        return fm.apply(v, fm.apply(v, x, method=fm.image_tokens), d, method=fm.lm_logits)

    out = jax.jit(lm)(params)
    valid = dec != 0  # transformers' padded queries see no keys at all there; fmjax's see their own
    np.testing.assert_allclose(np.asarray(out)[valid], logits.detach().numpy()[valid], rtol=1e-5,
                               atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(lm(p) ** 2 * jnp.asarray(valid)[..., None])))(params)
    hf_grads = hf_blip.convert_hf_blip(_grads_state_dict(model), model.config)
    assert _compare_grads(grads, hf_grads) > 50
