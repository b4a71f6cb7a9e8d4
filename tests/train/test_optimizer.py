"""Optimizer factory: schedule shape, lr scaling, weight-decay mask, clipping."""
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.train import optimizer as opt_lib


def test_warmup_then_cosine_to_min_lr_with_linear_scaling():
    opt = dict(name="adamw", lr_scaling="linear", blr=1.5e-4, warmup_steps=10, min_lr=1e-6)
    sched = opt_lib.make_schedule(opt, total_steps=110, global_batch=4096)
    peak = 1.5e-4 * 4096 / 256
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), (peak + 1e-6) / 2, rtol=1e-4)
    np.testing.assert_allclose(float(sched(110)), 1e-6, rtol=1e-4)


def test_weight_decay_mask_skips_biases_norms_and_embeddings():
    params = {"patch_embed": {"proj": {"kernel": jnp.ones((48, 8)), "bias": jnp.ones(8)}},
              "cls_token": jnp.ones((1, 1, 8)), "mask_token": jnp.ones((1, 1, 8)),
              "pos_embed": jnp.ones((1, 5, 8)),
              "encoder": {"block_0": {"norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                                      "attn": {"query": {"kernel": jnp.ones((8, 2, 4)),
                                                         "bias": jnp.ones((2, 4))}}}}}
    mask = opt_lib.decay_mask(params)
    assert mask["patch_embed"]["proj"]["kernel"] and mask["encoder"]["block_0"]["attn"]["query"]["kernel"]
    assert not mask["patch_embed"]["proj"]["bias"]
    assert not mask["cls_token"] and not mask["mask_token"] and not mask["pos_embed"]
    assert not mask["encoder"]["block_0"]["norm1"]["scale"]
    assert not mask["encoder"]["block_0"]["attn"]["query"]["bias"]


def test_adamw_decays_only_masked_params_and_clips():
    opt = dict(name="adamw", lr=0.1, weight_decay=0.5, warmup_steps=0, decay="constant", clip_norm=1.0)
    tx, _ = opt_lib.make_optimizer(opt, total_steps=10, global_batch=8)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5, rtol=1e-6)  # decay only
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0)


def test_unknown_optimizer_and_scaling():
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        opt_lib.make_optimizer(dict(name="lamb", lr=1.0), 10, 8)
    with pytest.raises(ValueError, match="lr_scaling"):
        opt_lib.make_schedule(dict(lr_scaling="sqrt", lr=1.0), 10, 8)
