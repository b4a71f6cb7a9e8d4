"""ConvNeXt (V1 and V2) against transformers' ConvNext(V2)ForImageClassification with random
weights, converted by fmjax.interop.hf_convnext: stage feature maps, pooled features, logits
and the gradients of a cross-entropy loss, in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_convnext  # noqa: E402
from fmjax.models.convnext import ConvNeXt  # noqa: E402
from fmjax.models.registry import build_model, capabilities  # noqa: E402


def _model(v2):
    kw = dict(hidden_sizes=[16, 32], depths=[1, 2], num_stages=2, num_labels=5, image_size=32)
    if v2:
        cfg = transformers.ConvNextV2Config(architectures=["ConvNextV2ForImageClassification"], **kw)
        model = transformers.ConvNextV2ForImageClassification(cfg)
    else:
        cfg = transformers.ConvNextConfig(architectures=["ConvNextForImageClassification"],
                                          layer_scale_init_value=0.5, **kw)
        model = transformers.ConvNextForImageClassification(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))  # GRN / biases / norms away from their inits
    return cfg, model.eval()


@pytest.mark.parametrize("v2", [False, True])
def test_forward_and_gradient_parity(v2):
    cfg, model = _model(v2)
    params = hf_convnext.convert_hf_convnext(model.state_dict(), cfg)
    fm = ConvNeXt(**hf_convnext.convnext_kwargs_from_hf_config(cfg))
    assert fm.grn == v2 and fm.num_classes == 5
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    labels = torch.tensor([1, 4])
    model.zero_grad()
    out_t = model(pixel_values=images, output_hidden_states=True)
    loss_t = torch.nn.functional.cross_entropy(out_t.logits, labels)
    loss_t.backward()
    out = fm.apply({"params": params}, x)
    base = model.convnextv2 if v2 else model.convnext
    with torch.no_grad():
        pooled_t = base(pixel_values=images).pooler_output
    for got, ref in zip(out["feature_maps"], out_t.hidden_states[1:]):
        np.testing.assert_allclose(np.asarray(got), ref.detach().permute(0, 2, 3, 1).numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), pooled_t.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), out_t.logits.detach().numpy(), atol=2e-5)

    def loss_fn(p):
        z = fm.apply({"params": p}, x)["logits"]
        return jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(2), jnp.asarray(labels.numpy())])
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    grads_t = hf_convnext.convert_hf_convnext({k: v.grad for k, v in model.named_parameters()}, cfg)
    flat_t = dict(jax.tree_util.tree_flatten_with_path(grads_t)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_t[path]), atol=5e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_registry_builds_it_with_the_backbone_contract():
    m = build_model(dict(name="convnext", variant="T", num_classes=3))
    assert m.dims == (96, 192, 384, 768) and {"pooled", "tokens", "classifier"} <= capabilities(m)
    small = build_model(dict(name="convnext", depths=(1, 1), dims=(8, 16)))
    out = small.apply(small.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))), jnp.zeros((2, 64, 64, 3)))
    assert out["pre_logits"].shape == (2, 16) and out["patch_tokens"].shape == (2, 64, 16)
