"""Numerical parity of fmjax ViT with transformers' Dinov2Model / Dinov2WithRegistersModel,
including position-embedding interpolation and last-layer CLS attention maps."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_dinov2, hf_vit  # noqa: E402
from fmjax.models.vit import ViT  # noqa: E402

ATOL = 1e-5
SIZES = [(32, 32), (48, 48), (24, 40)]  # native 8x8 grid, upsampled, down/non-square
HAS_REG = hasattr(transformers, "Dinov2WithRegistersModel")


def _randomize(model, seed):
    """Every parameter random (layerscale around 0.5, norms around 1), so parity can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "lambda1" in name:
                p.copy_(0.5 + 0.3 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "embeddings." not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def _cfg(cls, **kw):
    return cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
               patch_size=4, image_size=32, num_channels=3, layer_norm_eps=1e-6,
               layerscale_value=0.5, hidden_act="gelu", attn_implementation="eager", **kw)


def _build(reg: bool, seed: int):
    if reg:
        cfg = _cfg(transformers.Dinov2WithRegistersConfig, num_register_tokens=4)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        cfg = _cfg(transformers.Dinov2Config)
        model = transformers.Dinov2Model(cfg)
    return cfg, _randomize(model, seed)


@pytest.fixture(scope="module", params=[False] + ([True] if HAS_REG else []),
                ids=["dinov2", "registers"][:1 + HAS_REG])
def pair(request):
    cfg, model = _build(request.param, seed=3 + request.param)
    params = hf_dinov2.convert_hf_dinov2(model.state_dict(), cfg)
    fm = ViT(**hf_dinov2.dinov2_kwargs_from_hf_config(cfg))
    return cfg, model, params, fm


def _images(h, w, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_kwargs_and_param_tree(pair):
    cfg, model, params, fm = pair
    kw = hf_dinov2.dinov2_kwargs_from_hf_config(cfg)
    assert kw["mlp_dim"] == 256 and kw["layerscale"] == 0.5 and kw["layernorm_eps"] == 1e-6
    assert kw["num_registers"] == (4 if "reg_tokens" in params else 0)
    assert kw["pos_interp"] == ("resize" if kw["num_registers"] else "torch_bicubic")
    init = fm.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
    assert shapes(nn.meta.unbox(init)) == shapes(params)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_parity(pair, size):
    cfg, model, params, fm = pair
    images = _images(*size)
    with torch.no_grad():
        ref = model(pixel_values=images)
    out = fm.apply({"params": params}, _nhwc(images))
    np.testing.assert_allclose(np.asarray(out["tokens"]), ref.last_hidden_state.numpy(),
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), ref.pooler_output.numpy(),
                               atol=ATOL)
    print(f"{type(model).__name__} {size} tokens max|diff| "
          f"{_maxdiff(out['tokens'], ref.last_hidden_state.numpy()):.2e} pooler "
          f"{_maxdiff(out['pre_logits'], ref.pooler_output.numpy()):.2e}")


@pytest.mark.parametrize("reg", [False] + ([True] if HAS_REG else []))
def test_other_interp_would_not_match(reg):
    """The interpolation choice matters: swapping 'resize' / 'torch_bicubic' breaks parity."""
    cfg, model = _build(reg, seed=5)
    params = hf_dinov2.convert_hf_dinov2(model.state_dict(), cfg)
    kw = hf_dinov2.dinov2_kwargs_from_hf_config(cfg)
    kw["pos_interp"] = {"resize": "torch_bicubic", "torch_bicubic": "resize"}[kw["pos_interp"]]
    images = _images(48, 48)
    with torch.no_grad():
        ref = model(pixel_values=images).last_hidden_state.numpy()
    assert _maxdiff(ViT(**kw).apply({"params": params}, _nhwc(images))["tokens"], ref) > 1e-3


def _original_dinov2_interp(self, embeddings, height, width, offset=0.1):
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` (interpolate_offset=0.1,
    no antialias): torch is called with a scale factor, not an output size."""
    pos = self.position_embeddings.float()
    n = pos.shape[1] - 1
    if embeddings.shape[1] - 1 == n and height == width:
        return pos
    m = int(math.sqrt(n))
    h0, w0 = height // self.config.patch_size, width // self.config.patch_size
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
        antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


@pytest.mark.parametrize("size", SIZES[1:], ids=lambda s: f"{s[0]}x{s[1]}")
def test_original_dinov2_offset_interpolation(monkeypatch, size):
    cfg, model = _build(False, seed=6)
    monkeypatch.setattr(type(model.embeddings), "interpolate_pos_encoding",
                        _original_dinov2_interp)
    params = hf_dinov2.convert_hf_dinov2(model.state_dict(), cfg)
    images = _images(*size)
    with torch.no_grad():
        ref = model(pixel_values=images).last_hidden_state.numpy()
    out = ViT(**hf_dinov2.dinov2_kwargs_from_hf_config(cfg, interpolate_offset=0.1)).apply(
        {"params": params}, _nhwc(images))["tokens"]
    no_offset = ViT(**hf_dinov2.dinov2_kwargs_from_hf_config(cfg)).apply(
        {"params": params}, _nhwc(images))["tokens"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)
    assert _maxdiff(no_offset, ref) > 1e-4  # the offset is exercised
    print(f"dinov2 offset=0.1 {size} tokens max|diff| {_maxdiff(out, ref):.2e}")


@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl,remat", [("xla", False), ("dot_product", True)])
def test_attention_maps_match_hf(pair, size, impl, remat):
    cfg, model, params, fm = pair
    fm = fm.clone(attention_impl=impl, remat=remat)
    images = _images(*size)
    with torch.no_grad():
        att = model(pixel_values=images, output_attentions=True).attentions[-1][:, :, 0].numpy()
    maps = fm.apply({"params": params}, _nhwc(images), method=ViT.attention_maps)
    row = fm.apply({"params": params}, _nhwc(images), method=ViT.attention_maps,
                   include_prefix=True)
    prefix = fm.num_prefix_tokens
    grid = (size[0] // 4) * (size[1] // 4)
    assert maps.shape == (2, 4, grid) and row.shape == (2, 4, prefix + grid)
    assert float(maps.min()) >= 0.0
    np.testing.assert_allclose(np.asarray(maps.sum(-1) + row[..., :prefix].sum(-1)), 1.0,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(row), att, atol=ATOL)
    np.testing.assert_allclose(np.asarray(maps), att[..., prefix:], atol=ATOL)
    print(f"{type(model).__name__} {size} {impl} CLS attention max|diff| "
          f"{_maxdiff(row, att):.2e}")


def test_attention_maps_match_hf_vit():
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, layer_norm_eps=1e-6, attn_implementation="eager")
    model = _randomize(transformers.ViTModel(cfg), seed=7)
    params = hf_vit.convert_hf_vit(model.state_dict(), cfg)
    images = _images(32, 32)
    with torch.no_grad():
        att = model(pixel_values=images, output_attentions=True).attentions[-1][:, :, 0, 1:]
    maps = ViT(**hf_vit.vit_kwargs_from_hf_config(cfg)).apply(
        {"params": params}, _nhwc(images), method=ViT.attention_maps)
    np.testing.assert_allclose(np.asarray(maps), att.numpy(), atol=ATOL)
    print(f"ViTModel CLS attention max|diff| {_maxdiff(maps, att.numpy()):.2e}")


def test_safetensors_and_hub_key_names(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg, model = _build(False, seed=8)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    hub = {"dinov2." + k.replace("attention.q_proj", "attention.attention.query")
           .replace("attention.o_proj", "attention.output.dense"): v for k, v in sd.items()}
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file(hub, path)
    converted = hf_dinov2.convert_hf_dinov2(hf_dinov2.load_safetensors(path), cfg)
    direct = hf_dinov2.convert_hf_dinov2(sd, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, direct)


def test_errors_name_the_problem():
    cfg, model = _build(False, seed=9)
    sd = dict(model.state_dict())
    sd.pop("encoder.layer.1.layer_scale2.lambda1")
    with pytest.raises(KeyError, match="layer_scale2.lambda1"):
        hf_dinov2.convert_hf_dinov2(sd, cfg)
    swiglu = _cfg(transformers.Dinov2Config, use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        hf_dinov2.dinov2_kwargs_from_hf_config(swiglu)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        hf_dinov2.convert_hf_dinov2(transformers.Dinov2Model(swiglu).state_dict(), swiglu)
