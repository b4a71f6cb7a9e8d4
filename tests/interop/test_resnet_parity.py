"""ResNet against transformers' ResNetForImageClassification with random weights and running
statistics, converted by fmjax.interop.hf_resnet: in inference mode (running statistics) the
stage maps, pooled features and logits; in training mode (batch statistics) the logits, the
gradients of a cross-entropy loss and the updated running statistics; in float32, for
bottleneck (v1.5 and v1) and basic blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_resnet  # noqa: E402
from fmjax.models.resnet import ResNet  # noqa: E402

CASES = {"bottleneck": dict(layer_type="bottleneck"),
         "bottleneck_v1": dict(layer_type="bottleneck", downsample_in_bottleneck=True),
         "basic": dict(layer_type="basic")}


def _model(case):
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                                    num_labels=5, architectures=["ResNetForImageClassification"],
                                    **CASES[case])
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg)
    with torch.no_grad():  # BatchNorm affine params and running statistics away from their inits
        for name, p in model.named_parameters():
            if "normalization" in name or "classifier" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return cfg, model


def _images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_parity(case):
    cfg, model = _model(case)
    model.eval()
    variables = hf_resnet.convert_hf_resnet_variables(model.state_dict(), cfg)
    kw = hf_resnet.resnet_kwargs_from_hf_config(cfg)
    assert kw["num_classes"] == 5 and kw["block"] == CASES[case]["layer_type"]
    fm = ResNet(**kw)
    images = _images()
    with torch.no_grad():
        out_t = model(pixel_values=images, output_hidden_states=True)
        pooled_t = model.resnet(pixel_values=images).pooler_output.flatten(1)
    out = fm.apply(variables, _nhwc(images))
    for got, ref in zip(out["feature_maps"], out_t.hidden_states[1:]):
        np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), pooled_t.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), out_t.logits.numpy(), atol=1e-5, rtol=1e-5)
    assert out["patch_tokens"].shape == (4, 4 * 4, 32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_parity(case):
    """Batch statistics in the forward pass, every gradient, and the running statistics after
    one update: the mean as torch's; the variance with the BIASED batch variance (flax), where
    torch uses the unbiased one (the documented factor n / (n - 1))."""
    cfg, model = _model(case)
    variables = hf_resnet.convert_hf_resnet_variables(model.state_dict(), cfg)
    fm = ResNet(**hf_resnet.resnet_kwargs_from_hf_config(cfg))
    images, labels = _images(), torch.tensor([1, 4, 0, 2])
    model.train()
    model.zero_grad()
    logits_t = model(pixel_values=images).logits
    loss_t = torch.nn.functional.cross_entropy(logits_t, labels)
    loss_t.backward()
    x, y = _nhwc(images), jnp.asarray(labels.numpy())

    def loss_fn(p):
        out, state = fm.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
        z = out["logits"]
        return jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(4), y]), (z, state)
    (loss, (logits, state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    np.testing.assert_allclose(np.asarray(logits), logits_t.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    grads_t = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in model.named_parameters()}
    for k, v in model.named_buffers():
        grads_t[k] = v  # running statistics: read off the reference after its update
    want = hf_resnet.convert_hf_resnet_variables(grads_t, cfg)
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    got_g, want_g = flat(grads), flat(want["params"])
    assert got_g.keys() == want_g.keys()
    # Each gradient within 5e-5 of its largest entry (measured: up to 2.2e-5, the stem's
    # BatchNorm bias in the bottleneck case: train-mode BatchNorm backward at batch 4 cancels).
    for k in got_g:
        scale = float(np.abs(want_g[k]).max()) + 1e-6
        np.testing.assert_allclose(got_g[k] / scale, want_g[k] / scale, atol=5e-5, err_msg=k)
    got_s, want_s, old_s = flat(state["batch_stats"]), flat(want["batch_stats"]), flat(variables["batch_stats"])
    for k in got_s:
        if k.endswith("['mean']"):
            np.testing.assert_allclose(got_s[k], want_s[k], atol=1e-5, rtol=1e-5, err_msg=k)
        else:  # torch: 0.9 old + 0.1 unbiased; flax: 0.9 old + 0.1 biased = unbiased (n - 1) / n
            ratio = (got_s[k] - 0.9 * old_s[k]) / (want_s[k] - 0.9 * old_s[k])
            # n = batch x h x w values per channel: 4 x 16 x 16 (stem), 4 x 8 x 8, 4 x 4 x 4
            assert np.ptp(ratio) < 5e-4 and any(abs(ratio.mean() - (n - 1) / n) < 5e-4
                                                for n in (1024, 256, 64)), (k, ratio)


def test_errors_name_the_problem():
    bad = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16], depths=[1], hidden_act="gelu")
    with pytest.raises(ValueError, match="relu only"):
        hf_resnet.resnet_kwargs_from_hf_config(bad)
    bad = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16], depths=[1], downsample_in_first_stage=True)
    with pytest.raises(ValueError, match="downsample_in_first_stage"):
        hf_resnet.resnet_kwargs_from_hf_config(bad)
    cfg, model = _model("basic")
    sd = dict(model.state_dict())
    sd.pop("resnet.embedder.embedder.convolution.weight")
    with pytest.raises(KeyError, match="missing keys.*embedder.embedder.convolution.weight"):
        hf_resnet.convert_hf_resnet(sd, cfg)
