"""Swin (v1 and v2) against transformers' Swin(v2)ForImageClassification with random weights, converted by
fmjax.interop.hf_swin: normed tokens, pooled features, logits and the gradients of a
cross-entropy loss, in float32. The configs cover shifted windows with the cross-region
mask, a stage whose grid equals the window (one window, no shift), grids padded to a multiple
of the window (and odd sides before a merge), and the hub checkpoints' older key names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import formats, hf_swin  # noqa: E402
from fmjax.models.registry import build_model, capabilities  # noqa: E402
from fmjax.models.swin import Swin, shift_mask  # noqa: E402

CASES = {
    # 32 px, patch 2: 16x16 (4 windows of 4x4, shifted) -> 8x8 -> 4x4 (== window: no shift)
    "shifted": dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4],
                    window_size=4),
    # 40 px, patch 4: 10x10 padded to 12x12 for window 3 (shifted by 1) -> 5x5 (odd: merge pads)
    # padded to 6x6
    "padded": dict(image_size=40, patch_size=4, embed_dim=12, depths=[2, 2], num_heads=[3, 3],
                   window_size=3, use_absolute_embeddings=True),
    # Swin v2: cosine attention, continuous position bias, res-post-norm, merge-then-norm;
    # 40 px, patch 2: 20x20 (window 4, shifted) -> 10x10 (padded to 12) -> 5x5 (padded to 8),
    # the last stage's CPB coordinates normalised by a pre-training window of 6
    "v2": dict(image_size=40, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4],
               window_size=4, pretrained_window_sizes=[0, 0, 6]),
}


def _model(case):
    if case.startswith("v2"):
        cfg = transformers.Swinv2Config(architectures=["Swinv2ForImageClassification"], num_labels=5,
                                        **CASES[case])
        cls = transformers.Swinv2ForImageClassification
    else:
        cfg = transformers.SwinConfig(architectures=["SwinForImageClassification"], num_labels=5,
                                      **CASES[case])
        cls = transformers.SwinForImageClassification
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases / norms / bias tables away from their inits
    return cfg, model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradient_parity(case):
    cfg, model = _model(case)
    params = hf_swin.convert_hf_swin(model.state_dict(), cfg)
    fm = Swin(**hf_swin.swin_kwargs_from_hf_config(cfg))
    assert fm.num_classes == 5 and fm.version == (2 if case.startswith("v2") else 1)
    size = CASES[case]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    labels = torch.tensor([1, 4])
    model.zero_grad()
    out_t = model(pixel_values=images)
    loss_t = torch.nn.functional.cross_entropy(out_t.logits, labels)
    loss_t.backward()
    with torch.no_grad():
        base = (model.swinv2 if fm.version == 2 else model.swin)(pixel_values=images)
    out = fm.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(out["patch_tokens"]), base.last_hidden_state.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), base.pooler_output.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), out_t.logits.detach().numpy(), atol=2e-5)

    def loss_fn(p):
        z = fm.apply({"params": p}, x)["logits"]
        return jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(2), jnp.asarray(labels.numpy())])
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    grads_t = hf_swin.convert_hf_swin({k: v.grad for k, v in model.named_parameters()}, cfg)
    flat_t = dict(jax.tree_util.tree_flatten_with_path(grads_t)[0])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(flat_t)
    for path, g in flat:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_t[path]), atol=5e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_hub_key_names_convert_to_the_same_params():
    """microsoft/swin-* checkpoints store attention.self.query / output.dense / intermediate /
    the index buffers: they convert to the same tree as the current names."""
    cfg, model = _model("shifted")
    sd = model.state_dict()
    renamed = {}
    for k, v in sd.items():
        for new, old in ((".attention.q_proj.", ".attention.self.query."),
                         (".attention.k_proj.", ".attention.self.key."),
                         (".attention.v_proj.", ".attention.self.value."),
                         (".attention.o_proj.", ".attention.output.dense."),
                         (".attention.relative_position_bias.relative_position_bias_table",
                          ".attention.self.relative_position_bias_table"),
                         (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")):
            k = k.replace(new, old)
        renamed[k] = v
    renamed["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(16, 16)
    a = formats.convert("hf_swin", sd, cfg)
    b = formats.convert("hf_swin", renamed, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    del renamed["swin.layernorm.weight"]
    renamed["swin.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['layernorm.weight'\].*unexpected keys \['extra.weight'\]"):
        hf_swin.convert_hf_swin(renamed, cfg)


def test_shift_mask_separates_the_rolled_regions():
    m = shift_mask(8, 8, 4, 2)   # 4 windows of 16 tokens
    assert m.shape == (4, 16, 16)
    assert (m[0] == 0).all()                       # the top-left window holds one region
    assert (m[3] < 0).sum() > 0 and set(np.unique(m)) == {0.0, -100.0}
    np.testing.assert_array_equal(m, np.swapaxes(m, 1, 2))


def test_registry_builds_it_and_small_inputs_adapt_the_window():
    m = build_model(dict(name="swin", variant="T", num_classes=3))
    assert m.embed_dim == 96 and m.width == 768 and {"pooled", "tokens", "classifier"} <= capabilities(m)
    small = build_model(dict(name="swin", embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=7,
                             patch_size=4))
    # 32 px: 8x8 (window 7: 8 padded to 14, shifted) -> 4x4 (one 4x4 window, no shift); the
    # param shapes are the configured window's whatever the input size
    v32 = small.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    v64 = small.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree_util.tree_map(jnp.shape, v32) == jax.tree_util.tree_map(jnp.shape, v64)
    out = small.apply(v32, jnp.ones((2, 32, 32, 3)))
    assert out["pre_logits"].shape == (2, 16) and out["patch_tokens"].shape == (2, 16, 16)
    assert [f.shape for f in out["feature_maps"]] == [(2, 8, 8, 8), (2, 4, 4, 16)]
    assert bool(jnp.isfinite(out["pre_logits"]).all())
