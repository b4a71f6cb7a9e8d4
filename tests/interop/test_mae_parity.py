"""Numerical parity of fmjax MAE with transformers' ViTMAEForPreTraining (float32, CPU).

Same random weights (biases, LayerNorm and tokens perturbed so they matter),
same noise: identical mask / ids_restore, loss and reconstructions within
1e-5, and gradients of the loss w.r.t. every converted param.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_vit  # noqa: E402
from fmjax.models import layers  # noqa: E402
from fmjax.models.mae import MAE  # noqa: E402

ATOL = 1e-5


def _hf_sincos(dim, grid):
    """HF's own sin-cos table, with the h/w rotation its initialize_weights applies."""
    from transformers.models.vit_mae.modeling_vit_mae import (
        build_2d_sinusoidal_position_embedding)
    pos = build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
    half = dim // 2
    return torch.cat([pos[..., half:], pos[..., :half]], dim=-1)


def _config(norm_pix_loss=True):
    return transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_channels=3, decoder_hidden_size=32,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=64, layer_norm_eps=1e-6, hidden_act="gelu",
        norm_pix_loss=norm_pix_loss, mask_ratio=0.75, attn_implementation="eager")


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    grid = cfg.image_size // cfg.patch_size
    with torch.no_grad():
        # transformers 5 may leave the fixed tables zero on random init: fill them.
        model.vit.embeddings.position_embeddings.copy_(_hf_sincos(cfg.hidden_size, grid)[None])
        model.decoder.decoder_pos_embed.copy_(_hf_sincos(cfg.decoder_hidden_size, grid)[None])
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def setup():
    cfg = _config()
    model = _hf_model(cfg)
    params = hf_vit.convert_hf_vit_mae(model.state_dict(), cfg)
    fm = MAE(**hf_vit.mae_kwargs_from_hf_config(cfg))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 16, generator=g)
    return cfg, model, params, fm, images, noise


def test_hf_sincos_matches_reference_formula():
    for dim, grid in [(64, 4), (32, 4), (768, 14)]:
        ours = layers.get_2d_sincos_pos_embed(dim, grid, cls_token=True)
        np.testing.assert_allclose(ours, _hf_sincos(dim, grid).numpy(), atol=1e-6)
        assert np.all(ours[0] == 0)


def test_converter_rejects_non_sincos_buffer():
    cfg = _config()
    torch.manual_seed(0)
    sd = transformers.ViTMAEForPreTraining(cfg).state_dict()
    sd["vit.embeddings.position_embeddings"] = torch.randn_like(
        sd["vit.embeddings.position_embeddings"])
    with pytest.raises(ValueError, match="sin-cos"):
        hf_vit.convert_hf_vit_mae(sd, cfg)
    hf_vit.convert_hf_vit_mae(sd, cfg, check_pos_embed=False)


def test_converter_names_missing_and_unexpected_keys(setup):
    cfg, model, *_ = setup
    sd = dict(model.state_dict())
    sd.pop("decoder.decoder_pred.bias")
    sd["vit.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as e:
        hf_vit.convert_hf_vit_mae(sd, cfg)
    assert "decoder.decoder_pred.bias" in str(e.value) and "extra.weight" in str(e.value)


def test_forward_parity(setup):
    cfg, model, params, fm, images, noise = setup
    with torch.no_grad():
        ref = model(pixel_values=images, noise=noise)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    out = fm.apply({"params": params}, x, noise=jnp.asarray(noise.numpy()))
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
    np.testing.assert_array_equal(np.asarray(out["ids_restore"]), ref.ids_restore.numpy())
    np.testing.assert_allclose(np.asarray(out["pred"]), ref.logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(float(out["loss"]), float(ref.loss), atol=ATOL, rtol=1e-6)
    with torch.no_grad():
        latent = model.vit(pixel_values=images, noise=noise).last_hidden_state
    np.testing.assert_allclose(np.asarray(out["latent"]), latent.numpy(), atol=ATOL)
    print("mae pred max|diff|", np.abs(np.asarray(out["pred"]) - ref.logits.numpy()).max(),
          "loss |diff|", abs(float(out["loss"]) - float(ref.loss)))


def test_patchify_matches_hf(setup):
    cfg, model, params, fm, images, noise = setup
    ours = layers.patchify(jnp.asarray(images.permute(0, 2, 3, 1).numpy()), 8)
    np.testing.assert_array_equal(np.asarray(ours), model.patchify(images).numpy())
    back = layers.unpatchify(ours, 8)
    np.testing.assert_array_equal(np.asarray(back), images.permute(0, 2, 3, 1).numpy())


def test_gradient_parity(setup):
    cfg, model, params, fm, images, noise = setup
    model.zero_grad()
    model(pixel_values=images, noise=noise).loss.backward()
    # Map torch grads through the (purely linear) converter; frozen buffers get zeros.
    grads_sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p))
                for k, p in model.named_parameters()}
    for k, v in model.state_dict().items():
        grads_sd.setdefault(k, torch.zeros_like(v))
    ref = hf_vit.convert_hf_vit_mae(grads_sd, cfg, check_pos_embed=False)

    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    nz = jnp.asarray(noise.numpy())
    grads = jax.jit(jax.grad(lambda p: fm.apply({"params": p}, x, noise=nz)["loss"]))(params)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) and len(flat) > 40
    worst = 0.0
    for path, g in flat:
        r = flat_ref[path]
        np.testing.assert_allclose(np.asarray(g), r, atol=ATOL, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.abs(np.asarray(g) - r).max()))
    # Tighter, scale-aware: grads here are O(1e-2). Key biases have an exactly
    # zero true gradient (softmax shift invariance), so only round-off there.
    gmax = max(float(np.abs(r).max()) for r in flat_ref.values())
    assert gmax > 1e-3 and worst / gmax < 1e-5
    for path, g in flat:
        r = flat_ref[path]
        if float(np.abs(r).max()) > 1e-8:
            rel = float(np.abs(np.asarray(g) - r).max()) / float(np.abs(r).max())
            assert rel < 1e-4, (jax.tree_util.keystr(path), rel)
    print("mae grad max|diff|", worst, "max|grad|", gmax)


def test_random_noise_and_plain_loss():
    cfg = _config(norm_pix_loss=False)
    model = _hf_model(cfg, seed=3)
    params = hf_vit.convert_hf_vit_mae(model.state_dict(), cfg)
    fm = MAE(**hf_vit.mae_kwargs_from_hf_config(cfg))
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        ref = model(pixel_values=images, noise=noise)
    out = fm.apply({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()),
                   noise=jnp.asarray(noise.numpy()))
    np.testing.assert_allclose(float(out["loss"]), float(ref.loss), atol=ATOL, rtol=1e-6)


def test_old_hub_key_layout(setup):
    cfg, model, params, *_ = setup
    old = {}
    for k, v in model.state_dict().items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        k = k.replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        old[k] = v.numpy()
    converted = hf_vit.convert_hf_vit_mae(old, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
