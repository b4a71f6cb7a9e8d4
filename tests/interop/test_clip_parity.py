"""Numerical parity of fmjax CLIP with transformers' CLIPModel, and the open_clip converter."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax.interop import hf_clip  # noqa: E402
from fmjax.models.clip import CLIP  # noqa: E402

ATOL = 1e-5
# HF's patch conv has no bias; fmjax's PatchEmbed does (converted as zeros), so its
# gradient has no HF counterpart.
NO_REF = ("['image']['patch_embed']['proj']['bias']",)


def _config(act: str, eos: int):
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16, hidden_act=act,
                bos_token_id=1, pad_token_id=0, eos_token_id=eos)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_size=32, patch_size=8, hidden_act=act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                                   attn_implementation="eager")


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    return model.eval()


def _tokens(eos: int, legacy: bool):
    """(3, 12) ids with one EOT per row at different positions (HF assumes one per row).

    Chosen so argmax and first-``eos`` pooling pick different positions. Legacy
    (``eos == 2``, argmax pooling): the EOT is the largest id (99), pads are 0 and an
    id 2 sits early in each row. Otherwise larger ids than ``eos`` precede it and the
    last row pads with ``eos`` (pooling takes the first one).
    """
    g = np.random.default_rng(0)
    if legacy:
        ids = g.integers(3, 90, size=(3, 12))
        ids[:, 1] = 2
    else:
        ids = g.choice(np.setdiff1d(np.arange(3, 100), [eos]), size=(3, 12))
        ids[:, 0] = 99
    eot = 99 if legacy else eos
    for row, (pos, pad) in enumerate([(5, 0), (11, 0), (8, 0 if legacy else eos)]):
        ids[row, pos] = eot
        ids[row, pos + 1:] = pad
    return ids


def _setup(act: str, legacy: bool):
    eos = 2 if legacy else 50
    cfg = _config(act, eos)
    torch.manual_seed(0)
    model = _perturb(transformers.CLIPModel(cfg))
    params = hf_clip.convert_hf_clip(model.state_dict(), cfg)
    fm = CLIP(**hf_clip.clip_kwargs_from_hf_config(cfg))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = _tokens(eos, legacy)
    return cfg, model, params, fm, images, torch.as_tensor(ids)


@pytest.fixture(scope="module", params=[("quick_gelu", False), ("gelu", True)],
                ids=["quick_gelu-eos", "gelu-legacy_argmax"])
def setup(request):
    return _setup(*request.param)


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _clip_loss(logits_per_image):
    """HF's symmetric image-text cross entropy (batch of matched pairs)."""
    labels = jnp.arange(logits_per_image.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits_per_image, labels).mean() + ce(logits_per_image.T, labels).mean()) / 2


def _square(images, ids):
    """Same number of images and texts, so the contrastive loss is defined."""
    n = min(images.shape[0], ids.shape[0])
    return images[:n], ids[:n]


def test_kwargs_from_config(setup):
    cfg, model, params, fm, *_ = setup
    eos = cfg.text_config.eos_token_id
    assert fm.text_pool == ("argmax" if eos == 2 else "eos") and fm.eos_token_id == eos
    assert fm.layernorm_eps == 1e-5 and fm.embed_dim == 16 and fm.context_length == 16
    assert fm.activation == cfg.vision_config.hidden_act
    # HF's patch conv has no bias: a converted model must not train one (the OWL trajectory
    # test found one training it)
    assert fm.patch_bias is False


def test_forward_parity(setup):
    cfg, model, params, fm, images, ids = setup
    images, ids = _square(images, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=images, return_loss=True)
    out = jax.jit(fm.apply)({"params": params}, _nhwc(images), jnp.asarray(ids.numpy()))
    diffs = {}
    for ours, theirs in (("image_embeds", ref.image_embeds), ("text_embeds", ref.text_embeds),
                         ("logits_per_image", ref.logits_per_image)):
        np.testing.assert_allclose(np.asarray(out[ours]), theirs.numpy(), atol=ATOL, rtol=1e-5,
                                   err_msg=ours)
        diffs[ours] = float(np.abs(np.asarray(out[ours]) - theirs.numpy()).max())
    loss = float(_clip_loss(out["logits_per_image"]))
    np.testing.assert_allclose(loss, ref.loss.item(), atol=ATOL, rtol=1e-5)
    diffs["loss"] = abs(loss - ref.loss.item())
    np.testing.assert_allclose(float(out["logit_scale"]), np.exp(2.0), rtol=1e-6)
    print("clip max|diff|", diffs)


def test_gradient_parity(setup):
    cfg, model, params, fm, images, ids = setup
    images, ids = _square(images, ids)
    model.zero_grad()
    model(input_ids=ids, pixel_values=images, return_loss=True).loss.backward()
    ref = hf_clip.convert_hf_clip(
        {k: (p.grad if p.grad is not None else torch.zeros_like(p))
         for k, p in model.named_parameters()}, cfg)
    x, t = _nhwc(images), jnp.asarray(ids.numpy())

    @jax.jit
    def grads(p):
        return jax.grad(lambda q: _clip_loss(fm.apply({"params": q}, x, t)["logits_per_image"]))(p)

    flat_ref = {jax.tree_util.keystr(k): v
                for k, v in jax.tree_util.tree_leaves_with_path(ref)}
    flat = jax.tree_util.tree_leaves_with_path(grads(params))
    assert len(flat) == len(flat_ref) and len(flat) > 60
    worst, checked = 0.0, 0
    for path, gr in flat:
        key = jax.tree_util.keystr(path)
        if key in NO_REF:
            continue
        r = flat_ref[key]
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(gr) / scale, r / scale, atol=ATOL, err_msg=key)
        worst = max(worst, float(np.abs(np.asarray(gr) - r).max()) / scale)
        checked += 1
    assert checked == len(flat) - len(NO_REF)
    print("clip grad max|diff|/max(1,|g|max)", worst)


def test_encode_methods_match_call(setup):
    cfg, model, params, fm, images, ids = setup
    v = {"params": params}
    with torch.no_grad():
        ref_t = model.get_text_features(input_ids=ids)
        ref_t = getattr(ref_t, "pooler_output", ref_t)
    emb = fm.apply(v, jnp.asarray(ids.numpy()), normalize=False, method=CLIP.encode_text)
    np.testing.assert_allclose(np.asarray(emb), ref_t.numpy(), atol=ATOL)
    img = fm.apply(v, _nhwc(images), method=CLIP.encode_image)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, atol=1e-6)


def _to_open_clip(sd, cfg):
    """HF CLIPModel state dict -> the open_clip / OpenAI ``CLIP`` layout."""
    sd = {k: v.detach().numpy() for k, v in sd.items() if not k.endswith("position_ids")}
    out = {}

    def blocks(hf, oc, depth):
        for i in range(depth):
            h, o = f"{hf}.encoder.layers.{i}", f"{oc}transformer.resblocks.{i}"
            for n in ("weight", "bias"):
                out[f"{o}.ln_1.{n}"] = sd[f"{h}.layer_norm1.{n}"]
                out[f"{o}.ln_2.{n}"] = sd[f"{h}.layer_norm2.{n}"]
                out[f"{o}.attn.out_proj.{n}"] = sd[f"{h}.self_attn.out_proj.{n}"]
                out[f"{o}.mlp.c_fc.{n}"] = sd[f"{h}.mlp.fc1.{n}"]
                out[f"{o}.mlp.c_proj.{n}"] = sd[f"{h}.mlp.fc2.{n}"]
                out[f"{o}.attn.in_proj_{n}"] = np.concatenate(
                    [sd[f"{h}.self_attn.{p}_proj.{n}"] for p in "qkv"], axis=0)

    v = "vision_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for n in ("weight", "bias"):
        out[f"visual.ln_pre.{n}"] = sd[f"{v}.pre_layrnorm.{n}"]
        out[f"visual.ln_post.{n}"] = sd[f"{v}.post_layernorm.{n}"]
        out[f"ln_final.{n}"] = sd[f"text_model.final_layer_norm.{n}"]
    blocks(v, "visual.", cfg.vision_config.num_hidden_layers)
    blocks("text_model", "", cfg.text_config.num_hidden_layers)
    out["visual.proj"] = sd["visual_projection.weight"].T
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].T
    out["logit_scale"] = sd["logit_scale"]
    out["attn_mask"] = np.triu(np.full((16, 16), -np.inf, np.float32), 1)  # a stray buffer
    return out


def test_open_clip_layout(setup):
    cfg, model, params, fm, images, ids = setup
    oc = _to_open_clip(model.state_dict(), cfg)
    converted = hf_clip.convert_open_clip(oc, head_dim=8)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
    kw = hf_clip.clip_kwargs_from_open_clip(oc, activation=fm.activation, head_dim=8)
    hf_kw = hf_clip.clip_kwargs_from_hf_config(cfg)
    for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "embed_dim", "text_width",
              "text_depth", "text_heads", "text_mlp_dim", "vocab_size", "context_length"):
        assert kw[k] == hf_kw[k], k
    assert kw["text_pool"] == "argmax" and kw["loss"] == "softmax"
    # SigLIP-style open_clip checkpoints carry a logit_bias.
    oc["logit_bias"] = np.float32(-3.0)
    sig = hf_clip.convert_open_clip(oc, num_heads=4, text_heads=4)
    kw = hf_clip.clip_kwargs_from_open_clip(oc, activation="gelu", head_dim=8)
    assert kw["loss"] == "sigmoid"
    out = CLIP(**kw).apply({"params": sig}, _nhwc(images), jnp.asarray(ids.numpy()))
    assert float(out["logit_bias"]) == -3.0 and out["logits_per_image"].shape == (4, 3)


def test_missing_and_unexpected_keys_are_named(setup):
    cfg, model, *_ = setup
    sd = dict(model.state_dict())
    sd.pop("text_model.encoder.layers.1.mlp.fc2.weight")
    sd["vision_model.extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match=r"layers.1.mlp.fc2.weight.*vision_model.extra.weight"):
        hf_clip.convert_hf_clip(sd, cfg)


def test_load_safetensors_path(setup, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg, model, params, *_ = setup
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           hf_clip.convert_hf_clip(path, cfg), params)
