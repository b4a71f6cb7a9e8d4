"""Numerical parity of fmjax's OWL-ViT with transformers' OwlViTForObjectDetection (random
weights, converted by fmjax.interop.hf_owlvit): class logits, boxes and class embeddings,
and the gradients of a loss of both, in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import formats, hf_owlvit  # noqa: E402
from fmjax.models.owl import OWLViT, box_bias  # noqa: E402
from fmjax.models.registry import build_model  # noqa: E402

ATOL = 2e-5


def _hf():
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8)
    cfg = transformers.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32,  # OWL-ViT: = the text width (HF sizes the class head by it)
                                    attn_implementation="eager")
    model = transformers.OwlViTForObjectDetection(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model.eval()


def _inputs():
    g = np.random.default_rng(0)
    images = g.normal(size=(2, 3, 32, 32)).astype(np.float32)
    ids = g.integers(3, 90, size=(5, 10))
    for i in range(5):               # one end token per row, the largest id (argmax pooling)
        ids[i, 4 + i] = 99
        ids[i, 5 + i:] = 0
    return images, ids


def test_box_bias_is_owlvits():
    _, model = _hf()
    for h, w in ((4, 4), (3, 5)):
        np.testing.assert_allclose(box_bias(h, w), model.compute_box_bias(h, w).numpy(), atol=1e-6)


def test_outputs_and_gradients_match_transformers():
    cfg, model = _hf()
    images, ids = _inputs()
    params = formats.convert("hf_owlvit", model.state_dict(), cfg)
    ours = build_model(hf_owlvit.owl_kwargs_from_hf_config(cfg))
    assert isinstance(ours, OWLViT)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    tokens = jnp.asarray(ids, jnp.int32)
    out = ours.apply({"params": params}, x, tokens)

    pix = torch.tensor(images, requires_grad=True)
    ref = model(input_ids=torch.tensor(ids)[None].reshape(5, 10).repeat(2, 1), pixel_values=pix,
                attention_mask=torch.ones(10, 10, dtype=torch.long))
    # HF takes queries per image (input_ids (B * Q, L)); ours are shared by the batch
    np.testing.assert_allclose(out["logits"], ref.logits.detach().numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(out["boxes"], ref.pred_boxes.detach().numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(out["class_embeds"], ref.class_embeds.detach().numpy(), atol=ATOL, rtol=1e-5)

    # gradients of one scalar of both outputs w.r.t. the image
    w_l = np.random.default_rng(1).normal(size=out["logits"].shape).astype(np.float32)
    w_b = np.random.default_rng(2).normal(size=out["boxes"].shape).astype(np.float32)
    (ref.logits * torch.tensor(w_l)).sum().add((ref.pred_boxes * torch.tensor(w_b)).sum()).backward()

    def f(xx):
        o = ours.apply({"params": params}, xx, tokens)
        return (o["logits"] * w_l).sum() + (o["boxes"] * w_b).sum()
    g = jax.grad(f)(x)
    np.testing.assert_allclose(np.asarray(g).transpose(0, 3, 1, 2), pix.grad.numpy(), atol=1e-4, rtol=1e-4)
