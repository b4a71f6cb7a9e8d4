"""SAM against transformers' SamModel with random weights, converted by fmjax.interop.hf_sam,
in float32: image embeddings, low-res mask logits and IoU predictions for point prompts
(positive, negative, not-a-point and padding labels), box prompts, points + boxes and mask
prompts, multimask and single-mask output; the gradients of a loss on masks and IoUs; the
relative-position interpolation; the published checkpoints' layout at full size (ViT-B, by
shapes); and ``config.model_init`` format ``hf_sam``.

Max abs differences measured (float32, 64 px, 8x8 embedding grid, masks ~3 in magnitude):
embeddings 2.7e-6, masks <= 5.0e-6, IoU <= 6.7e-7; gradients <= 1.9e-5 relative to 1 + max |grad|."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_sam  # noqa: E402
from fmjax.models.sam import SAM, get_rel_pos, sam_kwargs  # noqa: E402
from fmjax.train import model_init  # noqa: E402

ATOL = 1e-5


def _config():
    # window 3 on an 8x8 grid: windowed blocks pad to 9x9; block 1 is global.
    return transformers.SamConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=8, window_size=3, global_attn_indexes=[1], output_channels=32,
                           num_pos_feats=16, mlp_dim=96),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=24),
        attn_implementation="eager")


@pytest.fixture(scope="module")
def setup():
    with jax.default_matmul_precision("highest"):
        cfg = _config()
        torch.manual_seed(0)
        hf = transformers.SamModel(cfg).eval()
        with torch.no_grad():   # every param random (HF inits rel-pos / pos-embed to zeros)
            for name, p in hf.named_parameters():
                p.copy_(0.2 * torch.randn_like(p) if p.ndim > 1 else
                        0.1 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        params = hf_sam.convert_hf_sam(hf.state_dict(), cfg)
        model = SAM(**hf_sam.sam_kwargs_from_hf_config(cfg))
        g = np.random.default_rng(0)
        data = dict(
            images=g.standard_normal((2, 3, 64, 64)).astype(np.float32),
            points=g.uniform(0, 64, (2, 3, 2, 2)).astype(np.float32),
            # positive + negative, positive + not-a-point, negative + padding
            labels=np.array([[[1, 0], [1, -1], [0, -10]]] * 2, np.int64),
            boxes=np.sort(g.uniform(0, 64, (2, 3, 2, 2)), axis=2).reshape(2, 3, 4).astype(np.float32),
            masks=(3 * g.standard_normal((2, 1, 32, 32))).astype(np.float32))
        yield cfg, hf, model, params, data


def _run(setup, multimask=True, **prompts):
    cfg, hf, model, params, data = setup
    t = {f"input_{k}": torch.from_numpy(data[k]) for k in prompts}
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(data["images"]), multimask_output=multimask, **t)
    j = {k: jnp.asarray(data[k][:, 0] if k == "masks" else data[k]) for k in prompts}
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p, x, kw: model.apply({"params": p}, x, multimask_output=multimask, **kw))(
            params, jnp.asarray(data["images"].transpose(0, 2, 3, 1)), j)
    return ref, out


def _diff(a, b):
    return float(np.abs(np.asarray(a) - b).max())


def test_converted_tree_matches_init(setup):
    cfg, hf, model, params, data = setup
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.init_inputs(1)))["params"]
    want = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(shapes))
    got = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert got == want


def test_image_embeddings(setup):
    cfg, hf, model, params, data = setup
    with torch.no_grad():
        ref = hf.get_image_embeddings(torch.from_numpy(data["images"])).numpy()
    _, out = _run(setup, True, points=True, labels=True)
    emb = out["image_embeddings"]
    assert emb.shape == (2, 8, 8, 32)
    d = _diff(np.asarray(emb).transpose(0, 3, 1, 2), ref)
    print(f"image_embeddings max abs diff {d:.2e}")
    assert d < ATOL


@pytest.mark.parametrize("prompts, multimask", [
    (("points", "labels"), True),
    (("points", "labels"), False),
    (("boxes",), True),
    (("boxes",), False),
    (("points", "labels", "boxes"), True),
    (("boxes", "masks"), True),
    (("points", "labels", "masks"), False),
    (("masks",), True),
])
def test_masks_and_iou(setup, prompts, multimask):
    ref, out = _run(setup, multimask, **{k: True for k in prompts})
    assert out["masks"].shape == tuple(ref.pred_masks.shape)
    assert out["iou_predictions"].shape == tuple(ref.iou_scores.shape)
    assert out["masks"].shape[2] == (3 if multimask else 1)
    dm, di = _diff(out["masks"], ref.pred_masks.numpy()), _diff(out["iou_predictions"], ref.iou_scores.numpy())
    print(f"{'+'.join(prompts)} multimask={multimask}: masks {dm:.2e} iou {di:.2e}")
    assert dm < ATOL and di < ATOL


def test_gradients(setup):
    """d(sum of mask logits^2 / N + sum of IoUs) / d(params) with every prompt kind."""
    cfg, hf, model, params, data = setup
    hf.zero_grad()
    out_t = hf(pixel_values=torch.from_numpy(data["images"]), input_points=torch.from_numpy(data["points"]),
               input_labels=torch.from_numpy(data["labels"]), input_boxes=torch.from_numpy(data["boxes"]),
               input_masks=torch.from_numpy(data["masks"]))
    loss_t = (out_t.pred_masks ** 2).mean() + out_t.iou_scores.sum()
    loss_t.backward()
    grads_t = hf_sam.convert_hf_sam(
        {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in hf.named_parameters()}, cfg)
    kw = {k: jnp.asarray(data[k]) for k in ("points", "labels", "boxes")}

    def loss_fn(p):
        out = model.apply({"params": p}, jnp.asarray(data["images"].transpose(0, 2, 3, 1)),
                          masks=jnp.asarray(data["masks"][:, 0]), **kw)
        return jnp.mean(out["masks"] ** 2) + jnp.sum(out["iou_predictions"])
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-5)
    flat_t = model_init.flatten(grads_t)
    worst = max((_diff(g, flat_t[k]) / (1.0 + np.abs(flat_t[k]).max()), k)
                for k, g in model_init.flatten(grads).items())
    print(f"gradients: worst max abs diff / (1 + max |grad|) {worst[0]:.2e} at {worst[1]}")
    assert worst[0] < 1e-4


@pytest.mark.parametrize("q, k, table", [(5, 5, 9), (4, 4, 15), (8, 8, 7), (4, 8, 15), (8, 4, 9)])
def test_rel_pos_interpolation(q, k, table):
    attn = transformers.models.sam.modeling_sam.SamVisionAttention(_config().vision_config, window_size=3)
    rel = np.random.default_rng(q * 10 + k).standard_normal((table, 6)).astype(np.float32)
    ref = attn.get_rel_pos(q, k, torch.from_numpy(rel)).numpy()
    got = np.asarray(get_rel_pos(q, k, jnp.asarray(rel)))
    assert got.shape == ref.shape == (q, k, 6)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def _meta_state_dict(cfg):
    with torch.device("meta"):
        m = transformers.SamModel(cfg)
    zero = np.zeros((), np.float32)
    # The published checkpoints carry both names of the tied Fourier matrix.
    sd = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in m.state_dict().items()}
    sd["prompt_encoder.shared_embedding.positional_embedding"] = sd["shared_image_embedding.positional_embedding"]
    return sd


def test_published_layout_vit_b():
    """facebook/sam-vit-base's HF layout and shapes (from a meta-device SamModel with its
    config): every key is consumed and the tree matches ``SAM(**sam_kwargs('vit_b'))``."""
    cfg = transformers.SamConfig(vision_config=dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]))
    sd = _meta_state_dict(cfg)
    params = hf_sam.convert_hf_sam({("sam." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())},
                                   json.loads(cfg.to_json_string()))
    kwargs = hf_sam.sam_kwargs_from_hf_config(json.loads(cfg.to_json_string()))
    preset = SAM(**sam_kwargs("vit_b"))
    model = SAM(**kwargs)
    for f in ("image_size", "patch_size", "width", "depth", "num_heads", "window_size", "prompt_dim",
              "decoder_depth", "decoder_heads", "decoder_mlp_dim", "iou_head_hidden_dim"):
        assert getattr(model, f) == getattr(preset, f), f
    assert tuple(model.global_attn_indexes) == tuple(preset.global_attn_indexes)
    shapes = jax.eval_shape(lambda: preset.init(jax.random.PRNGKey(0), *preset.init_inputs(1)))["params"]
    assert (jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
            == jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.unbox(shapes)))


def test_bad_state_dict_names_keys(setup):
    cfg, hf, model, params, data = setup
    sd = dict(hf.state_dict())
    sd.pop("mask_decoder.iou_token.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mask_decoder.iou_token.weight.*extra.weight"):
        hf_sam.convert_hf_sam(sd, cfg)


def test_model_init_format(setup, tmp_path):
    from safetensors.torch import save_file
    cfg, hf, model, params, data = setup
    path = os.path.join(tmp_path, "model.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}, path)
    cfg.to_json_file(os.path.join(tmp_path, "config.json"))
    assert "hf_sam" in model_init.FORMATS
    flat, what = model_init.read_source({"torch": path, "format": "hf_sam"})
    assert "hf_sam" in what
    want = model_init.flatten({"params": params})
    assert sorted(flat) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(flat[k], v)
