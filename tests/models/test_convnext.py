"""ConvNeXt through the trainer: the supervised objective trains it (configs/supervised.py:convnext,
shortened), LoRA reaches its pointwise layers through the dense hook, and a DINO backbone
accepts it (pooled features at any resolution)."""
import flax.linen as nn
import jax
import pytest
import numpy as np

from fmjax.objectives.base import make_objective
from fmjax.train import loop


@pytest.mark.slow
def test_supervised_convnext_trains_with_lora_on_its_mlps(default_config, tmp_path):
    c = default_config("supervised", "convnext")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 3
    c.eval_at_start = False
    c.batch_size = 16
    c.adapter.update(dict(name="lora", rank=2, targets=r"fc[12]$", train=("head/.*",)))
    out = loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    assert out["step"] == 3 and np.isfinite(out["train/loss"])
    obj = make_objective(c)
    rng = jax.random.PRNGKey(0)
    params, _ = obj.init(rng, {"image": np.zeros((2, 32, 32, 3), np.float32),
                               "label": np.zeros((2,), np.int32)})
    assert "lora_a" in params["stage_0_block_0"]["fc1"] and "lora_a" in params["stage_2_block_1"]["fc2"]


def test_dino_accepts_a_convnext_backbone(tiny_config):
    c = tiny_config("dino")
    c.model = dict(name="convnext", depths=(1, 1), dims=(16, 32))
    obj = make_objective(c)
    batch = {"global_crops": np.zeros((2, 2, 32, 32, 3), np.float32),
             "local_crops": np.zeros((2, c.objective.num_local_crops, 16, 16, 3), np.float32)}
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    loss, _ = obj.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
    assert np.isfinite(float(loss))


def test_conv_stem_sees_overlapping_windows():
    """stem='conv': the same grid and outputs as the patchify stem, from overlapping 3x3 convs
    (a pixel of one 4x4 patch changes the next patch's stem output too); a bad name is one line."""
    from fmjax.models.convnext import ConvNeXt
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))
    for stem in ("patch", "conv"):
        m = ConvNeXt(depths=(1, 1), dims=(16, 32), num_classes=3, stem=stem)
        v = m.init(jax.random.PRNGKey(1), x)
        out = m.apply(v, x)
        assert out["feature_maps"][0].shape == (1, 8, 8, 16) and out["logits"].shape == (1, 3)
        moved = m.apply(v, x.at[0, 3, 3].add(5.0), capture_intermediates=lambda mdl, _: mdl.name == "stem_norm")
        stem_out = moved[1]["intermediates"]["stem_norm"]["__call__"][0]
        ref = m.apply(v, x, capture_intermediates=lambda mdl, _: mdl.name == "stem_norm")[1][
            "intermediates"]["stem_norm"]["__call__"][0]
        changed = np.abs(np.asarray(stem_out - ref)).max(-1)[0] > 1e-6
        # patch (0, 0) holds pixel (3, 3); patch (1, 1) only sees it through overlapping convs
        assert changed[0, 0] and changed[1, 1] == (stem == "conv"), (stem, changed[:3, :3])
        assert changed.sum() == (4 if stem == "conv" else 1)  # patches (0..1, 0..1) vs (0, 0)
    with pytest.raises(ValueError, match="stem='nope'; valid"):
        ConvNeXt(depths=(1,), dims=(8,), stem="nope").init(jax.random.PRNGKey(0), x)


def test_kernel_size_sets_the_depthwise_receptive_field():
    """kernel_size=3: a (3, 3, 1, C) depthwise kernel, and a pixel moved in the first block's
    input changes its output only within one cell of it (7: within three); even is one line."""
    from fmjax.models.convnext import ConvNeXt
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))
    for k in (3, 7):
        m = ConvNeXt(depths=(1,), dims=(8,), kernel_size=k, layer_scale_init=1.0)
        v = nn.meta.unbox(m.init(jax.random.PRNGKey(1), x))
        assert v["params"]["stage_0_block_0"]["dwconv"]["kernel"].shape == (k, k, 1, 8)
        ref = m.apply(v, x)["feature_maps"][0]
        moved = m.apply(v, x.at[0, 16, 16].add(5.0))["feature_maps"][0]   # stem patch (4, 4)
        changed = np.argwhere(np.abs(np.asarray(moved - ref)).max(-1)[0] > 1e-6)
        assert np.abs(changed - 4).max() == k // 2, (k, changed)
    with pytest.raises(ValueError, match="kernel_size=4; must be odd"):
        ConvNeXt(depths=(1,), dims=(8,), kernel_size=4).init(jax.random.PRNGKey(0), x)


def test_weight_init_reference_or_lecun():
    """'reference': every conv / linear weight ~ trunc_normal(0.02) (timm's ConvNeXt); 'lecun':
    fan-in scaled (fc1's std 1/sqrt(C)); an unknown name is one line."""
    from fmjax.models.convnext import ConvNeXt
    x = np.zeros((1, 32, 32, 3), np.float32)
    for kind, want in (("reference", 0.02 * 0.88), ("lecun", 1 / np.sqrt(64))):   # 0.88: the truncation
        m = ConvNeXt(depths=(1,), dims=(64,), weight_init=kind)
        p = nn.meta.unbox(m.init(jax.random.PRNGKey(0), x))["params"]
        std = float(np.std(p["stage_0_block_0"]["fc1"]["kernel"]))
        assert abs(std - want) < 0.1 * want, (kind, std, want)
    with pytest.raises(ValueError, match="weight_init='xavier'; valid"):
        ConvNeXt(depths=(1,), dims=(8,), weight_init="xavier").init(jax.random.PRNGKey(0), x)
