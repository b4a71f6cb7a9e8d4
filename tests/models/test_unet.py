"""DDPM U-Net: shapes, conditioning, init, logical axes and sharded execution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.registry import build_model
from fmjax.models.unet import CONV_AXES, UNet, timestep_embedding, unet_kwargs
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules, param_shardings
from fmjax.testing import normal_images, perturb
from fmjax.train.state import mesh_context

TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            sample_size=16, num_groups=4, attention_head_dim=8)


def _x(b=2, size=16, c=3, seed=0):
    return normal_images(b, size, c, seed)


def _perturb(params, seed=1, scale=0.1):
    return perturb(params, seed, scale)


def _key(seed=0):
    """rbg keys: the init graph compiles ~3x faster than with threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def cond_model():
    model = UNet(**TINY, num_classes=3, context_dim=5)
    t = jnp.array([3, 900])
    params = nn.meta.unbox(jax.jit(model.init)(_key(), _x(), t))["params"]
    apply = jax.jit(lambda p, x, t, y, ctx: model.apply({"params": p}, x, t, y=y, context=ctx))
    return model, _perturb(params), apply, params


def test_timestep_embedding_ddpm_and_flip():
    t = jnp.array([0.0, 7.0])
    e = np.asarray(timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1.0))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3.0)  # DDPM: / (half - 1)
    np.testing.assert_allclose(e[1], np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]),
                               rtol=1e-5, atol=1e-6)
    f = np.asarray(timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0.0))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4.0)  # DiT / ADM
    np.testing.assert_allclose(f[1], np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]),
                               rtol=1e-5, atol=1e-6)


def test_ddpm_cifar10_defaults_and_param_count():
    model = build_model(dict(name="unet", variant="ddpm_cifar10"))
    assert (model.channels, model.channel_mult, model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert model.attention_levels() == (False, True, False, False) and model.dropout == 0.1
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                              jnp.zeros((1,)))
    n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    assert n == 35_746_307  # Ho et al. CIFAR-10 model (diffusers google/ddpm-cifar10-32)
    assert unet_kwargs("ddpm_256", channel_mult=[1, 2])["channel_mult"] == (1, 2)
    with pytest.raises(ValueError, match="valid"):
        unet_kwargs("ddpm_huge")


def test_shapes_zero_init_and_out_channels(cond_model):
    model, _, apply, init_params = cond_model
    out = apply(init_params, _x(), jnp.array([1, 2]), jnp.array([0, 1]), jnp.ones((2, 5)))
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # conv_out starts at zero (DDPM)
    out, _ = jax.eval_shape(UNet(**TINY, learn_sigma=True).init_with_output,
                            jax.random.PRNGKey(0), _x(), 5)  # a scalar t broadcasts
    assert out.shape == (2, 16, 16, 6)
    out, _ = jax.eval_shape(UNet(**TINY, out_channels=1).init_with_output,
                            jax.random.PRNGKey(0), _x(size=8), jnp.array([0, 1]))
    assert out.shape == (2, 8, 8, 1)  # any size divisible by 2**(levels-1)


def test_class_and_context_conditioning(cond_model):
    model, params, apply, _ = cond_model
    x, t = _x(), jnp.array([3, 900])
    ctx = jax.random.normal(jax.random.PRNGKey(3), (2, 5))
    y = jnp.array([0, 1])
    base = np.asarray(apply(params, x, t, y, ctx))
    assert base.shape == (2, 16, 16, 3) and np.abs(base).max() > 0
    assert np.abs(base - np.asarray(apply(params, x, t, jnp.array([2, 1]), ctx))).max() > 1e-4
    assert np.abs(base - np.asarray(apply(params, x, t, y, ctx * 2))).max() > 1e-4
    assert np.abs(base - np.asarray(apply(params, x, jnp.array([4, 900]), y, ctx))).max() > 1e-4
    # Only sample 0's label changed: sample 1 is untouched.
    np.testing.assert_allclose(np.asarray(apply(params, x, t, jnp.array([2, 1]), ctx))[1],
                               base[1], atol=1e-6)
    # y=None is the null class (index num_classes); context=None is a zero vector.
    null = jnp.full((2,), model.num_classes)
    np.testing.assert_allclose(apply(params, x, t, None, None),
                               apply(params, x, t, null, jnp.zeros((2, 5))), atol=1e-6)
    assert params["class_embedding"]["embedding"].shape == (4, 64)


def test_dropout_only_in_train(cond_model):
    model, params, apply, _ = cond_model
    assert model.dropout == 0.1  # the DDPM default
    x, t, y = _x(), jnp.array([1, 2]), jnp.array([0, 1])
    det = apply(params, x, t, y, None)
    drop = jax.jit(lambda p, r: model.apply({"params": p}, x, t, y=y, train=True,
                                            rngs={"dropout": r}))(params, jax.random.PRNGKey(1))
    assert np.abs(np.asarray(det) - np.asarray(drop)).max() > 1e-4


def test_logical_axes_on_every_param():
    model = UNet(**TINY, num_classes=3, context_dim=5)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), _x(), jnp.zeros((2,)))
    leaves = jax.tree_util.tree_flatten_with_path(
        abstract["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
    assert leaves and all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim
                          for _, v in leaves)
    names = {jax.tree_util.keystr(p): v.names for p, v in leaves}
    assert names["['down_blocks_0']['resnets_0']['conv1']['kernel']"] == CONV_AXES
    assert names["['up_blocks_0']['attentions_1']['attn']['query']['kernel']"] == (
        "embed", "heads", "kv")
    assert names["['class_embedding']['embedding']"] == ("classes", "embed")


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="attention_resolutions"):
        jax.eval_shape(UNet(**dict(TINY, attention_resolutions=(5,))).init,
                       jax.random.PRNGKey(0), _x(), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(UNet(**TINY).init, jax.random.PRNGKey(0), _x(size=15), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(UNet(**TINY).init, jax.random.PRNGKey(0), _x(), jnp.zeros((2,)),
                       y=jnp.zeros((2,), int))


def test_sharded_fsdp_matches_single_device(cond_model):
    model, params, apply, _ = cond_model
    devices = jax.devices()[:8]
    assert len(devices) == 8
    mesh = make_mesh(dict(data=2, fsdp=4), devices)
    rules = get_rules("fsdp")
    x, t = _x(b=8), jnp.arange(8) * 100
    y, ctx = jnp.arange(8) % 4, jax.random.normal(jax.random.PRNGKey(3), (8, 5))
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
    shardings = param_shardings(boxed, mesh, rules)
    sharded = jax.device_put(params, shardings)
    kernel = sharded["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec[2] == "fsdp"  # conv_in dim split over fsdp
    with mesh_context(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, *a: model.apply({"params": p}, *a[:2], y=a[2], context=a[3]))(
            sharded, x, t, y, ctx)
    ref = apply(params, x, t, y, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_bf16_compute_keeps_f32_params():
    model = build_model(dict(name="unet", **TINY, num_classes=2), dtype="bfloat16")
    out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), _x(),
                                    jnp.zeros((2,)))
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.meta.unbox(variables)))
