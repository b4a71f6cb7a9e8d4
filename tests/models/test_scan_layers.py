"""Scan over layers (``scan_layers``) and remat policies (``remat``), ``fmjax.models.scan``.

Scanned and unrolled models give equal outputs and gradients on the same params (the unrolled
params stacked with ``stack_layers``) for the ViT (drop path, layer scale, head), the text
tower, MAE (encoder and decoder), DiT and CLIP; every remat policy gives the no-remat outputs and
gradients; stack / unstack round-trips exactly; in training mode the scanned drop path drops
layer i with the unrolled rate (rising linearly over depth) and independently per layer (rngs
split per layer: masks differ from the unrolled model's, so train mode is compared in
distribution, not value); the stacked params carry the 'layers' logical axis; attention maps,
injection hooks and LLRD work on a scanned model.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fmjax.models import core, inject, scan
from fmjax.models.blocks import Encoder
from fmjax.models.clip import CLIP
from fmjax.models.dit import DiT
from fmjax.models.mae import MAE
from fmjax.models.text import TextTransformer
from fmjax.models.unet import UNet
from fmjax.models.vit import ViT
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules, param_shardings
from fmjax.train import param_groups as pg

VIT = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8)
TOL = 1e-5


def _images(b=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, 32, 32, 3))


def _init(model, *args, **kw):
    """Unboxed params of ``model`` (jitted init: eager init of a tiny model is slower)."""
    return nn.meta.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), *args, **kw))()
                         ["params"])


def _perturb(params, seed=1, scale=0.05):
    """Every param moved off its init (adaLN-Zero / zero heads would hide the blocks)."""
    params = nn.meta.unbox(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _assert_close(a, b, tol=TOL):
    """Equal trees up to float32 rounding: per leaf, max |a - b| <= tol * max |b| plus
    tol / 100 of the whole tree's max |b| (scan and unroll, like jit and no jit, sum in other
    orders; gradients that are 0 in exact arithmetic, e.g. of a key bias, are rounding noise of
    the size of their neighbours'). A wrong layer or rate would be off by O(1)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    top = max(float(np.abs(np.asarray(y, np.float64)).max(initial=0.0)) for y in jax.tree.leaves(b))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        err, scale = np.abs(x - y).max(initial=0.0), np.abs(y).max(initial=0.0)
        assert err <= tol * scale + tol / 100 * top, (jax.tree_util.keystr(path), err, scale, top)


def _check_equal(cls, kwargs, args, loss, perturb=False, apply_kw=None):
    """Outputs and gradients of ``loss`` of the unrolled model and of the scanned one on the
    stacked params agree; returns the unrolled params."""
    apply_kw = apply_kw or {}
    unrolled, scanned = cls(**kwargs), cls(**kwargs, scan_layers=True)
    params = _init(unrolled, *args, **apply_kw)
    if perturb:
        params = _perturb(params)
    stacked = scan.stack_layers(params)
    # the scanned model's own init has exactly the stacked layout (names, shapes)
    own = jax.eval_shape(lambda: _init(scanned, *args, **apply_kw))
    assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, stacked)

    def f(model):
        return lambda p: loss(model.apply({"params": p}, *args, **apply_kw))
    apply = lambda model, p: model.apply({"params": p}, *args, **apply_kw)
    _assert_close(jax.jit(apply, static_argnums=0)(scanned, stacked),
                  jax.jit(apply, static_argnums=0)(unrolled, params))
    g_u = jax.jit(jax.grad(f(unrolled)))(params)
    g_s = jax.jit(jax.grad(f(scanned)))(stacked)
    _assert_close(g_s, scan.stack_layers(g_u))
    in_stacks = [x for kp, x in jax.tree_util.tree_flatten_with_path(g_s)[0]
                 if any(str(getattr(k, "key", "")).endswith("_stack") for k in kp)]
    assert in_stacks and all(float(jnp.abs(x[-1]).max()) > 0 for x in in_stacks
                             if x.ndim > 1)  # the last layer's weights get gradients too
    return params


def _sq(*keys):
    """A fixed random linear functional of the outputs ``keys`` (a sum of squares after a
    LayerNorm would make the input-side gradients tiny cancellations, all rounding)."""
    def loss(out):
        total = 0.0
        for i, k in enumerate(keys):
            r = jax.random.normal(jax.random.PRNGKey(100 + i), out[k].shape)
            total = total + jnp.sum(out[k].astype(jnp.float32) * r)
        return total
    return loss


def test_vit_scanned_equals_unrolled():
    kw = dict(VIT, num_classes=5, drop_path=0.3, layerscale=0.5, num_registers=1)
    params = _check_equal(ViT, kw, (_images(),), _sq("logits", "tokens"))
    assert "block_2" in params["encoder"] and "block_stack" not in params["encoder"]


def test_text_tower_scanned_equals_unrolled():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 7), 0, 50)
    kw = dict(vocab_size=50, context_length=8, width=32, depth=2, num_heads=2, mlp_dim=64,
              embed_dim=16, drop_path=0.1)
    _check_equal(TextTransformer, kw, (tokens,), _sq("embedding", "tokens"))


def test_mae_scanned_equals_unrolled():
    kw = dict(VIT, decoder_width=32, decoder_depth=2, decoder_heads=2, mask_ratio=0.5,
              drop_path=0.1)
    noise = jax.random.uniform(jax.random.PRNGKey(3), (2, 16))
    params = _check_equal(MAE, kw, (_images(),), lambda o: o["loss"] + _sq("latent")(o),
                          apply_kw=dict(noise=noise))
    assert {"block_0", "block_1"} <= set(params["decoder"])
    assert set(scan.stack_layers(params)["decoder"]) == {"block_stack", "norm"}


def test_dit_scanned_equals_unrolled():
    kw = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4, num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    t, y = jnp.array([3, 500]), jnp.array([0, 3])
    params = _check_equal(DiT, kw, (x, t, y), lambda o: _sq("o")(dict(o=o)), perturb=True)
    assert "blocks_2" in params and "blocks_stack" in scan.stack_layers(params)


def test_convnext_scanned_equals_unrolled():
    """One stack per stage (stage_{i}_block_stack), with drop path, layer scale and V2's GRN on
    (every kind of block param)."""
    from fmjax.models.convnext import ConvNeXt
    kw = dict(depths=(2, 3), dims=(8, 16), num_classes=5, drop_path=0.2, layer_scale_init=0.5, grn=True)
    params = _check_equal(ConvNeXt, kw, (_images(),), _sq("logits", "patch_tokens"), perturb=True)
    stacked = scan.stack_layers(params)
    assert {"stage_0_block_stack", "stage_1_block_stack"} <= set(stacked)
    assert {"gamma", "grn", "dwconv"} <= set(stacked["stage_1_block_stack"])
    assert not any(k.startswith("stage_") and k[-1].isdigit() for k in stacked)
    np.testing.assert_array_equal(scan.unstack_layers(stacked)["stage_1_block_1"]["fc1"]["kernel"],
                                  params["stage_1_block_1"]["fc1"]["kernel"])


@pytest.mark.parametrize("version", [1, 2])
def test_swin_scanned_equals_unrolled(version):
    """One stack per stage; the scanned body switches the window shift on for odd layers (a
    16x16 then 8x8 grid with window 4, so both stages shift; an odd depth ends on a plain
    block), v1's bias table and v2's cosine attention / CPB alike."""
    from fmjax.models.swin import Swin
    kw = dict(embed_dim=8, depths=(2, 3), num_heads=(2, 2), window_size=4, patch_size=2,
              num_classes=5, drop_path=0.2, version=version)
    params = _check_equal(Swin, kw, (_images(),), _sq("logits", "patch_tokens"), perturb=True)
    stacked = scan.stack_layers(params)
    assert {"stage_0_block_stack", "stage_1_block_stack", "stage_0_merge"} <= set(stacked)
    assert stacked["stage_1_block_stack"]["mlp"]["fc1"]["kernel"].shape[0] == 3


def test_tinyvit_scanned_equals_unrolled():
    """One stack per stage, the MBConv stage and the attention stages; BatchNorm's
    ``batch_stats`` are stacked like the params: train-mode outputs, gradients and the updated
    running statistics agree, and eval mode on those statistics."""
    from fmjax.models.tinyvit import TinyViT
    kw = dict(embed_dims=(8, 16), depths=(2, 3), num_heads=(1, 2), window_sizes=(4, 2), num_classes=5)
    unrolled, scanned = TinyViT(**kw), TinyViT(**kw, scan_layers=True)
    x = _images(4)
    v = jax.jit(lambda: unrolled.init(jax.random.PRNGKey(0), x))()
    params, stats = _perturb(v["params"]), nn.meta.unbox(v["batch_stats"])
    sp, ss = scan.stack_layers(params), scan.stack_layers(stats)
    own = jax.eval_shape(lambda: nn.meta.unbox(scanned.init(jax.random.PRNGKey(0), x)))
    assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, dict(params=sp, batch_stats=ss))
    loss = _sq("logits", "patch_tokens")

    def train(model):
        def f(p, s):
            out, new = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
            return loss(out), new["batch_stats"]
        return jax.jit(jax.value_and_grad(f, has_aux=True))
    (l_u, s_u), g_u = train(unrolled)(params, stats)
    (l_s, s_s), g_s = train(scanned)(sp, ss)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-5)
    _assert_close(g_s, scan.stack_layers(g_u))
    _assert_close(s_s, scan.stack_layers(s_u))
    ev = lambda m, p, s: m.apply({"params": p, "batch_stats": s}, x)["logits"]  # noqa: E731
    _assert_close(jax.jit(ev, static_argnums=0)(scanned, sp, s_s),
                  jax.jit(ev, static_argnums=0)(unrolled, params, s_u))
    assert {"stage_0_block_stack", "stage_1_block_stack"} <= set(sp)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_convnext_train_mode_drop_path_rates_per_block(scan_layers):
    """Stochastic depth rises over ALL blocks (0, 0.25, 0.5 over stages of 1 and 2 blocks),
    the scanned stage slicing the same rates; measured on each block's branch, a constant 1."""
    from fmjax.models.convnext import ConvNeXt
    n, rate = 4000, 0.5
    model = ConvNeXt(depths=(1, 2), dims=(4, 4), drop_path=rate, scan_layers=scan_layers)
    x = jnp.zeros((n, 8, 8, 3))
    params = _init(ConvNeXt(depths=(1, 2), dims=(4, 4)), x[:1])
    zero = jax.tree.map(jnp.zeros_like, params)
    # every branch outputs exactly 1 per channel: zero weights, fc2's bias 1, gamma 1
    for name in ("stage_0_block_0", "stage_1_block_0", "stage_1_block_1"):
        zero[name]["fc2"]["bias"] = jnp.ones_like(zero[name]["fc2"]["bias"])
        zero[name]["gamma"] = jnp.ones_like(zero[name]["gamma"])
    p = scan.stack_layers(zero) if scan_layers else zero
    maps = jax.jit(lambda p: model.apply({"params": p}, x, train=True,
                                         rngs={"dropout": jax.random.PRNGKey(7)})["feature_maps"])(p)
    stage0 = np.asarray(maps[0])[:, 0, 0, 0]                       # block 0 only (rate 0)
    np.testing.assert_array_equal(stage0, np.ones(n))
    # stage 1: input 0 (stem / downsample weights are 0) + branch 1 (rate 0.25) + branch 2 (0.5)
    out = np.asarray(maps[1])[:, 0, 0, 0]
    values = {0.0: 0.25 * 0.5, 1 / 0.75: 0.75 * 0.5, 2.0: 0.25 * 0.5, 1 / 0.75 + 2.0: 0.75 * 0.5}
    for v, p_expected in values.items():
        frac = np.isclose(out, v, rtol=1e-5).mean()
        assert abs(frac - p_expected) < 4 * np.sqrt(p_expected * (1 - p_expected) / n) + 1e-9, (v, frac)


def test_clip_scanned_equals_unrolled():
    kw = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, embed_dim=16,
              text_width=32, text_depth=2, text_heads=2, text_mlp_dim=64, vocab_size=50,
              context_length=8)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 50)
    _check_equal(CLIP, kw, (_images(), tokens), _sq("logits_per_image"))
    params = jax.eval_shape(lambda: _init(CLIP(**kw, scan_layers=True), _images(), tokens))
    assert "block_stack" in params["image"]["encoder"] and "block_stack" in params["text"]["encoder"]


# -- remat policies --------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [pytest.param(False, marks=pytest.mark.slow), True])
def test_remat_policies_equal_no_remat(scan_layers):
    x = _images()
    base = ViT(**dict(VIT, depth=2), num_classes=3, drop_path=0.2, scan_layers=scan_layers)
    params = _init(base, x)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    loss = lambda m, train: lambda p: _sq("logits", "tokens")(
        m.apply({"params": p}, x, train=train, rngs=rngs))
    out_and_grad = lambda m, train=False: jax.jit(jax.value_and_grad(loss(m, train)))(params)
    ref, ref_train = out_and_grad(base), out_and_grad(base, True)
    assert not np.allclose(ref[0], ref_train[0])  # drop path is on in training
    # ('full' is True's wrapper: test_remat_policies_reach_jax_checkpoint)
    for remat in (True, "dots_saveable", "dots_with_no_batch_dims_saveable", "offload"):
        _assert_close(out_and_grad(base.clone(remat=remat)), ref)
    # training mode (drop path, its rng inside the rematerialised blocks): the same masks
    _assert_close(out_and_grad(base.clone(remat="dots_saveable"), True), ref_train)


def _denoiser_grads(model, params, x, t):
    loss = lambda q: _sq("o")(dict(o=model.apply({"params": q}, x, t)))
    return jax.jit(jax.grad(loss))(params)


def test_dit_remat_policy_scanned():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    t = jnp.array([3, 500])
    dit = DiT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
    p = _perturb(_init(dit, x, t))
    got = _denoiser_grads(dit.clone(remat="dots_with_no_batch_dims_saveable", scan_layers=True),
                          scan.stack_layers(p), x, t)
    _assert_close(got, scan.stack_layers(_denoiser_grads(dit, p, x, t)))


@pytest.mark.slow
def test_unet_remat_policy():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    t = jnp.array([3, 500])
    unet = UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_groups=4, sample_size=16, dropout=0.0)
    p = _perturb(_init(unet, x, t))
    _assert_close(_denoiser_grads(unet.clone(remat="dots_saveable"), p, x, t),
                  _denoiser_grads(unet, p, x, t))


def test_unet_refuses_scan_layers():
    x, t = jnp.zeros((1, 16, 16, 3)), jnp.array([3])
    unet = UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_groups=4, sample_size=16, scan_layers=True)
    with pytest.raises(ValueError, match="UNet does not support scan_layers=True"):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_reach_jax_checkpoint(scan_layers):
    """Each name puts its jax policy on the blocks' checkpoint (the equality test above cannot
    tell a policy from none: every policy computes the same numbers)."""
    x = jnp.zeros((1, 16, 16, 3))
    want = {False: None, "none": None, True: "policy=None", "full": "policy=None",
            "dots_saveable": "DotsSaveable(only_if_no_batch_dims=False)",
            "dots_with_no_batch_dims_saveable": "DotsSaveable(only_if_no_batch_dims=True)",
            "offload": "offload_dot_with_no_batch_dims"}
    for remat, token in want.items():
        model = ViT(**dict(VIT, patch_size=8, depth=2), remat=remat, scan_layers=scan_layers)
        p = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        text = str(jax.make_jaxpr(lambda q: model.apply(q, x))(p))
        assert ("scan[" in text) == scan_layers
        if token is None:
            assert "policy=" not in text, remat
        else:
            assert text.count(token) == (1 if scan_layers else 2), (remat, token)


@pytest.mark.parametrize("bad", ["dots", "Full", 1.5])
def test_unknown_remat_lists_valid(bad):
    with pytest.raises(ValueError, match=r"Unknown remat .*valid: False, True, 'none', 'full', "
                                         r"'dots_saveable', 'dots_with_no_batch_dims_saveable', "
                                         r"'offload'\."):
        ViT(**VIT, remat=bad).init(jax.random.PRNGKey(0), _images())


def test_remat_none_is_false_and_offload_needs_host_memory(monkeypatch):
    assert scan.remat_policy("none") == (False, None) == scan.remat_policy(False)
    assert scan.remat_policy(True) == (True, None) == scan.remat_policy("full")
    monkeypatch.setattr(scan, "_has_pinned_host", lambda: False)
    with pytest.raises(ValueError, match="remat='offload' needs host offloading"):
        scan.remat_policy("offload")


# -- layouts ---------------------------------------------------------------------------------

def test_stack_unstack_round_trip_is_exact():
    model = MAE(**VIT, decoder_width=32, decoder_depth=2, decoder_heads=2)
    unrolled = jax.tree.map(np.asarray, _init(model, _images()))
    stacked = scan.stack_layers(unrolled)
    assert set(stacked["encoder"]) == {"block_stack", "norm"}
    k = stacked["encoder"]["block_stack"]["attn"]["query"]["kernel"]
    assert isinstance(k, np.ndarray) and k.shape == (3, 32, 2, 16)
    np.testing.assert_array_equal(k[1], unrolled["encoder"]["block_1"]["attn"]["query"]["kernel"])
    back = scan.unstack_layers(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    scanned = _init(model.clone(scan_layers=True), _images())
    jax.tree.map(np.testing.assert_array_equal, scan.stack_layers(scan.unstack_layers(scanned)),
                 scanned)
    assert scan.is_stacked(scanned) and not scan.is_stacked(unrolled)
    # unstack_flat agrees with unstack_layers
    flat = {"/".join(str(q.key) for q in kp): v
            for kp, v in jax.tree_util.tree_flatten_with_path(stacked)[0]}
    flat_back = {"/".join(str(q.key) for q in kp): v
                 for kp, v in jax.tree_util.tree_flatten_with_path(back)[0]}
    un = scan.unstack_flat(flat)
    assert set(un) == set(flat_back)
    for key in un:
        np.testing.assert_array_equal(un[key], flat_back[key])


def test_stack_layers_refuses_gaps_and_mismatched_layers():
    a = {"w": np.zeros((2, 3))}
    with pytest.raises(ValueError, match=r"block_\* indices are \[0, 2\]"):
        scan.stack_layers({"block_0": a, "block_2": a})
    with pytest.raises(ValueError, match="block_1 differs in structure or shapes"):
        scan.stack_layers({"block_0": a, "block_1": {"w": np.zeros((2, 4))}})
    # other numbered siblings (U-Net resnets, DiT's are 'blocks') are not touched
    tree = {"resnets_0": a, "resnets_1": {"w": np.zeros(1)}, "blocks_0": a, "blocks_1": a}
    out = scan.stack_layers(tree)
    assert set(out) == {"resnets_0", "resnets_1", "blocks_stack"}


# -- training mode: per-layer drop-path rates, split rngs ------------------------------------

def _residual_probe_params(model, x):
    """Every param zero but each block's fc2 bias (one-hot on channel i for block i) and the
    norms' scales: block i's MLP branch adds e_i, so after the stack (input 0, no final
    norm) channel i is 1 / keep_i where block i's branch was kept and 0 where dropped."""
    shapes = jax.eval_shape(lambda: _init(model.clone(scan_layers=False), x))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    for i in range(model.depth):
        params[f"block_{i}"]["mlp"]["fc2"]["bias"][i] = 1.0
    return params


@pytest.mark.parametrize("scan_layers", [False, True])
def test_train_mode_drop_path_rates_per_layer(scan_layers):
    n, depth, rate = 4000, 3, 0.5
    model = Encoder(depth=depth, num_heads=2, mlp_dim=8, drop_path=rate, final_norm=False,
                    scan_layers=scan_layers)
    x = jnp.zeros((n, 1, 8))
    params = _residual_probe_params(model, x)
    if scan_layers:
        params = scan.stack_layers(params)
    out = jax.jit(lambda p: model.apply({"params": p}, x, False,
                                        rngs={"dropout": jax.random.PRNGKey(7)}))(params)
    out = np.asarray(out[:, 0, :depth])
    rates = np.linspace(0.0, rate, depth)           # 0, 0.25, 0.5
    for i, r in enumerate(rates):
        kept = out[:, i] != 0
        np.testing.assert_allclose(out[kept, i], 1.0 / (1.0 - r), rtol=1e-6)  # rescaled
        assert abs((~kept).mean() - r) < 4 * np.sqrt(r * (1 - r) / n) + 1e-9, (i, (~kept).mean())
    # layers draw independent masks (a shared rng would nest them: P(both) = 0.25, not 0.125)
    both = ((out[:, 1] == 0) & (out[:, 2] == 0)).mean()
    assert abs(both - rates[1] * rates[2]) < 0.03, both
    # deterministic mode drops nothing
    det = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, True))(params))[:, 0, :depth]
    np.testing.assert_array_equal(det, np.ones_like(det))


def test_scanned_dropout_needs_no_rng_without_drop_path():
    x = _images()
    model = ViT(**VIT, scan_layers=True)
    params = {"params": _init(model, x)}
    run = jax.jit(lambda p, train: model.apply(p, x, train=train)["tokens"], static_argnums=1)
    np.testing.assert_array_equal(run(params, True), run(params, False))


# -- sharding, attention maps, hooks, LLRD ----------------------------------------------------

def test_stacked_params_have_the_layers_axis_and_shard():
    model = ViT(**VIT, scan_layers=True)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images())["params"]
    specs = nn.get_partition_spec(boxed)
    assert specs["encoder"]["block_stack"]["attn"]["query"]["kernel"] == \
        PartitionSpec("layers", "embed", "heads", "kv")
    assert specs["encoder"]["block_stack"]["norm1"]["scale"] == PartitionSpec("layers", "norm")
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
    for preset in ("dp", "fsdp", "fsdp_tensor"):
        sh = param_shardings(boxed, mesh, get_rules(preset))
        spec = sh["encoder"]["block_stack"]["mlp"]["fc1"]["kernel"].spec
        assert spec[0] is None
        assert spec[1] == (None if preset == "dp" else "fsdp")
    # jitted with sharded params under the rules: same output as unsharded
    x = _images(8)
    params = {"params": _init(model, x)}
    sh = param_shardings(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), mesh,
                         get_rules("fsdp"))
    placed = jax.device_put(params, sh)
    assert placed["params"]["encoder"]["block_stack"]["mlp"]["fc1"]["kernel"].sharding.spec[1] \
        == "fsdp"
    apply = jax.jit(lambda p: model.apply(p, x)["tokens"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp")):
        out = apply(placed)
    _assert_close(out, jax.jit(lambda p: model.apply(p, x)["tokens"])(params))


def test_attention_maps_of_a_scanned_vit():
    x = _images()
    model = ViT(**VIT)
    params = {"params": _init(model, x)}
    maps = lambda m: jax.jit(lambda p: m.apply(p, x, method=ViT.attention_maps))
    want = maps(model)(params)
    got = maps(model.clone(scan_layers=True, remat="full"))(scan.stack_layers(params))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_dense_hook_runs_in_every_scanned_layer():
    """A LoRA-style hook adds a param per dense: stacked per layer, trained per layer."""
    def hook(dense, x, call_next):
        if dense.name != "fc1":
            return call_next(x)
        s = dense.param("lora_scale", core.part(nn.initializers.zeros, (None,)), (1,),
                        dense.param_dtype)
        return call_next(x) * (1.0 + s)

    x = _images()
    tokens = lambda m: jax.jit(lambda p: m.apply({"params": p}, x)["tokens"])
    with inject.hooks(dense=hook):
        params = jax.tree.map(np.array, _init(ViT(**VIT), x))
        scanned = jax.eval_shape(lambda: _init(ViT(**VIT, scan_layers=True), x))
        assert scanned["encoder"]["block_stack"]["mlp"]["fc1"]["lora_scale"].shape == (3, 1)
        params["encoder"]["block_1"]["mlp"]["fc1"]["lora_scale"][:] = 0.5
        out_u = tokens(ViT(**VIT))(params)
        out_s = tokens(ViT(**VIT, scan_layers=True))(scan.stack_layers(params))
    _assert_close(out_s, out_u)
    plain = tokens(ViT(**VIT))(params)   # no hook: lora_scale unused
    assert not np.allclose(plain, out_u)


def test_llrd_multipliers_of_stacked_params_equal_the_unrolled():
    model = ViT(**VIT, num_classes=3)
    params = _init(model, _images())
    groups = pg.parse(dict(llrd=dict(decay=0.5), lr_mult=(("head/.*", 2.0),)))
    mu = pg.lr_multipliers(groups, params)
    ms = pg.lr_multipliers(groups, scan.stack_layers(params))
    k = "encoder/block_stack/attn/query/kernel"
    np.testing.assert_allclose(ms[k], [mu[f"encoder/block_{i}/attn/query/kernel"] for i in range(3)])
    assert ms["cls_token"] == mu["cls_token"] == 0.5 ** 4 and ms["head/kernel"] == 2.0
    tx = pg.scale_by_multipliers(groups)
    ones = jax.tree.map(jnp.ones_like, params)
    upd_u, _ = tx.update(ones, tx.init(params), params)
    upd_s, _ = tx.update(scan.stack_layers(ones), tx.init(params), scan.stack_layers(params))
    _assert_close(scan.stack_layers(upd_u), upd_s, tol=0)


@pytest.mark.parametrize("model", [
    dict(name="swin", embed_dim=8, depths=(2,), num_heads=(1,), window_size=4, patch_size=2),
    dict(name="convnext", depths=(1, 1), dims=(8, 16)),
    dict(name="tinyvit", embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), window_sizes=(1, 4))],
    ids=lambda m: m["name"])
def test_hierarchical_backbones_read_remat_policy_names(model):
    """remat 'none' is off (a non-empty string once switched remat on), 'full' / 'dots_saveable'
    checkpoint every block; the outputs do not change."""
    from fmjax.models.registry import build_model
    x = jnp.ones((2, 16, 16, 3))

    def grad_jaxpr(remat):
        m = build_model(dict(model, remat=remat, num_classes=3))
        variables = m.init(jax.random.PRNGKey(0), x)
        loss = lambda p: m.apply({**variables, "params": p}, x)["logits"].sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(variables["params"])), loss(variables["params"])

    (none, y0), (full, y1), (dots, y2) = (grad_jaxpr(r) for r in ("none", "full", "dots_saveable"))
    assert "remat" not in none and "checkpoint" not in none
    assert ("remat" in full or "checkpoint" in full) and ("remat" in dots or "checkpoint" in dots)
    np.testing.assert_allclose(y1, y0, rtol=1e-6)
    np.testing.assert_allclose(y2, y0, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown remat 'yes'"):
        grad_jaxpr("yes")
