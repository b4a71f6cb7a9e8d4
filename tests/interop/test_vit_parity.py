"""Numerical parity of fmjax ViT with transformers' ViTModel / ViTForImageClassification."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_vit  # noqa: E402
from fmjax.models.vit import ViT  # noqa: E402

ATOL = 1e-5


def _config(**kw):
    return transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
        attn_implementation="eager", **kw)


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def classifier():
    cfg = _config(num_labels=10, architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    model = _perturb(transformers.ViTForImageClassification(cfg))
    params = hf_vit.convert_hf_vit(model.state_dict(), cfg)
    fm = ViT(**hf_vit.vit_kwargs_from_hf_config(cfg))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return cfg, model, params, fm, images


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def test_kwargs_from_config(classifier):
    cfg, model, params, fm, images = classifier
    assert fm.num_classes == 10 and fm.width == 64 and fm.layernorm_eps == 1e-6
    assert hf_vit.vit_kwargs_from_hf_config(_config())["num_classes"] == 0


def test_forward_parity(classifier):
    cfg, model, params, fm, images = classifier
    with torch.no_grad():
        hidden = model.vit(pixel_values=images).last_hidden_state
        logits = model(pixel_values=images).logits
    out = fm.apply({"params": params}, _nhwc(images))
    np.testing.assert_allclose(np.asarray(out["tokens"]), hidden.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits.numpy(), atol=ATOL)
    print("vit tokens max|diff|", np.abs(np.asarray(out["tokens"]) - hidden.numpy()).max(),
          "logits", np.abs(np.asarray(out["logits"]) - logits.numpy()).max())


def test_gradient_parity(classifier):
    cfg, model, params, fm, images = classifier
    g = torch.Generator().manual_seed(2)
    w_tok = torch.randn(2, 17, 64, generator=g)
    w_log = torch.randn(2, 10, generator=g)
    model.zero_grad()
    hidden = model.vit(pixel_values=images).last_hidden_state
    logits = model(pixel_values=images).logits
    ((hidden * w_tok).sum() + (logits * w_log).sum()).backward()
    ref = hf_vit.convert_hf_vit(
        {k: p.grad for k, p in model.named_parameters()}, cfg)

    x, wt, wl = _nhwc(images), jnp.asarray(w_tok.numpy()), jnp.asarray(w_log.numpy())

    def loss(p):
        out = fm.apply({"params": p}, x)
        return (out["tokens"] * wt).sum() + (out["logits"] * wl).sum()

    grads = jax.grad(loss)(params)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) and len(flat) > 30
    worst = 0.0
    for path, gr in flat:
        r = flat_ref[path]
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(gr) / scale, r / scale, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.abs(np.asarray(gr) - r).max()) / scale)
    print("vit grad max|diff|/max(1,|g|max)", worst)


def test_vit_model_with_pooler_and_unprefixed_keys():
    cfg = _config()
    torch.manual_seed(4)
    model = _perturb(transformers.ViTModel(cfg))  # has a pooler; its keys lack 'vit.'
    params = hf_vit.convert_hf_vit(model.state_dict(), cfg)
    assert "head" not in params
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state
    out = ViT(**hf_vit.vit_kwargs_from_hf_config(cfg)).apply({"params": params}, _nhwc(images))
    np.testing.assert_allclose(np.asarray(out["tokens"]), hidden.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), hidden[:, 0].numpy(), atol=ATOL)


def test_missing_key_is_named(classifier):
    cfg, model, *_ = classifier
    sd = dict(model.state_dict())
    sd.pop("vit.layers.1.mlp.fc2.weight")
    with pytest.raises(KeyError, match="layers.1.mlp.fc2.weight"):
        hf_vit.convert_hf_vit(sd, cfg)


def test_load_safetensors_roundtrip(classifier, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg, model, params, *_ = classifier
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = hf_vit.load_safetensors(path)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
    converted = hf_vit.convert_hf_vit(loaded, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
