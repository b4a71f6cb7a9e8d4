"""DiT: presets, adaLN-Zero init, conditioning, logical axes, sharding, and numerical
parity with diffusers' DiTTransformer2DModel (an independent port of the reference)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.dit import DiT, dit_kwargs
from fmjax.models.registry import build_model
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules, param_shardings
from fmjax.testing import normal_images, perturb
from fmjax.train.state import mesh_context

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=2)


def _x(b=2, size=8, c=4, seed=0):
    return normal_images(b, size, c, seed)


def _perturb(params, seed=1, scale=0.1):
    return perturb(params, seed, scale)


@pytest.fixture(scope="module")
def cond_model():
    model = DiT(**TINY, num_classes=3, context_dim=5)
    t = jnp.array([3, 900])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), _x(), t))["params"]
    apply = jax.jit(lambda p, x, t, y, ctx: model.apply({"params": p}, x, t, y=y, context=ctx))
    return model, params, _perturb(params), apply


def test_presets_and_registry():
    assert dit_kwargs("XL/2") == dict(width=1152, depth=28, num_heads=16, mlp_dim=4608,
                                      patch_size=2)
    assert dit_kwargs("S/8", depth=2)["depth"] == 2
    for bad in ("XL/16", "M/2", "B"):
        with pytest.raises(ValueError, match="valid"):
            dit_kwargs(bad)
    model = build_model(dict(name="dit", variant="XL/2", num_classes=1000, learn_sigma=True))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                              jnp.zeros((1,)))
    n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    # The paper's DiT-XL/2 count, 675,129,632, includes the frozen 256x1152 pos_embed
    # buffer, which fmjax computes on the fly.
    assert n == 675_129_632 - 256 * 1152


def test_adaln_zero_output_is_zero_at_init(cond_model):
    model, init_params, _, apply = cond_model
    out = apply(init_params, _x(), jnp.array([5, 6]), jnp.array([0, 1]), jnp.ones((2, 5)))
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)
    for name in ("blocks_0", "blocks_1", "final_layer"):
        np.testing.assert_array_equal(init_params[name]["adaLN_modulation"]["kernel"], 0.0)
    out, _ = jax.eval_shape(DiT(**TINY, learn_sigma=True).init_with_output,
                            jax.random.PRNGKey(0), _x(size=4, c=3), 7)  # scalar t
    assert out.shape == (2, 4, 4, 6)


def test_conditioning_and_null_class(cond_model):
    model, _, params, apply = cond_model
    x, t, y = _x(), jnp.array([3, 900]), jnp.array([0, 1])
    ctx = jax.random.normal(jax.random.PRNGKey(3), (2, 5))
    base = np.asarray(apply(params, x, t, y, ctx))
    assert np.abs(base).max() > 0
    other = np.asarray(apply(params, x, t, jnp.array([2, 1]), ctx))
    assert np.abs(base[0] - other[0]).max() > 1e-4
    np.testing.assert_allclose(base[1], other[1], atol=1e-6)
    assert np.abs(base - np.asarray(apply(params, x, t, y, -ctx))).max() > 1e-4
    assert np.abs(base - np.asarray(apply(params, x, t + 1, y, ctx))).max() > 1e-4
    null = jnp.full((2,), model.num_classes)
    np.testing.assert_allclose(apply(params, x, t, None, None),
                               apply(params, x, t, null, jnp.zeros((2, 5))), atol=1e-6)
    assert params["y_embedder"]["embedding"].shape == (4, 32)


def test_logical_axes_on_every_param():
    model = DiT(**TINY, num_classes=3, context_dim=5)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), _x(), jnp.zeros((2,)))
    leaves = jax.tree_util.tree_flatten_with_path(
        abstract["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
    assert leaves and all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim
                          for _, v in leaves)
    names = {jax.tree_util.keystr(p): v.names for p, v in leaves}
    assert names["['blocks_1']['adaLN_modulation']['kernel']"] == ("embed", "mlp")
    assert names["['final_layer']['linear']['kernel']"] == ("embed", "patch")


def test_sharded_fsdp_and_remat_match_single_device(cond_model):
    model, _, params, apply = cond_model
    mesh = make_mesh(dict(data=2, fsdp=4), jax.devices()[:8])
    rules = get_rules("fsdp")
    x, t = _x(b=8), jnp.arange(8) * 100
    y, ctx = jnp.arange(8) % 4, jax.random.normal(jax.random.PRNGKey(3), (8, 5))
    remat = DiT(**TINY, num_classes=3, context_dim=5, remat=True)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(remat.init, jax.random.PRNGKey(0), x, t)["params"]
    sharded = jax.device_put(params, param_shardings(boxed, mesh, rules))
    assert sharded["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec[0] == "fsdp"
    with mesh_context(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, *a: remat.apply({"params": p}, *a[:2], y=a[2], context=a[3]))(
            sharded, x, t, y, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply(params, x, t, y, ctx)),
                               atol=2e-5, rtol=1e-5)


def _from_diffusers(sd, heads):
    """DiTTransformer2DModel state dict -> DiT params (test-only mapping). diffusers gives
    every block its own copy of the t / y embedders; block 0's is the one used here."""
    g = {k: v.detach().numpy() for k, v in sd.items()}

    def lin(name):
        return {"kernel": g[name + ".weight"].T, "bias": g[name + ".bias"]}

    def qkv(name):
        w = g[name + ".weight"].T
        return {"kernel": w.reshape(w.shape[0], heads, -1),
                "bias": g[name + ".bias"].reshape(heads, -1)}

    w = g["pos_embed.proj.weight"]
    emb = "transformer_blocks.0.norm1.emb."
    params = {
        "x_embedder": {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
                                "bias": g["pos_embed.proj.bias"]}},
        "t_embedder": {"linear_1": lin(emb + "timestep_embedder.linear_1"),
                       "linear_2": lin(emb + "timestep_embedder.linear_2")},
        "y_embedder": {"embedding": g[emb + "class_embedder.embedding_table.weight"]},
        "final_layer": {"adaLN_modulation": lin("proj_out_1"), "linear": lin("proj_out_2")},
    }
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in g:
        b = f"transformer_blocks.{i}."
        out = lin(b + "attn1.to_out.0")
        out["kernel"] = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])
        params[f"blocks_{i}"] = {
            "adaLN_modulation": lin(b + "norm1.linear"),
            "attn": {"query": qkv(b + "attn1.to_q"), "key": qkv(b + "attn1.to_k"),
                     "value": qkv(b + "attn1.to_v"), "out": out},
            "mlp": {"fc1": lin(b + "ff.net.0.proj"), "fc2": lin(b + "ff.net.2")},
        }
        i += 1
    return params


def test_matches_diffusers_dit():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in ref.parameters():  # every weight random, the adaLN-Zero ones too
            std = 1.5 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.3
            p.copy_(torch.randn_like(p) * std)
        sd = ref.state_dict()
        for k in list(sd):  # one shared t / y embedder, as in the reference DiT
            if k.startswith("transformer_blocks.1.norm1.emb."):
                sd[k].copy_(sd[k.replace("blocks.1.", "blocks.0.")])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([10, 999]), torch.tensor([4, 5])  # 5 is the null class
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample.permute(0, 2, 3, 1).numpy()
    model = DiT(**TINY, num_classes=5, learn_sigma=True, freq_shift=1.0)  # diffusers' shift
    got = np.asarray(jax.jit(model.apply)({"params": _from_diffusers(sd, 2)},
                                          jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                                          jnp.asarray(t.numpy()), jnp.asarray(y.numpy())))
    err = np.abs(got - want).max()
    print("DiT vs diffusers max|diff|", err, "max|ref|", np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_bf16_compute_keeps_f32_params():
    model = build_model(dict(name="dit", variant="S/2", depth=1, num_classes=2),
                        dtype="bfloat16")
    out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), _x(),
                                    jnp.zeros((2,)))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 8, 4)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.meta.unbox(variables)))
