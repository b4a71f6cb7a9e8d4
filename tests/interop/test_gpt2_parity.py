"""fmjax.models.decoder.Decoder against transformers' GPT2LMHeadModel with random weights,
converted by fmjax.interop.hf_gpt2: logits, the LM loss and its gradients (float32); cached
step-by-step decoding equals the full forward; greedy generation equals HF's
``generate(do_sample=False)`` and its beam search; cross-attention (``add_cross_attention``) logits; and the
``model_init`` format ``hf_gpt2``; rotary positions against transformers' Llama rotary."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_gpt2  # noqa: E402
from fmjax.models import generate  # noqa: E402
from fmjax.models import scan as scan_lib  # noqa: E402
from fmjax.models.decoder import Decoder, apply_rotary  # noqa: E402
from fmjax.models.registry import build_model, capabilities  # noqa: E402

VOCAB, POSITIONS, EOS = 97, 32, 96


def _hf(cross=False):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                  n_positions=POSITIONS, bos_token_id=EOS, eos_token_id=EOS,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  add_cross_attention=cross)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:  # norms away from their identity init
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    return cfg, model.eval()


def _tokens(b=2, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (b, t), generator=g)


def _setup(cross=False):
    cfg, model = _hf(cross)
    params = hf_gpt2.convert_hf_gpt2(model.state_dict(), cfg)
    fm = Decoder(**hf_gpt2.decoder_kwargs_from_hf_config(cfg))
    return cfg, model, fm, params


def test_logits_loss_and_gradient_parity():
    cfg, model, fm, params = _setup()
    ids = _tokens()
    model.zero_grad()
    out_t = model(input_ids=ids, labels=ids)
    out_t.loss.backward()
    x = jnp.asarray(ids.numpy())

    def loss_fn(p):
        logits = fm.apply({"params": p}, x)["logits"]
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.take_along_axis(logp, x[:, 1:, None], -1).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(logits), out_t.logits.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), out_t.loss.item(), atol=1e-5, rtol=1e-6)
    scanned = fm.clone(scan_layers=True).apply({"params": scan_lib.stack_layers(params)}, x)["logits"]
    np.testing.assert_allclose(np.asarray(scanned), out_t.logits.detach().numpy(), atol=1e-5, rtol=0)
    # wte gets gradient from the input embedding and the tied output projection
    tw = model.transformer
    np.testing.assert_allclose(np.asarray(grads["token_embed"]["embedding"]),
                               tw.wte.weight.grad.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["pos_embed"]), tw.wpe.weight.grad.numpy(),
                               atol=1e-6, rtol=0)
    c_attn = tw.h[1].attn.c_attn.weight.grad.numpy()          # (D, 3D): q | k | v
    np.testing.assert_allclose(np.asarray(grads["block_1"]["attn"]["key"]["kernel"]).reshape(64, 64),
                               c_attn[:, 64:128], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["block_0"]["mlp"]["fc2"]["kernel"]),
                               tw.h[0].mlp.c_proj.weight.grad.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["norm"]["scale"]), tw.ln_f.weight.grad.numpy(),
                               atol=1e-6, rtol=0)


def test_cached_decoding_equals_full_forward():
    _, _, fm, params = _setup()
    x = jnp.asarray(_tokens(t=10).numpy())
    full = fm.apply({"params": params}, x)["logits"]
    dec = fm.clone(decode=True)
    cache = generate.init_cache(fm, 2, 10)
    got = []
    out, mut = dec.apply({"params": params, "cache": cache}, x[:, :4], mutable=["cache"])
    got.append(out["logits"])               # a 4-token prefill, then one token per step
    for i in range(4, 10):
        out, mut = dec.apply({"params": params, **mut}, x[:, i:i + 1], mutable=["cache"])
        got.append(out["logits"])
    assert int(mut["cache"]["cache_index"]) == 10
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, 1)), np.asarray(full), atol=1e-5, rtol=0)


def test_greedy_generation_equals_hf_generate():
    _, model, fm, params = _setup()
    prompt = _tokens(b=3, t=5, seed=3)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                             do_sample=False, pad_token_id=EOS, eos_token_id=EOS).numpy()
    got = np.asarray(generate.sample(fm, params, prompt.numpy(), 12, greedy=True,
                                     eos_token_id=EOS))
    assert got.shape == (3, 17)
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    assert (got[:, ref.shape[1]:] == EOS).all()   # HF stops when every row is done; we pad


def test_left_padded_prompts_equal_hf():
    """A batch of prompts of different lengths, left-padded with an attention mask: the logits
    at real tokens and greedy generation equal transformers' (which counts positions over the
    real tokens in ``generate``; the forward is given the same position_ids)."""
    _, model, fm, params = _setup()
    prompt = _tokens(b=3, t=6, seed=4)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    mask[2, :1] = 0
    prompt = prompt.masked_fill(mask == 0, EOS)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_logits = model(input_ids=prompt, attention_mask=mask, position_ids=position_ids).logits
        ref = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=EOS, eos_token_id=EOS).numpy()
    real = mask.numpy() > 0
    out = fm.apply({"params": params}, jnp.asarray(prompt.numpy()), attention_mask=real)["logits"]
    np.testing.assert_allclose(np.asarray(out)[real], ref_logits.numpy()[real], atol=1e-5, rtol=0)
    got = np.asarray(generate.sample(fm, params, prompt.numpy(), 8, greedy=True,
                                     eos_token_id=EOS, attention_mask=real))
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    assert (got[:, ref.shape[1]:] == EOS).all()


def test_beam_search_equals_hf_beam_search():
    """While no hypothesis ends (HF keeps finished ones in a separate pool, fmjax lets them
    compete for the beams: see generate.beam_search), both are the same beam search, and the
    scores are the same sum log p / new tokens ** length_penalty."""
    _, model, fm, params = _setup()
    prompt = _tokens(b=3, t=5, seed=3)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             num_beams=4, do_sample=False, pad_token_id=EOS, eos_token_id=EOS,
                             length_penalty=1.0, output_scores=True, return_dict_in_generate=True)
    seqs = ref.sequences.numpy()
    assert not (seqs[:, 5:] == EOS).any()
    got, scores = generate.beam_search(fm, params, prompt.numpy(), 8, num_beams=4, eos_token_id=EOS)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), seqs)
    np.testing.assert_allclose(np.asarray(scores[:, 0]), ref.sequences_scores.numpy(), atol=1e-5)


def test_cross_attention_parity():
    cfg, model, fm, params = _setup(cross=True)
    assert fm.cross_attention_every == 1
    ids = _tokens(t=8)
    g = torch.Generator().manual_seed(5)
    enc = torch.randn(2, 6, 64, generator=g)
    enc_mask = torch.ones(2, 6, dtype=torch.long)
    enc_mask[1, 4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits
    out = fm.apply({"params": params}, jnp.asarray(ids.numpy()), context=jnp.asarray(enc.numpy()),
                   context_mask=jnp.asarray(enc_mask.numpy()) > 0)["logits"]
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5, rtol=0)


def test_registry_and_model_init_format(tmp_path):
    cfg, model, _, params = _setup()
    fm = build_model(dict(name="decoder", **hf_gpt2.decoder_kwargs_from_hf_config(cfg)))
    assert "causal_lm" in capabilities(fm) and isinstance(fm, Decoder)
    from fmjax.train import model_init
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    flat, _ = model_init.read_source(dict(torch=str(tmp_path / "pytorch_model.bin"), format="hf_gpt2"))
    want = model_init.flatten(params, "params")
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat[k]), want[k])


def test_converter_rejects_a_wrong_state_dict():
    cfg, model, _, _ = _setup()
    sd = dict(model.state_dict())
    sd.pop("transformer.h.0.ln_1.weight")
    sd["transformer.h.0.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="h.0.ln_1.weight.*h.0.extra"):
        hf_gpt2.convert_hf_gpt2(sd, cfg)


def test_rotary_equals_transformers_llama_rotary():
    """``position='rotary'`` uses the rotate-half layout of transformers' Llama / GPT-NeoX."""
    from transformers.models.llama import modeling_llama as llama
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0,
                                   max_position_embeddings=32)
    rope = llama.LlamaRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 4, 9, 16, generator=g)  # B H L D
    pos = torch.arange(3, 12)[None].expand(2, -1)
    cos, sin = rope(q, pos)
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, cos, sin)
    for x, ref in ((q, q_ref), (k, k_ref)):
        got = apply_rotary(jnp.asarray(x.permute(0, 2, 1, 3).numpy()), jnp.arange(3, 12))
        np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 1, 3).numpy(), atol=1e-5)
