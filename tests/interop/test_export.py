"""Export (issue 13): fmjax params -> safetensors + reference config, loaded back by the reference.

For each model and format a tiny fmjax model with perturbed random params is exported, loaded
with transformers / diffusers ``from_pretrained`` (open_clip: a torch forward written from
open_clip's modules with ``nn.MultiheadAttention``, open_clip itself is not installed here) and
compared with fmjax's forward in float32; re-importing the files with the ``fmjax/interop``
converters gives the params back bit for bit. Unsupported options, a format that does not fit,
an existing --out and a missing workdir are one-line errors writing nothing; the CLI runs on a
real tiny workdir.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from fmjax.errors import ConfigError  # noqa: E402
from fmjax.interop import diffusers_unet, export, hf_clip, hf_dinov2, hf_vit  # noqa: E402
from fmjax.models.clip import CLIP  # noqa: E402
from fmjax.models.mae import MAE  # noqa: E402
from fmjax.models.unet import UNet  # noqa: E402
from fmjax.models.vit import ViT  # noqa: E402
from fmjax.testing import assert_one_line_error, perturb, run_cli  # noqa: E402

ATOL, RTOL = 1e-4, 1e-5
VIT = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, layernorm_eps=1e-6)


def _images(b=2, size=32, c=3, seed=1):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (b, size, size, c)))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _close(ours, theirs, what=""):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=RTOL, atol=ATOL,
                               err_msg=what)


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a),
                 jax.tree.map(np.asarray, b))


def _init(model, *args, seed=0, scale=0.2, **kwargs):
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), *args, **kwargs)["params"])
    return perturb(params, seed=seed, scale=scale)


# ---------------------------------------------------------------------------- ViT / DINOv2


def test_vit_classifier_to_transformers(tmp_path):
    model = ViT(num_classes=5, **VIT)
    x = _images()
    params = _init(model, x)
    out = tmp_path / "vit"
    result = export.export(model, params, "hf", str(out))
    assert result["reference"] == "ViTForImageClassification"
    assert sorted(result["files"]) == ["config.json", "fmjax_export.json", "model.safetensors"]
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "ViTForImageClassification"
    with torch.no_grad():
        logits = hf(pixel_values=_nchw(x)).logits.numpy()
    _close(model.apply({"params": params}, x)["logits"], logits, "logits")
    cfg = transformers.AutoConfig.from_pretrained(out)
    back = hf_vit.convert_hf_vit(hf_vit.load_safetensors(str(out / "model.safetensors")), cfg)
    _same(back, params)
    assert ViT(**hf_vit.vit_kwargs_from_hf_config(cfg)).num_classes == 5


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_vit_backbone_to_transformers(tmp_path, pos_embed):
    model = ViT(pos_embed=pos_embed, activation="gelu_tanh", **VIT)
    x = _images()
    params = _init(model, x)
    out = tmp_path / "vit"
    export.export(model, params, "hf", str(out), image_size=32)
    hf = transformers.ViTModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(pixel_values=_nchw(x))
    ours = model.apply({"params": params}, x)
    _close(ours["tokens"], ref.last_hidden_state, "tokens")
    _close(ours["pre_logits"], ref.pooler_output, "pooler_output (identity pooler on CLS)")


@pytest.mark.parametrize("registers,layerscale", [(0, 0.5), (4, 0.5), (2, None)],
                         ids=["dinov2", "registers", "registers_no_layerscale"])
def test_dino_backbone_to_dinov2(tmp_path, registers, layerscale):
    model = ViT(layerscale=layerscale, num_registers=registers, pos_interp="torch_bicubic"
                if not registers else "resize", **VIT)
    x = _images()
    params = _init(model, x)
    out = tmp_path / "dinov2"
    result = export.export(model, params, "hf", str(out))
    want = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    assert result["reference"] == want
    hf = transformers.AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == want
    with torch.no_grad():
        ref = hf(pixel_values=_nchw(x))
    ours = model.apply({"params": params}, x)
    _close(ours["tokens"], ref.last_hidden_state, "tokens")
    _close(ours["pre_logits"], ref.pooler_output, "pooler_output")
    if layerscale is not None:
        cfg = transformers.AutoConfig.from_pretrained(out)
        sd = hf_vit.load_safetensors(str(out / "model.safetensors"))
        _same(hf_dinov2.convert_hf_dinov2(sd, cfg), params)


def test_mean_pool_backbone_is_recorded(tmp_path):
    """A headless mean-pooled backbone (the DINO default) exports; its tokens match and
    config.json / the notes say that fmjax pools the patch tokens, not pooler_output."""
    model = ViT(pool="mean", **VIT)
    x = _images()
    params = _init(model, x)
    result = export.export(model, params, "hf", str(tmp_path / "v"))
    assert any("pool='mean'" in n for n in result["notes"])
    hf = transformers.ViTModel.from_pretrained(tmp_path / "v").eval()
    assert hf.config.fmjax_pool == "mean"
    with torch.no_grad():
        hidden = hf(pixel_values=_nchw(x)).last_hidden_state
    _close(model.apply({"params": params}, x)["pre_logits"], hidden[:, 1:].mean(1), "mean pool")


# ---------------------------------------------------------------------------- MAE


def test_mae_to_transformers(tmp_path):
    model = MAE(decoder_width=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=True, **VIT)
    x = _images(3)
    params = _init(model, x, noise=jnp.zeros((3, 16)))
    out = tmp_path / "mae"
    export.export(model, params, "hf", str(out), image_size=32)
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
    noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (3, 16)))
    with torch.no_grad():
        ref = hf(pixel_values=_nchw(x), noise=torch.from_numpy(np.array(noise)))
    ours = model.apply({"params": params}, x, noise=jnp.asarray(noise))
    np.testing.assert_array_equal(np.asarray(ours["mask"]), ref.mask.numpy())
    _close(ours["pred"], ref.logits, "pred")
    _close(ours["loss"], ref.loss, "loss")
    cfg = transformers.AutoConfig.from_pretrained(out)
    sd = hf_vit.load_safetensors(str(out / "model.safetensors"))
    _same(hf_vit.convert_hf_vit_mae(sd, cfg), params)  # checks the sin-cos tables too
    with pytest.raises(ConfigError, match="image size"):
        export.export(model, params, "hf", str(tmp_path / "no_size"))


# ---------------------------------------------------------------------------- CLIP

CLIP_KW = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, embed_dim=16,
               text_width=32, text_depth=2, text_heads=4, text_mlp_dim=64, vocab_size=100,
               context_length=16, layernorm_eps=1e-5)


def _tokens(legacy: bool, eos: int = 50):
    """(3, 12) ids, one end token per row, where argmax and first-``eos`` pooling differ."""
    g = np.random.default_rng(0)
    ids = g.integers(3, 90, size=(3, 12))
    if legacy:
        ids[:, 1] = 2
    else:
        ids[ids == eos] = 51
        ids[:, 0] = 99
    for row, pos in enumerate((5, 11, 8)):
        ids[row, pos] = 99 if legacy else eos
        ids[row, pos + 1:] = 0
    return ids.astype(np.int32)


def _clip(**kw):
    model = CLIP(**dict(CLIP_KW, **kw))
    x, ids = _images(3), _tokens(kw.get("text_pool", "argmax") == "argmax", kw.get("eos_token_id", 50))
    params = _init(model, x, ids)
    return model, params, x, ids


@pytest.mark.parametrize("kw", [dict(activation="quick_gelu"),
                                dict(activation="gelu", text_pool="eos", eos_token_id=50)],
                         ids=["quick_gelu-argmax", "gelu-eos"])
def test_clip_to_transformers(tmp_path, kw):
    model, params, x, ids = _clip(**kw)
    assert np.any(np.asarray(params["image"]["patch_embed"]["proj"]["bias"]) != 0)
    out = tmp_path / "clip"
    result = export.export(model, params, "hf", str(out))
    assert any("folded" in n for n in result["notes"])
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=_nchw(x))
    ours = model.apply({"params": params}, x, ids)
    for key in ("image_embeds", "text_embeds", "logits_per_image"):
        _close(ours[key], getattr(ref, key), key)


def _open_clip_forward(sd, cfg, images, ids):
    """open_clip ``CLIP.forward`` (VisionTransformer pool 'tok', TextTransformer) in torch,
    from open_clip's modules: nn.MultiheadAttention on the fused in_proj, LayerNorm, GELU /
    QuickGELU, causal mask of -inf above the diagonal."""
    F = torch.nn.functional
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    quick = cfg["quick_gelu"]

    def act(h, kw):
        return h * torch.sigmoid(1.702 * h) if quick else F.gelu(h, **(kw or {}))

    def tower(x, prefix, tcfg, heads, mask):
        eps = (tcfg.get("norm_kwargs") or {}).get("eps", 1e-5)
        w = x.shape[-1]
        for i in range(tcfg["layers"]):
            p = f"{prefix}transformer.resblocks.{i}."
            mha = torch.nn.MultiheadAttention(w, heads, batch_first=True)
            mha.load_state_dict({k: sd[p + "attn." + k] for k in
                                 ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
            h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
            x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
            h = act(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]),
                    tcfg.get("act_kwargs"))
            x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x, eps

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(_nchw(images), sd["visual.conv1.weight"], stride=v["patch_size"])
    x = x.flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    w = x.shape[-1]
    eps = (v.get("norm_kwargs") or {}).get("eps", 1e-5)
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps)
    x, eps = tower(x, "visual.", v, v["width"] // v["head_width"], None)
    x = F.layer_norm(x, (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps)
    image = x[:, 0] @ sd["visual.proj"]
    ids = torch.from_numpy(ids).long()
    n = ids.shape[1]
    y = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu_(1)
    y, eps = tower(y, "", t, t["heads"], mask)
    y = F.layer_norm(y, (y.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"], eps)
    pos = (ids == t["eos_id"]).int().argmax(-1) if t["pool_type"] == "eos" else ids.argmax(-1)
    text = y[torch.arange(y.shape[0]), pos] @ sd["text_projection"]
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = sd["logit_scale"].exp() * image @ text.T
    if "logit_bias" in sd:
        logits = logits + sd["logit_bias"]
    return image.numpy(), text.numpy(), logits.numpy()


@pytest.mark.parametrize("kw", [dict(activation="quick_gelu"),
                                dict(activation="gelu", text_activation="gelu_tanh",
                                     text_pool="eos", eos_token_id=50, loss="sigmoid",
                                     layernorm_eps=1e-6)],
                         ids=["openai", "siglip_style"])
def test_clip_to_open_clip(tmp_path, kw):
    model, params, x, ids = _clip(**kw)
    out = tmp_path / "oc"
    result = export.export(model, params, "open_clip", str(out),
                           preprocess=dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert sorted(result["files"]) == ["fmjax_export.json", "open_clip_config.json",
                                       "open_clip_model.safetensors"]
    with open(out / "open_clip_config.json") as f:
        full = json.load(f)
    cfg = full["model_cfg"]
    assert full["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert cfg["embed_dim"] == 16 and cfg["vision_cfg"]["image_size"] == 32
    assert cfg["quick_gelu"] == (kw["activation"] == "quick_gelu")
    assert ("init_logit_bias" in cfg) == (kw.get("loss") == "sigmoid")
    sd = hf_vit.load_safetensors(str(out / "open_clip_model.safetensors"))
    with torch.no_grad():
        image, text, logits = _open_clip_forward(sd, cfg, x, ids)
    ours = model.apply({"params": params}, x, ids)
    _close(ours["image_embeds"], image, "image_embeds")
    _close(ours["text_embeds"], text, "text_embeds")
    _close(ours["logits_per_image"], logits, "logits")
    back = hf_clip.convert_open_clip(sd, num_heads=4, text_heads=4)
    assert np.all(back["image"]["patch_embed"]["proj"]["bias"] == 0)  # folded into pos_embed
    back["image"]["patch_embed"]["proj"]["bias"] = params["image"]["patch_embed"]["proj"]["bias"]
    back["image"]["pos_embed"] = params["image"]["pos_embed"]
    _same(back, params)


# ---------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("kw", [dict(num_classes=3, attention_head_dim=8,
                                     resnet_time_scale_shift="scale_shift"),
                                dict(learn_sigma=True, flip_sin_to_cos=True, freq_shift=0.0,
                                     downsample_padding=1, mid_block_scale_factor=1.5)],
                         ids=["class_cond", "uncond_learn_sigma"])
def test_unet_to_diffusers(tmp_path, kw):
    model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 sample_size=16, num_groups=4, dropout=0.0, **kw)
    x = _images(3, 16)
    t = np.array([0, 17, 999], np.int32)
    y = np.array([0, 2, 3], np.int32) if kw.get("num_classes") else None
    params = _init(model, x, t, y, scale=0.1)
    out = tmp_path / "unet"
    result = export.export(model, params, "diffusers", str(out))
    assert sorted(result["files"]) == ["config.json", "diffusion_pytorch_model.safetensors",
                                       "fmjax_export.json"]
    ref = diffusers.UNet2DModel.from_pretrained(out).eval()
    with torch.no_grad():
        want = ref(_nchw(x), torch.from_numpy(t).long(),
                   class_labels=None if y is None else torch.from_numpy(y).long()).sample
    got = model.apply({"params": params}, x, t, y)
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() / max(1.0, np.abs(want).max()) < 1e-4
    sd = diffusers_unet.load_safetensors(str(out / "diffusion_pytorch_model.safetensors"))
    _same(diffusers_unet.convert_diffusers_unet(sd, dict(ref.config)), params)


# ---------------------------------------------------------------------------- errors


UNSUPPORTED = {
    "conv_stem": (lambda: ViT(stem="conv", **VIT), "hf", "stem='conv'"),
    "mean_pool_head": (lambda: ViT(pool="mean", num_classes=3, **VIT), "hf", "pool='mean'"),
    "no_class_token": (lambda: ViT(pool="mean", class_token=False, **VIT), "hf", "class_token"),
    "pre_norm": (lambda: ViT(pre_norm=True, **VIT), "hf", "pre_norm"),
    "relu": (lambda: ViT(activation="relu", **VIT), "hf", "activation='relu'"),
    "dinov2_mlp_ratio": (lambda: ViT(**dict(VIT, mlp_dim=48), layerscale=1.0), "hf", "mlp_dim=48"),
    "clip_sigmoid_hf": (lambda: CLIP(loss="sigmoid", **CLIP_KW), "hf", "logit bias"),
    "clip_conv_stem": (lambda: CLIP(stem="conv", **CLIP_KW), "open_clip", "stem='conv'"),
    "clip_mixed_act": (lambda: CLIP(activation="quick_gelu", text_activation="gelu", **CLIP_KW),
                       "open_clip", "QuickGELU"),
    "unet_text": (lambda: UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(8,), sample_size=16, num_groups=4,
                               context_dim=8), "diffusers", "context_dim"),
    "vit_as_diffusers": (lambda: ViT(**VIT), "diffusers", "valid for it: hf"),
    "mae_as_open_clip": (lambda: MAE(**VIT), "open_clip", "valid for it: hf"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_is_named_and_writes_nothing(tmp_path, case):
    make, fmt, text = UNSUPPORTED[case]
    model = make()
    with pytest.raises(ConfigError, match=None) as e:
        export.check_model(model, fmt)
    assert text in str(e.value), str(e.value)
    with pytest.raises(ConfigError):
        export.export(model, {}, fmt, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_existing_out_is_never_overwritten(tmp_path):
    model = ViT(**VIT)
    params = _init(model, _images())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="never overwrites"):
        export.export(model, params, "hf", str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export.export(model, params, "hf", str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    export.export(model, params, "hf", str(tmp_path / "empty"), dtype="bfloat16")
    hf = transformers.ViTModel.from_pretrained(tmp_path / "empty")
    assert hf.embeddings.cls_token.dtype == torch.bfloat16
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_params_that_do_not_fit_are_refused(tmp_path):
    model = ViT(**VIT)
    params = _init(model, _images())
    params["encoder"]["block_0"]["extra"] = {"kernel": np.ones(3, np.float32)}
    with pytest.raises(ConfigError, match="extra"):
        export.export(model, params, "hf", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_invert_checks_every_element():
    from fmjax.interop.invert import invert
    shapes = {"w": (2, 3), "b": (3,)}
    conv = lambda sd: {"k": sd["w"].T, "b": sd["b"]}  # noqa: E731
    params = {"k": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.ones(3, np.float32)}
    np.testing.assert_array_equal(invert(conv, shapes, params)["w"], params["k"].T)
    with pytest.raises(ValueError, match=r"not produced by any fmjax param: \['extra'\]"):
        invert(conv, dict(shapes, extra=(2,)), params)
    assert invert(conv, dict(shapes, extra=(2,)), params, fill={"extra": np.ones(2)})["extra"][0] == 1
    made = lambda sd: dict(conv(sd), z=np.zeros(2, np.float32))  # noqa: E731  (like CLIP's bias)
    invert(made, shapes, dict(params, z=np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="z has no counterpart"):
        invert(made, shapes, dict(params, z=np.ones(2, np.float32)))
    twice = lambda sd: dict(conv(sd), b2=sd["b"])  # noqa: E731
    invert(twice, shapes, dict(params, b2=params["b"]))
    with pytest.raises(ValueError, match="disagrees"):
        invert(twice, shapes, dict(params, b2=params["b"] + 1))
    n = 2 ** 22 + 6  # indices past one probe pass (float32 holds integers to 2**24)
    big = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = invert(lambda sd: {"v": sd["a"][::-1].reshape(2, -1)}, {"a": (n,)},
                 {"v": big[::-1].reshape(2, -1)})
    np.testing.assert_array_equal(out["a"], big)


def test_select_weights():
    from types import SimpleNamespace
    from fmjax.train.export import select_weights
    state = SimpleNamespace(params={"backbone": "student", "head": "h", "model": "raw"},
                            extra={"teacher": {"backbone": "teacher"}, "ema": {"model": "ema"}})
    assert select_weights("dino", state)[0] == "teacher"
    assert select_weights("dino", state, "params")[0] == "student"
    assert select_weights("diffusion", state)[0] == "ema"
    assert select_weights("diffusion", state, "params")[0] == "raw"
    assert select_weights("linear_probe", state)[0] == "student"
    plain = SimpleNamespace(params={"patch_embed": 1}, extra={})
    assert select_weights("supervised", plain)[0] is plain.params


# ---------------------------------------------------------------------------- CLI

_WORKDIRS = {}


@pytest.fixture
def vit_workdir(tiny_config, tmp_path_factory):
    """A tiny supervised ViT workdir (linear patch stem, class-token pooling), trained 2 steps
    once per module."""
    if "vit" not in _WORKDIRS:
        from fmjax.train import loop
        c = tiny_config("supervised", **{"model.stem": "patch", "model.pool": "cls"})
        c.total_steps, c.checkpoint_every, c.batch_size = 2, 2, 8
        root = tmp_path_factory.mktemp("export_cli")
        loop.train_and_evaluate(c, str(root / "vit"), devices=jax.devices()[:1])
        _WORKDIRS["vit"] = str(root / "vit")
    return _WORKDIRS["vit"]


def test_dino_workdir_exports_the_teacher_backbone(tiny_config, tmp_path):
    """A tiny DINO workdir: 'auto' writes the EMA teacher's ViT backbone (no DINO head),
    'params' the student's; both re-import exactly; the mean pooling is noted."""
    from fmjax.train import loop
    from fmjax.train.export import export_workdir
    from fmjax.train.restore import load_checkpoint
    c = tiny_config("dino", **{"model.stem": "patch"})
    c.total_steps, c.checkpoint_every, c.batch_size = 2, 2, 8
    workdir = str(tmp_path / "dino")
    devices = jax.devices()[:1]
    loop.train_and_evaluate(c, workdir, devices=devices)
    _, objective, _, _, state, _ = load_checkpoint(workdir, devices=devices)
    teacher, student = state.extra["teacher"]["backbone"], state.params["backbone"]
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree.leaves(teacher), jax.tree.leaves(student)))
    for weights, want in (("auto", teacher), ("params", student)):
        out = tmp_path / weights
        result = export_workdir(workdir, "hf", str(out), weights=weights, devices=devices)
        assert result["reference"] == "ViTModel" and "head" not in str(result["files"])
        cfg = transformers.AutoConfig.from_pretrained(out)
        back = hf_vit.convert_hf_vit(hf_vit.load_safetensors(str(out / "model.safetensors")), cfg)
        _same(back, want)
    assert any("pool='mean'" in n for n in result["notes"])
    x = _images(2)
    hf = transformers.ViTModel.from_pretrained(tmp_path / "auto").eval()
    with torch.no_grad():
        ref = hf(pixel_values=_nchw(x)).last_hidden_state
    _close(objective.backbone.apply({"params": teacher}, x)["tokens"], ref, "teacher tokens")


def test_cli_exports_a_workdir(vit_workdir, tmp_path):
    from fmjax.train.restore import load_checkpoint
    out = tmp_path / "hf_out"
    proc = run_cli("export", f"--workdir={vit_workdir}", "--format=hf", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ViTForImageClassification" in proc.stdout and "step 2" in proc.stdout
    info = json.loads((out / "fmjax_export.json").read_text())
    assert info["source"]["step"] == 2 and info["source"]["objective"] == "supervised"
    assert info["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    _, objective, _, _, state, _ = load_checkpoint(vit_workdir, devices=jax.devices()[:1])
    x = _images(4)
    ours = objective.model.apply({"params": state.params}, x)["logits"]
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        _close(ours, hf(pixel_values=_nchw(x)).logits, "logits")


CLI_ERRORS = {
    "unknown_format": (["--format=onnx"], ["--format", "hf"]),
    "format_does_not_fit": (["--format=diffusers"], ["--format=diffusers does not fit", "'vit'",
                                                      "valid for it: hf"]),
    "existing_out": (["--format=hf", "EXISTING"], ["already exists", "never overwrites"]),
    "missing_workdir": (["--format=hf", "--workdir=MISSING"], ["config.json not found"]),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_errors_are_one_line(vit_workdir, tmp_path, case):
    flags, texts = CLI_ERRORS[case]
    out = tmp_path / "out"
    args = [f"--workdir={vit_workdir}", f"--out={out}"]
    for flag in flags:
        if flag == "EXISTING":
            out.mkdir()
            (out / "weights.bin").write_text("keep")
        elif flag.endswith("MISSING"):
            args[0] = f"--workdir={tmp_path / 'nope'}"
        else:
            args.append(flag)
    before = sorted(os.listdir(vit_workdir))
    proc = run_cli("export", *args, timeout=120)
    assert_one_line_error(proc, *texts)
    assert sorted(os.listdir(vit_workdir)) == before
    assert os.listdir(tmp_path) == (["out"] if case == "existing_out" else [])
    if case == "existing_out":
        assert os.listdir(out) == ["weights.bin"]


def test_cli_unsupported_option_fails_before_restoring(vit_workdir, tmp_path):
    """A conv-stem model: named in one line from DIR/config.json alone (this workdir has no
    checkpoint, so an error raised after restoring would say so instead)."""
    with open(os.path.join(vit_workdir, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["stem"] = "conv"
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("export", f"--workdir={tmp_path / 'wd'}", "--format=hf",
                   f"--out={tmp_path / 'out'}", timeout=120)
    assert_one_line_error(proc, "model.stem='conv'", "no transformers ViT / DINOv2 equivalent")
    assert sorted(os.listdir(tmp_path)) == ["wd"]
