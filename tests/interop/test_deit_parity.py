"""DeiT (ViT with a distillation token) against transformers' DeiTForImageClassificationWithTeacher
with random weights, converted by fmjax.interop.hf_vit.convert_hf_deit: tokens, both heads, the
averaged logits, and the gradients of a distillation loss, in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_vit  # noqa: E402
from fmjax.models.vit import ViT  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def deit():
    cfg = transformers.DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
        num_labels=7, architectures=["DeiTForImageClassificationWithTeacher"], attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.DeiTForImageClassificationWithTeacher(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name or "classifier" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    params = hf_vit.convert_hf_deit(model.state_dict(), cfg)
    fm = ViT(**hf_vit.deit_kwargs_from_hf_config(cfg))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return cfg, model, params, fm, images


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def test_forward_parity(deit):
    cfg, model, params, fm, images = deit
    with torch.no_grad():
        out_t = model(pixel_values=images)
        hidden = model.deit(pixel_values=images).last_hidden_state
    out = fm.apply({"params": params}, _nhwc(images))
    assert fm.num_prefix_tokens == 2 and out["tokens"].shape[1] == 2 + 16
    np.testing.assert_allclose(np.asarray(out["tokens"]), hidden.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["cls_logits"]), out_t.cls_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["dist_logits"]), out_t.distillation_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["logits"]), out_t.logits.numpy(), atol=ATOL)


def test_distillation_loss_gradients(deit):
    """DeiT's hard distillation: 0.5 CE(cls head, label) + 0.5 CE(dist head, teacher label);
    gradients of every param agree."""
    cfg, model, params, fm, images = deit
    labels, teacher = torch.tensor([0, 3, 6]), torch.tensor([1, 3, 2])
    model.zero_grad()
    out_t = model(pixel_values=images)
    ce = torch.nn.functional.cross_entropy
    loss_t = 0.5 * ce(out_t.cls_logits, labels) + 0.5 * ce(out_t.distillation_logits, teacher)
    loss_t.backward()

    def loss_fn(p):
        o = fm.apply({"params": p}, _nhwc(images))
        lse = lambda z, y: jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])
        return 0.5 * lse(o["cls_logits"], jnp.asarray(labels.numpy())) + 0.5 * lse(
            o["dist_logits"], jnp.asarray(teacher.numpy()))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    grads_t = hf_vit.convert_hf_deit({k: v.grad for k, v in model.named_parameters()}, cfg)
    flat_t = dict(jax.tree_util.tree_flatten_with_path(grads_t)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = flat_t[path]
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=2e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
