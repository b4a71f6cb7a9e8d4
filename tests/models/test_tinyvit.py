"""TinyViT against microsoft/Cream's TinyViT (tests/reference/tinyvit_reference.py, a
transcription of TinyViT/models/tiny_vit.py at 4a13c40) with random weights and random BatchNorm
running statistics, converted by fmjax.interop.cream_tinyvit: eval-mode logits / pooled
features / tokens, and in training mode (batch statistics) the loss, the gradients of every param
and of the input, and the updated running statistics, in float32. The cases cover a grid padded
to a multiple of the window, a grid tiled by windows, and grids equal to the window (Cream's
un-partitioned branch). Then the contract: presets and their param counts, capabilities, small
inputs, logical axes on a mesh, remat, the batch_stats collection through the supervised
objective, the refusal by objectives that do not carry it, and the model_init format."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
import tinyvit_reference as ref  # noqa: E402  (microsoft/Cream TinyViT/models/tiny_vit.py)

from fmjax import testing
from fmjax.interop import cream_tinyvit, formats  # noqa: E402
from fmjax.models.registry import build_model, capabilities, state_collections  # noqa: E402
from fmjax.models.tinyvit import TinyViT, attention_bias_index  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402

TINY = dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4])
CASES = {
    # 64 px: grids 16 (MBConv) -> 8 (window 3: padded to 9) -> 4 (== window 4) -> 2 (== window 2);
    # a 5x5 local conv
    "padded": dict(TINY, window_sizes=[7, 3, 4, 2], local_conv_size=5),
    # 64 px: 16 -> 8 (four 4x4 windows) -> 4 (four 2x2 windows) -> 2 (== window); ratios 2
    "tiled": dict(TINY, window_sizes=[7, 4, 2, 2], mlp_ratio=2.0, mbconv_expand_ratio=2.0),
}
SIZE, CLASSES = 64, 5
SMALL = dict(name="tinyvit", embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 4), window_sizes=(1, 4, 2))


def _reference(case):
    torch.manual_seed(0)
    model = ref.TinyViT(img_size=SIZE, num_classes=CLASSES, drop_path_rate=0.0, **CASES[case])
    with torch.no_grad():
        for name, p in model.named_parameters():   # away from the init: BN / LN scales (conv3's
            if name.endswith("attention_biases"):      # start at 0), biases, the bias tables (0)
                p.add_(torch.randn_like(p))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model.eval()   # eval() caches the attention biases (Cream's Attention.train): after the noise


def _images():
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return images, jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _tokens(model, images):
    """Cream's forward_features before its mean: the last stage's tokens (B, L, C)."""
    x = model.patch_embed(images)
    for layer in model.layers:
        x = layer(x)
    return x


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_forward_parity(case):
    model = _reference(case)
    kwargs = cream_tinyvit.tinyvit_kwargs_from_cream(model.state_dict())
    cfg = CASES[case]
    assert kwargs["embed_dims"] == tuple(cfg["embed_dims"]) and kwargs["depths"] == tuple(cfg["depths"])
    assert kwargs["num_heads"][1:] == tuple(cfg["num_heads"][1:]) and kwargs["num_classes"] == CLASSES
    assert kwargs["window_sizes"][1:] == tuple(cfg["window_sizes"][1:])
    assert kwargs["local_conv_size"] == cfg.get("local_conv_size", 3)
    assert kwargs["mlp_ratio"] == cfg.get("mlp_ratio", 4.0)
    variables = cream_tinyvit.convert_cream_tinyvit_variables(model.state_dict())
    fm = TinyViT(**kwargs)
    images, x = _images()
    with torch.no_grad():
        logits_t = model(images).numpy()
        tokens_t = _tokens(model, images)
        pooled_t = model.norm_head(tokens_t.mean(1)).numpy()
    out = jax.jit(fm.apply)(variables, x)
    refs = {"logits": logits_t, "pre_logits": pooled_t, "patch_tokens": tokens_t.numpy()}
    print(case, "eval max abs diffs", {k: _max_diff(out[k], t) for k, t in refs.items()},
          "max abs values", {k: float(np.abs(t).max()) for k, t in refs.items()})
    for k, t in refs.items():   # the tokens reach ~|20|: float32 rounding is relative
        np.testing.assert_allclose(np.asarray(out[k]), t, atol=1e-5, rtol=1e-5, err_msg=k)
    assert float(np.abs(logits_t).max()) > 0.1   # not a trivially small output


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_mode_loss_gradient_and_running_statistics_parity(case):
    """BatchNorm on the batch's statistics: loss, every param's and the input's gradient, and the
    running statistics after the step (torch updates the variance with the unbiased batch
    variance, flax with the biased one: the reference's update is rescaled by (n - 1) / n)."""
    model = _reference(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variables = cream_tinyvit.convert_cream_tinyvit_variables(before)
    fm = TinyViT(**cream_tinyvit.tinyvit_kwargs_from_cream(before))
    images, x = _images()
    labels = torch.tensor([1, 4, 0, 2])
    counts = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, i[0].numel() // i[0].shape[1]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.train()
    images.requires_grad_(True)
    loss_t = torch.nn.functional.cross_entropy(model(images), labels)
    loss_t.backward()
    for h in hooks:
        h.remove()

    def loss_fn(params, x):
        out, state = fm.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
        z = out["logits"]
        return jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(4), jnp.asarray(labels.numpy())]), state

    (loss, state), (grads, grad_x) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    diffs = {"input": _max_diff(grad_x, images.grad.permute(0, 2, 3, 1).numpy())}
    grads_sd = dict(before, **{k: p.grad for k, p in model.named_parameters()})
    grads_t = cream_tinyvit.convert_cream_tinyvit_variables(grads_sd)["params"]
    flat_t = dict(jax.tree_util.tree_flatten_with_path(grads_t)[0])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(flat_t)
    diffs["params"] = max(_max_diff(g, flat_t[p]) for p, g in flat)
    for path, g in flat:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_t[path]), atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    after = dict(model.state_dict())
    for name, n in counts.items():   # torch's unbiased update -> flax's biased one
        old = before[f"{name}.running_var"]
        after[f"{name}.running_var"] = 0.9 * old + (after[f"{name}.running_var"] - 0.9 * old) * (n - 1) / n
    stats_t = cream_tinyvit.convert_cream_tinyvit_variables(after)["batch_stats"]
    flat_s = dict(jax.tree_util.tree_flatten_with_path(stats_t)[0])
    diffs["running_stats"] = max(_max_diff(v, flat_s[p])
                                 for p, v in jax.tree_util.tree_flatten_with_path(state["batch_stats"])[0])
    print(case, "train-mode max abs diffs", diffs, "loss", float(loss), loss_t.item())
    assert diffs["input"] < 1e-5 and diffs["running_stats"] < 1e-5, diffs
    assert len(counts) == len(flat_s) // 2   # every BatchNorm ran (mean and var each)


def test_attention_bias_index_is_creams_and_a_small_window_reads_its_offsets():
    for ws in (2, 3, 7):
        cream = ref.Attention(8, 4, 2, attn_ratio=1, resolution=(ws, ws)).attention_bias_idxs.numpy()
        np.testing.assert_array_equal(attention_bias_index(ws, ws), cream)
    # a 3x3 window inside a 7-table: the 7x7 window's entries for the same token pairs
    cream7 = ref.Attention(8, 4, 2, attn_ratio=1, resolution=(7, 7)).attention_bias_idxs.numpy()
    pos = np.array([y * 7 + x for y in range(3) for x in range(3)])
    np.testing.assert_array_equal(attention_bias_index(3, 7), cream7[np.ix_(pos, pos)])


def test_presets_param_counts_match_cream():
    """Params only (BatchNorm running statistics are buffers): 21m is the paper's 21.2M, and each
    preset has exactly the reference's count; the shapes do not depend on the input size."""
    counts = {}
    for variant in ("5m", "11m", "21m"):
        fm = build_model(dict(name="tinyvit", variant=variant, num_classes=1000))
        shapes = jax.eval_shape(fm.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
        counts[variant] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes["params"])))
        cream = ref.TinyViT(num_classes=1000, **ref.PRESETS[variant])
        assert counts[variant] == sum(p.numel() for p in cream.parameters()), variant
    print("param counts", counts)
    assert round(counts["21m"] / 1e6, 1) == 21.2
    assert round(counts["11m"] / 1e6, 1) == 11.0 and round(counts["5m"] / 1e6, 1) == 5.4


def test_registry_capabilities_and_small_inputs_adapt_the_window():
    m = build_model(dict(name="tinyvit", variant="21m", num_classes=3))
    assert m.width == 576 and m.embed_dims == (96, 192, 384, 576)
    assert capabilities(m) == {"pooled", "tokens", "classifier", "any_resolution"}
    assert "classifier" not in capabilities(build_model(dict(name="tinyvit", variant="5m")))
    assert state_collections("tinyvit") == ("batch_stats",) and state_collections("swin") == ()
    with pytest.raises(ValueError, match="Unknown TinyViT variant"):
        build_model(dict(name="tinyvit", variant="7m"))
    small = TinyViT(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                    window_sizes=(7, 7, 14, 7), num_classes=3)
    # 32 px: 8x8 (window 7: padded to 14) -> 4x4 (one 4x4 window) -> 2x2 (one 2x2) -> 1x1; the
    # tables keep the configured windows' rows whatever the input size
    v32 = jax.jit(small.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    v224 = jax.eval_shape(small.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    assert jax.tree.map(jnp.shape, v32) == jax.tree.map(jnp.shape, v224)
    assert nn.unbox(v32["params"]["stage_2_block_0"]["attn"]["attention_biases"]).shape == (3, 196)
    apply = jax.jit(small.apply)
    out = apply(v32, jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3)))
    assert out["pre_logits"].shape == (2, 32) and out["patch_tokens"].shape == (2, 1, 32)
    assert out["logits"].shape == (2, 3)
    assert [f.shape for f in out["feature_maps"]] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 24), (2, 1, 1, 32)]
    assert bool(jnp.isfinite(out["logits"]).all())
    # odd sides: every stride-2 conv gives ceil(h / 2)
    odd = apply(v32, jnp.ones((1, 36, 44, 3)))
    assert [f.shape[1:3] for f in odd["feature_maps"]] == [(9, 11), (5, 6), (3, 3), (2, 2)]
    with pytest.raises(ValueError, match="need one entry per stage"):
        jax.eval_shape(TinyViT(depths=(1, 1), embed_dims=(8, 16), num_heads=(1,), window_sizes=(2, 2)).init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_batch_stats_train_and_eval_modes_and_remat():
    model = build_model(dict(SMALL, num_classes=3, drop_path=0.1))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    assert set(v) == {"params", "batch_stats"}
    bs = v["batch_stats"]["stage_0_block_0"]["conv3"]["bn"]
    assert set(bs) == {"mean", "var"}
    assert float(jnp.abs(nn.unbox(v["params"]["stage_0_block_0"]["conv3"]["bn"]["scale"])).max()) == 0.0
    rngs = {"dropout": jax.random.PRNGKey(2)}
    train = jax.jit(lambda m, v, x: m.apply(v, x, train=True, rngs=rngs, mutable=["batch_stats"]),
                    static_argnums=0)
    out, state = train(model, v, x)
    assert float(jnp.abs(state["batch_stats"]["patch_embed"]["conv1"]["bn"]["mean"]).max()) > 0
    with pytest.raises(Exception, match="batch_stats"):   # training updates the running statistics
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), v, x)
    remat = build_model(dict(SMALL, num_classes=3, drop_path=0.1, remat=True))
    out_r, state_r = train(remat, v, x)
    np.testing.assert_allclose(np.asarray(out_r["logits"]), np.asarray(out["logits"]), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_r, state)
    # eval: the running statistics, no randomness
    e1, e2 = jax.jit(model.apply)(v, x), jax.jit(model.apply)({**v, **state}, x)
    assert float(jnp.abs(e1["logits"] - e2["logits"]).max()) > 1e-4


def test_logical_axes_shard_on_a_mesh():
    from jax.sharding import PartitionSpec
    model = build_model(dict(SMALL, num_classes=3))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    plain = jax.jit(model.apply)(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)), x)["logits"]
    variables, out = testing.init_and_apply_on_mesh(model.init, model.apply, x)
    p = variables["params"]
    assert p["stage_1_block_0"]["attn"]["query"]["kernel"].value.sharding.spec == PartitionSpec(None, "model", None)
    assert p["stage_1_block_0"]["attn"]["attention_biases"].value.sharding.spec == PartitionSpec("model", None)
    assert p["stage_0_block_0"]["conv1"]["conv"]["kernel"].names == (None, None, "embed", "mlp")
    assert p["stage_0_block_0"]["conv1"]["conv"]["kernel"].value.sharding.spec == PartitionSpec(None, None, None, "model")
    assert p["stage_0_merge"]["conv3"]["conv"]["kernel"].value.sharding.spec == PartitionSpec(None, None, "model", None)
    assert p["stage_1_block_0"]["mlp"]["fc1"]["kernel"].names == ("embed", "mlp")
    assert p["stage_1_block_0"]["local_conv"]["bn"]["scale"].names == ("norm",)
    assert p["head"]["kernel"].names == ("embed", "classes")
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(plain), atol=1e-5)


def test_supervised_objective_carries_the_running_statistics(tiny_config):
    c = tiny_config("supervised")
    c.model = dict(SMALL, num_classes=8)
    c.objective.ema_decay = 0.5
    obj = make_objective(c)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
    params, extra = obj.init(jax.random.PRNGKey(1), batch)
    assert set(extra) == {"batch_stats", "ema", "ema_batch_stats"}
    params, extra = nn.unbox(params), nn.unbox(extra)
    (loss, (metrics, new)), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))(
        params, extra, batch, jax.random.PRNGKey(2), 0)
    assert np.isfinite(float(loss)) and set(new) == set(extra)
    mean = lambda e: e["batch_stats"]["stage_0_merge"]["conv1"]["bn"]["mean"]  # noqa: E731
    assert float(jnp.abs(mean(new) - mean(extra)).max()) > 0       # the forward pass updated them
    assert "batch_stats" not in grads
    after = obj.after_update(params, new, 0)
    np.testing.assert_allclose(np.asarray(mean({"batch_stats": after["ema_batch_stats"]})),
                               0.5 * np.asarray(mean(extra)) + 0.5 * np.asarray(mean(new)), atol=1e-7)
    m = jax.jit(obj.eval_metrics)(params, after, batch, None)
    assert set(m) == {"accuracy", "top5", "ema_accuracy", "ema_top5"} and m["accuracy"].shape == (4,)
    assert jax.eval_shape(obj.features, params, after, images).shape == (4, 48)


def test_objectives_that_do_not_carry_batch_stats_refuse_it(tiny_config):
    c = tiny_config("dino")
    c.model = dict(SMALL)
    with pytest.raises(ValueError, match=r"objective 'dino' does not carry the model state \['batch_stats'\] that "
                                         r"config.model.name='tinyvit' keeps.*models that fit: \['convnext', 'swin', 'vit'\]"):
        make_objective(c)


def test_model_init_format_loads_a_cream_checkpoint(tmp_path):
    from fmjax.train import model_init
    model = _reference("tiled")
    path = str(tmp_path / "tiny_vit.pth")
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    mi = dict(torch=path, format="cream_tinyvit")
    source, _ = model_init.read_source(mi)
    fm = TinyViT(**cream_tinyvit.tinyvit_kwargs_from_cream(model.state_dict()))
    shapes = jax.eval_shape(fm.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    target = {k: tuple(v.shape) for k, v in model_init.flatten(nn.unbox(shapes)).items()}
    loads, status, unused = model_init.plan(target, source, mi)
    assert set(status.values()) == {"loaded"} and len(loads) == len(target) and unused == 0
    np.testing.assert_array_equal(
        loads["stage_1_block_0/attn/attention_biases"],
        model.state_dict()["layers.1.blocks.0.attn.attention_biases"].numpy())
    sd = dict(model.state_dict())
    del sd["norm_head.weight"]
    sd["layers.1.blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['norm_head.weight'\].*unexpected keys \['layers.1.blocks.0.extra'\]"):
        formats.convert("cream_tinyvit", sd)


def test_decay_groups_are_creams():
    """Cream's optimizer.py set_weight_decay (1-D params, biases and the no_weight_decay_keywords
    {'attention_biases'} skip decay) = fmjax's mask with wd_groups='tinyvit' and with fmjax's
    default list, param by param through the converter."""
    from fmjax.train import optimizer as opt_lib
    model = _reference("tiled")
    sd = model.state_dict()
    cream_decays = {n: float(not (p.ndim == 1 or n.endswith(".bias") or "attention_biases" in n))
                    for n, p in model.named_parameters()}
    want = cream_tinyvit.convert_cream_tinyvit(
        {n: (torch.full_like(v, cream_decays[n]) if n in cream_decays else v) for n, v in sd.items()})
    params = cream_tinyvit.convert_cream_tinyvit(sd)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    want = flat(want)
    for patterns in (opt_lib.NO_DECAY_PRESETS["tinyvit"], opt_lib.NO_DECAY_PATTERNS):
        mask = flat(opt_lib.decay_mask(params, patterns=patterns))
        assert mask.keys() == want.keys()
        for k, v in want.items():
            assert np.all(v == v.flat[0]), k
            assert bool(v.flat[0]) == bool(mask[k]), (patterns, k)
    assert not mask["['stage_1_block_0']['attn']['attention_biases']"]
    assert mask["['stage_1_block_0']['attn']['query']['kernel']"]
