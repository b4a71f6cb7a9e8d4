"""Swin through the trainer: the supervised objective trains it (configs/supervised.py:swin,
shortened) with LoRA on its attention through the dense hook, DINO and a CLIP image tower accept
it, its params carry logical axes that shard on an 8-device mesh, and remat changes nothing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import testing
from fmjax.models.registry import build_model
from fmjax.objectives.base import make_objective
from fmjax.train import loop

SMALL = dict(name="swin", embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2)


@pytest.mark.slow
def test_supervised_swin_trains_with_lora_on_its_attention(default_config, tmp_path):
    c = default_config("supervised", "swin")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 3
    c.eval_at_start = False
    c.batch_size = 16
    c.adapter.update(dict(name="lora", rank=2, targets=r"attn/(query|value)$", train=("head/.*",)))
    out = loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    assert out["step"] == 3 and np.isfinite(out["train/loss"])
    obj = make_objective(c)
    params, _ = obj.init(jax.random.PRNGKey(0), {"image": np.zeros((2, 32, 32, 3), np.float32),
                                                 "label": np.zeros((2,), np.int32)})
    attn = params["stage_2_block_1"]["attn"]
    assert "lora_a" in attn["query"] and "lora_a" in attn["value"] and "lora_a" not in attn["key"]
    assert np.shape(nn.unbox(attn["relative_position_bias_table"])) == (49, 8)


def test_dino_accepts_a_swin_backbone(tiny_config):
    c = tiny_config("dino")
    c.model = dict(SMALL)
    obj = make_objective(c)
    batch = {"global_crops": np.zeros((2, 2, 32, 32, 3), np.float32),
             "local_crops": np.zeros((2, c.objective.num_local_crops, 16, 16, 3), np.float32)}
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    loss, _ = obj.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
    assert np.isfinite(float(loss))


def test_clip_takes_a_swin_image_tower():
    model = build_model(dict(name="clip", embed_dim=32, vocab_size=64, context_length=8, image=dict(SMALL),
                             text=dict(width=32, depth=1, num_heads=2, mlp_dim=64)))
    tokens = np.ones((2, 8), np.int32)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), tokens)
    assert "relative_position_bias_table" in v["params"]["image"]["stage_0_block_1"]["attn"]
    out = model.apply(v, jnp.ones((2, 32, 32, 3)), tokens)
    emb = out["image_embeds"]
    assert emb.shape[0] == 2 and bool(jnp.isfinite(emb).all())


def test_logical_axes_shard_on_a_mesh_and_remat_is_the_same_function():
    from jax.sharding import PartitionSpec
    model = build_model(dict(SMALL, num_classes=3))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x)["params"])
    plain = model.apply({"params": params}, x)["logits"]
    remat = build_model(dict(SMALL, num_classes=3, remat=True)).apply({"params": params}, x)["logits"]
    np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6)
    variables, out = testing.init_and_apply_on_mesh(model.init, model.apply, x)
    p = variables["params"]
    assert p["stage_0_block_0"]["attn"]["query"]["kernel"].value.sharding.spec == PartitionSpec(None, "model", None)
    assert p["stage_1_block_0"]["attn"]["relative_position_bias_table"].value.sharding.spec == PartitionSpec(None, "model")
    assert p["stage_0_merge"]["reduction"]["kernel"].value.sharding.spec == PartitionSpec("model", None)
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(plain), atol=1e-5)


def test_simmim_on_swin_masks_after_the_patch_norm_and_decodes_by_the_encoder_stride(tiny_config):
    """SimMIM's SwinTransformerForSimMIM: the mask token (stage-0 width) replaces the masked
    patch embeddings after patch_norm; the decoder maps each final token to stride^2 * 3 pixels."""
    c = tiny_config("simmim")
    c.model = dict(SMALL, patch_size=4)          # 32 px: 8x8 -> 4x4 grids, encoder stride 8
    c.optimizer.wd_groups = "swin"
    obj = make_objective(c)
    assert obj.mask_input and obj.stride == 8 and obj.patch_size == 4
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    mask = (jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8)) < 0.6).astype(jnp.int32)
    params, extra = obj.init(jax.random.PRNGKey(2), {"image": images, "mask": mask})
    params = nn.unbox(params)
    assert params["mask_token"].shape == (1, 1, 16)
    assert params["decoder"]["kernel"].shape == (32, 8 * 8 * 3)
    recon, pred = obj.reconstruct(params, images, mask)
    assert recon.shape == images.shape and pred.shape == (2, 16, 192)
    loss, _ = obj.loss(params, extra, {"image": images, "mask": mask}, jax.random.PRNGKey(3), 0)
    assert np.isfinite(float(loss))
    # the backbone with an all-zero mask is the plain backbone; a mask changes the output
    plain = obj.backbone.apply({"params": params["backbone"]}, images)["patch_tokens"]
    zero = obj.backbone.apply({"params": params["backbone"]}, images, mask=jnp.zeros_like(mask),
                              mask_token=params["mask_token"])["patch_tokens"]
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
    masked = obj.backbone.apply({"params": params["backbone"]}, images, mask=mask,
                                mask_token=params["mask_token"])["patch_tokens"]
    assert float(jnp.abs(masked - plain).max()) > 1e-3
    with pytest.raises(ValueError, match="needs a mask_token and the patch grid"):
        obj.backbone.apply({"params": params["backbone"]}, images, mask=mask[:, :4])
    pics = obj.visualize(params, extra, {"image": images, "mask": mask}, jax.random.PRNGKey(4))
    assert pics["reconstruction"].ndim == 3
