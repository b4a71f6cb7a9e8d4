"""CLIP's tower sub-configs (issue 13: composite models take sub-configs, as big_vision's
two_towers.py): ``config.model.image`` is any registered 'pooled' model, ``config.model.text``
TextTransformer fields. Without them CLIP is exactly the flat-key model it was (a frozen copy of
the previous construction below); with a sub-config equal to the flat tower nothing changes;
other backbones train; LiT (configs/clip.py:lit) loads a supervised run's ViT as the locked
image tower through config.model_init."""
import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fmjax.errors import ConfigError
from fmjax.models import layers, registry
from fmjax.models.clip import CLIP, LOSSES, l2_normalize
from fmjax.models.text import TextTransformer
from fmjax.models.vit import ViT

Dtype = Any
FLAT_IMAGE = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
TEXT = dict(embed_dim=16, text_width=24, text_depth=1, text_heads=2, text_mlp_dim=48,
            vocab_size=50, context_length=12)
# The flat keys' image tower, written as a sub-config (CLIP's fixed ViT options made explicit).
VIT_TOWER = dict(name="vit", **FLAT_IMAGE, activation="quick_gelu", pool="cls", class_token=True,
                 pos_embed="learned", pre_norm=True, num_classes=0, stem="patch",
                 layernorm_eps=1e-5)


class LegacyCLIP(nn.Module):
    """fmjax.models.clip.CLIP before the tower sub-configs (commit 5cf1008), verbatim but for
    the docstrings: the reference for 'no sub-config = the same model'."""
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    embed_dim: int = 512
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    text_pool: str = "argmax"
    eos_token_id: Optional[int] = None
    activation: str = "quick_gelu"
    text_activation: Optional[str] = None
    layernorm_eps: float = 1e-5
    loss: str = "softmax"
    logit_scale_init: Optional[float] = None
    logit_bias_init: Optional[float] = None
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "xla"
    remat: bool = False
    stem: str = "patch"
    patch_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown CLIP loss {self.loss!r}; valid: {LOSSES}.")
        common = dict(dropout=self.dropout, drop_path=self.drop_path,
                      layernorm_eps=self.layernorm_eps, attention_impl=self.attention_impl,
                      remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        vit = ViT
        if not self.patch_bias:
            vit = nn.map_variables(ViT, "params", self._without_patch_bias,
                                   init=self.is_initializing())
        self.image = vit(
            width=self.width, depth=self.depth, num_heads=self.num_heads,
            mlp_dim=self.mlp_dim, patch_size=self.patch_size, activation=self.activation,
            pool="cls", class_token=True, pos_embed="learned", pre_norm=True, num_classes=0,
            stem=self.stem, **common)
        self.image_proj = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=layers.part(nn.initializers.normal(self.width ** -0.5),
                                    ("embed", None)))
        self.text = TextTransformer(
            vocab_size=self.vocab_size, context_length=self.context_length,
            width=self.text_width, depth=self.text_depth, num_heads=self.text_heads,
            mlp_dim=self.text_mlp_dim, embed_dim=self.embed_dim,
            activation=self.text_activation or self.activation, pool=self.text_pool,
            eos_token_id=self.eos_token_id, **common)
        sigmoid = self.loss == "sigmoid"
        scale = self.logit_scale_init
        if scale is None:
            scale = math.log(10.0) if sigmoid else math.log(1 / 0.07)
        self.logit_scale = self.param(
            "logit_scale", layers.part(nn.initializers.constant(scale), ()), (),
            self.param_dtype)
        bias = self.logit_bias_init
        if bias is None and sigmoid:
            bias = -10.0
        self.logit_bias = None if bias is None else self.param(
            "logit_bias", layers.part(nn.initializers.constant(bias), ()), (), self.param_dtype)

    def _without_patch_bias(self, variables):
        if self.is_initializing():
            return variables
        params = dict(variables["params"])
        embed = dict(params["patch_embed"])
        proj = dict(embed["proj"])
        proj["bias"] = jnp.zeros_like(proj["bias"])
        embed["proj"], params["patch_embed"] = proj, embed
        return dict(variables, params=params)

    def __call__(self, images, tokens, train: bool = False) -> Dict[str, jax.Array]:
        image_embeds = l2_normalize(self.image_proj(self.image(images, train=train)["pre_logits"]))
        text_embeds = l2_normalize(self.text(tokens, train=train)["embedding"])
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits = scale * jnp.einsum("id,td->it", image_embeds.astype(jnp.float32),
                                    text_embeds.astype(jnp.float32))
        out = dict(image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=scale)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.astype(jnp.float32)
            logits = logits + out["logit_bias"]
        out["logits_per_image"] = logits
        return out


def _inputs(seed=0):
    images = jax.random.normal(jax.random.PRNGKey(seed), (3, 32, 32, 3))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (3, 12), 1, 50)
    return images, tokens


def _init_apply(model, images, tokens):
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens)
    # a perturbed (trained-looking) state: zero-init biases / the patch bias matter too
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(7), x.shape),
                          nn.meta.unbox(variables["params"]))
    return variables, jax.jit(model.apply)({"params": params}, images, tokens)


def _assert_same(a, b):
    (va, oa), (vb, ob) = a, b
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert set(oa) == set(ob)
    for k in oa:
        np.testing.assert_array_equal(np.asarray(oa[k]), np.asarray(ob[k]), err_msg=k)


@pytest.mark.parametrize("kw", [
    {},
    dict(loss="sigmoid", stem="conv", activation="gelu", text_activation="quick_gelu"),
    dict(patch_bias=False, layernorm_eps=1e-6, text_pool="eos", eos_token_id=49),
], ids=["default", "sigmoid_conv", "no_patch_bias"])
def test_no_sub_config_is_the_previous_model(kw):
    """(a) No sub-config: the param tree (names, shapes, partitioning, init values) and the
    outputs equal the previous construction's bit for bit."""
    images, tokens = _inputs()
    _assert_same(_init_apply(CLIP(**FLAT_IMAGE, **TEXT, **kw), images, tokens),
                 _init_apply(LegacyCLIP(**FLAT_IMAGE, **TEXT, **kw), images, tokens))


def test_vit_sub_config_equal_to_the_flat_tower():
    """(b) ``image=`` a ViT sub-config equal to the flat keys' tower (and ``text=`` the flat text
    fields), given as dicts, ConfigDicts or through the registry: the same model."""
    images, tokens = _inputs(3)
    flat = _init_apply(CLIP(**FLAT_IMAGE, **TEXT), images, tokens)
    text_kw = {k: v for k, v in TEXT.items() if k.startswith("text_")}
    rest = {k: v for k, v in TEXT.items() if k not in text_kw}
    text_sub = dict(width=text_kw["text_width"], depth=text_kw["text_depth"],
                    num_heads=text_kw["text_heads"], mlp_dim=text_kw["text_mlp_dim"])
    _assert_same(flat, _init_apply(CLIP(**TEXT, image=VIT_TOWER), images, tokens))
    _assert_same(flat, _init_apply(CLIP(**TEXT, image=tuple(VIT_TOWER.items())), images, tokens))
    _assert_same(flat, _init_apply(CLIP(**rest, image=VIT_TOWER, text=text_sub), images, tokens))
    # From a config: nested ConfigDicts become plain dicts, the model hashes and clones.
    cfg = ml_collections.ConfigDict(dict(name="clip", **TEXT, image=dict(VIT_TOWER, name="vit",
                                                                         variant="Ti/8")))
    model = registry.build_model(cfg)
    assert isinstance(model, CLIP) and model.image["width"] == 32 and model.image_patch_size == 8
    assert hash(model) == hash(model.clone()) and isinstance(registry.model_kwargs(cfg)["image"], dict)
    _assert_same(flat, _init_apply(model, images, tokens))


def _clip_config(image, **model):
    from fmjax.testing import load_config
    c = load_config("clip")
    c.model = dict(name="clip", **TEXT, image=image, **model)
    c.data.tokenize = dict(context_length=12, tokenizer="words", vocab_size=50)
    c.objective.hard_negatives = False
    return c


def _one_step(config):
    """The objective's loss, a gradient and an Adam step: finite, and every tower moves."""
    from fmjax.objectives.base import make_objective
    obj = make_objective(config)
    images, tokens = _inputs(5)
    batch = dict(image=images, tokens=tokens)
    params, extra = jax.jit(obj.init)(jax.random.PRNGKey(0), batch)
    params = nn.meta.unbox(params)
    (loss, _), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True), static_argnums=4)(
        params, extra, batch, jax.random.PRNGKey(1), 0)
    tx = optax.adam(1e-3)
    new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(params, grads)
    assert np.isfinite(float(loss))
    for tower in ("image", "image_proj", "text"):
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                    zip(jax.tree.leaves(params[tower]), jax.tree.leaves(new[tower])))
        assert moved > 0, tower
    return obj, params


def test_other_backbones_train():
    """(b) A mean-pooled, conv-stem ViT of another width than the text tower, and a registered
    CNN (no patch grid, pooled width 8): image_proj reads the width at init; one step trains."""
    obj, params = _one_step(_clip_config(dict(name="vit", variant="Ti/8", width=40, depth=1,
                                              num_heads=2, mlp_dim=80, pool="mean", stem="conv")))
    assert params["image_proj"]["kernel"].shape == (40, 16) and obj.patch_size == 8
    assert "cls_token" in params["image"] and "pre_norm" not in params["image"]

    @registry.register_model("tiny_cnn_tower_for_test")
    class TinyCNN(nn.Module):
        width: int = 8
        dtype: Any = jnp.float32
        capabilities = frozenset({"pooled"})

        @nn.compact
        def __call__(self, images, train=False):
            x = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2), dtype=self.dtype)(images))
            return dict(pre_logits=x.mean(axis=(1, 2)))

    try:
        obj, params = _one_step(_clip_config(dict(name="tiny_cnn_tower_for_test", width=8)))
        assert params["image_proj"]["kernel"].shape == (8, 16) and obj.patch_size is None
        # image_proj's init: normal(pooled width ** -0.5), as the flat tower's normal(width ** -0.5)
        assert 0.15 < float(np.std(params["image_proj"]["kernel"])) * math.sqrt(8) < 2.0
    finally:
        registry._REGISTERED.pop("tiny_cnn_tower_for_test", None)


def test_resnet_tower_carries_its_batchnorm_statistics():
    """ALIGN's convolutional tower (configs/clip.py:align): a ResNet image tower's running
    statistics live in the objective state (extra['batch_stats']['image']), move with a training
    step, and are what features() reads; gradient accumulation and a locked BN tower are refused."""
    from fmjax.objectives.base import make_objective
    tower = dict(name="resnet", variant="18", stem="cifar", stem_width=8, dims=(8, 8, 16, 16))
    obj, params = _one_step(_clip_config(tower))
    assert obj.state_keys == ("batch_stats",) and params["image_proj"]["kernel"].shape == (16, 16)
    images, tokens = _inputs(5)
    batch = dict(image=images, tokens=tokens)
    params, extra = jax.jit(obj.init)(jax.random.PRNGKey(0), batch)
    stats = extra["batch_stats"]["image"]
    _, (_, new_extra) = jax.jit(obj.loss, static_argnums=4)(params, extra, batch, jax.random.PRNGKey(1), 0)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(stats), jax.tree.leaves(new_extra["batch_stats"]["image"])))
    assert moved > 1e-4
    # eval-mode features use the carried running statistics: other statistics, other features
    f0 = obj.features(params, extra, images)
    f1 = obj.features(params, new_extra, images)
    assert f0.shape == (3, 16) and float(jnp.abs(f0 - f1).max()) > 1e-6
    for kw, match in ((dict(grad_accum_steps=2), "grad_accum_steps=2 with a BatchNorm"),
                      (dict(lock="image"), "lock='image' with a BatchNorm image tower")):
        c = _clip_config(tower)
        if "lock" in kw:
            c.objective.lock = kw["lock"]
        else:
            c.grad_accum_steps = kw["grad_accum_steps"]
        with pytest.raises(ConfigError, match=match) as e:
            make_objective(c).check(c)
        assert "\n" not in str(e.value)


def test_tower_errors_are_one_line():
    from fmjax.objectives.base import make_objective
    unet = dict(name="unet", channels=16, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_groups=8, sample_size=16)
    cases = [
        (dict(image=unet), r"CLIP's image tower needs a model with \['pooled'\].*"
                           r"config.model.image.name='unet' has \['denoiser'\]; models that fit: \['convnext', 'resnet', 'swin', 'tinyvit', 'vit'\]"),
        (dict(image=dict(VIT_TOWER, widht=3)), r"config.model.image: model 'vit' has no field\(s\) \['widht'\]"),
        (dict(image=dict(VIT_TOWER, dtype="bfloat16")), r"sets \['dtype'\]: the towers take config.dtype"),
        (dict(image=VIT_TOWER, width=32), r"drop the flat image keys \['width'\]"),
        (dict(image=VIT_TOWER, stem="conv"), r"drop the flat image keys \['stem'\]"),
        (dict(image=VIT_TOWER, text=dict(widht=3)), r"config.model.text takes TextTransformer fields.*\['widht'\]"),
        (dict(image=VIT_TOWER, text=dict(embed_dim=8)), r"config.model.text.embed_dim=8 differs"),
    ]
    for kw, match in cases:
        image = kw.pop("image")
        with pytest.raises(ValueError, match=match) as e:
            make_objective(_clip_config(image, **kw))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"needs the image tower's \['width', 'depth'"):
        CLIP(**TEXT).init(jax.random.PRNGKey(0), *_inputs())
    unet_err = pytest.raises(ValueError, match="CLIP's image tower needs a model with")
    with unet_err:
        CLIP(**TEXT, image=unet).init(jax.random.PRNGKey(0), *_inputs())


def test_export_refuses_sub_configs():
    from fmjax.errors import ConfigError
    from fmjax.interop.export_hf import check_clip
    with pytest.raises(ConfigError, match=r"tower sub-configs \(model.image\)"):
        check_clip(CLIP(**TEXT, image=VIT_TOWER))
    check_clip(CLIP(**FLAT_IMAGE, **TEXT))


# -- LiT: configs/clip.py:lit from a supervised workdir --------------------------------------

def test_lit_preset_matches_the_supervised_vit():
    from fmjax.testing import load_config
    lit, sup = load_config("clip", "lit"), load_config("supervised")
    assert dict(lit.model.image) == dict(sup.model, num_classes=0)
    assert lit.objective["lock"] == "image" and dict(lit.model_init.mapping) == {"params": "image"}
    assert not lit.model_init.dont_load and not lit.model_init.workdir
    assert "normalize('imagenet')" in lit.data.pp_train and "normalize('imagenet')" in lit.data.pp_eval
    assert lit.evals.to_dict() == load_config("clip").evals.to_dict()


@pytest.mark.slow   # two tiny trainings (supervised source, LiT) + an eval: 40-50 s on 2 busy cores
def test_lit_loads_and_locks_a_supervised_tower(tiny_config, shapes_data_dir, tmp_path, capsys):
    from fmjax.testing import load_config
    from fmjax.train import loop, restore
    from fmjax.train import model_init as mi_lib

    def params(workdir, step=None):
        _, _, _, _, state, _ = restore.load_checkpoint(workdir, step=step)
        return mi_lib.flatten(jax.tree.map(np.asarray, state.params))

    sup = tiny_config("supervised", total_steps=2, checkpoint_every=2)
    sup_dir = str(tmp_path / "sup")
    loop.train_and_evaluate(sup, sup_dir)
    source = params(sup_dir)

    c = load_config("clip", "lit")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every, c.keep_checkpoints = 2, 16, 1, 5
    c.log_every, c.eval_every, c.eval_at_start = 1, 2, False
    c.optimizer.warmup_steps = 1
    c.model.update(dict(text_width=32, text_depth=1, text_heads=2, text_mlp_dim=64, embed_dim=16))
    c.model.image.update({k: sup.model[k] for k in ("width", "depth", "num_heads", "mlp_dim")})
    c.evals = dict(zero_shot=dict(type="zero_shot", split="validation", examples=32,
                                  templates=["a photo of a {}."]))
    c.model_init.workdir = sup_dir
    lit_dir = str(tmp_path / "lit")
    capsys.readouterr()
    final = loop.train_and_evaluate(c, lit_dir)
    out = capsys.readouterr()
    assert 0.0 <= final["eval/zero_shot_top1"] <= 1.0

    # The load table: the whole tower loaded, the supervised head/{kernel,bias} unused.
    head = [k for k in source if k.startswith("head/")]
    assert sorted(head) == ["head/bias", "head/kernel"]
    n_tower = len(source) - len(head)
    assert (f"{n_tower} loaded (0 pos-embed resized), 0 re-initialised (dont_load), "
            f"{len(params(lit_dir)) - n_tower} missing (fresh init), 2 checkpoint arrays unused") in out.out
    assert "objective.lock='image' with no config.model_init" not in out.err

    # The locked tower ends bit-identical to the supervised run; the text tower trained.
    first, last = params(lit_dir, 1), params(lit_dir)
    tower = [k for k in last if k.startswith("image/")]
    assert len(tower) == n_tower
    for k in tower:
        np.testing.assert_array_equal(last[k], source[k[len("image/"):]], err_msg=k)
    np.testing.assert_array_equal(first["image_proj/kernel"], last["image_proj/kernel"])
    text = [k for k in last if k.startswith("text/")]
    assert max(float(np.abs(first[k] - last[k]).max()) for k in text) > 0
