"""Numerical parity of fmjax's UNet with diffusers' UNet2DModel (random weights, float32)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fmjax.interop import diffusers_unet  # noqa: E402
from fmjax.models.unet import UNet  # noqa: E402

RTOL = 1e-4  # max |diff| / max(1, max |ref|)

# DDPM-style: sin first, freq_shift 1, bottom/right-padded downsampling, one attention head.
UNCOND = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None)
# Class-conditional, diffusers defaults elsewhere, plus scale-shift conditioning (the mid
# attention then has no GroupNorm), multi-head attention and a mid-block output scale.
COND = dict(UNCOND, num_class_embeds=5, flip_sin_to_cos=True, freq_shift=0,
            downsample_padding=1, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
            mid_block_scale_factor=1.5, out_channels=6)


def _randomize(model):
    """Every weight random (norm scales, biases, embeddings and conv_out included) so that
    any misplaced tensor changes the output; kernels get std 1.5 / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.5 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _build(cfg):
    torch.manual_seed(0)
    return _randomize(diffusers.UNet2DModel(**cfg))


def _nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _compare(ref, params, labels=None):
    fm = UNet(**diffusers_unet.unet_kwargs_from_diffusers_config(ref.config))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, ref.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([0, 17, 999])
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample.permute(0, 2, 3, 1).numpy()
    got = jax.jit(fm.apply)({"params": params}, _nhwc(x), jnp.asarray(t.numpy()),
                            None if labels is None else jnp.asarray(labels.numpy()))
    got = np.asarray(got)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    print(f"unet max|diff|={np.abs(got - want).max():.3g} max|ref|={np.abs(want).max():.3g} "
          f"rel={err:.3g}")
    assert err <= RTOL, err
    return got


def test_unconditional_parity():
    ref = _build(UNCOND)
    params = diffusers_unet.convert_diffusers_unet(ref.state_dict(), ref.config)
    _compare(ref, params)


def test_class_conditional_parity_incl_null_class():
    ref = _build(COND)
    kw = diffusers_unet.unet_kwargs_from_diffusers_config(ref.config)
    assert kw["num_classes"] == 4 and kw["resnet_time_scale_shift"] == "scale_shift"
    params = diffusers_unet.convert_diffusers_unet(ref.state_dict(), ref.config)
    assert "group_norm" not in params["mid_block"]["attentions_0"]
    assert params["down_blocks_1"]["attentions_0"]["attn"]["query"]["kernel"].shape == (64, 8, 8)
    got = _compare(ref, params, labels=torch.tensor([0, 3, 4]))  # 4: fmjax's null class
    assert got.shape[-1] == 6
    other = _compare(ref, params, labels=torch.tensor([1, 3, 4]))
    assert np.abs(got[0] - other[0]).max() > 1e-3  # the labels matter at this weight scale


def test_ddpm_cifar10_layout_matches_the_fmjax_default():
    """Google's ddpm-cifar10-32 config converts to exactly ``UNet()`` (DDPM CIFAR-10)."""
    cfg = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
               flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
    ref = diffusers.UNet2DModel(**cfg)
    kw = diffusers_unet.unet_kwargs_from_diffusers_config(ref.config)
    default = UNet()
    for key, value in kw.items():
        want = getattr(default, key)
        assert (value == want) or (key == "out_channels" and value == 3), (key, value, want)
    params = diffusers_unet.convert_diffusers_unet(ref.state_dict(), ref.config)
    abstract = jax.eval_shape(default.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                              jnp.zeros((1,)))["params"]
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract))
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307


def test_deprecated_attention_names_and_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    ref = _build(UNCOND)
    old = {}
    for k, v in ref.state_dict().items():  # hub checkpoints saved before diffusers 0.14
        for new, dep in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, dep)
        old[k] = v.contiguous()
    assert any(".proj_attn." in k for k in old)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    safetensors_torch.save_file(old, path)
    loaded = diffusers_unet.load_safetensors(path)
    params = diffusers_unet.convert_diffusers_unet(loaded, dict(ref.config))
    direct = diffusers_unet.convert_diffusers_unet(ref.state_dict(), ref.config)
    jax.tree.map(np.testing.assert_array_equal, params, direct)


def test_missing_key_and_unsupported_config_are_named():
    ref = _build(UNCOND)
    sd = dict(ref.state_dict())
    sd.pop("up_blocks.0.resnets.1.conv_shortcut.weight")
    with pytest.raises(KeyError, match="up_blocks.0.resnets.1.conv_shortcut.weight"):
        diffusers_unet.convert_diffusers_unet(sd, ref.config)
    for bad, match in ((dict(time_embedding_type="fourier"), "time_embedding_type"),
                       (dict(class_embed_type="timestep"), "class_embed_type"),
                       (dict(down_block_types=("DownBlock2D", "SkipDownBlock2D")),
                        "SkipDownBlock2D"),
                       (dict(up_block_types=("UpBlock2D", "UpBlock2D")), "match level")):
        with pytest.raises(ValueError, match=match):
            diffusers_unet.unet_kwargs_from_diffusers_config(dict(UNCOND, **bad))
