"""Optimizer factory: schedule shape, lr scaling, weight-decay mask, clipping."""
import jax
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
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
        opt_lib.make_optimizer(dict(name="lion", lr=1.0), 10, 8)
    with pytest.raises(ValueError, match="lr_scaling"):
        opt_lib.make_schedule(dict(lr_scaling="cuberoot", lr=1.0), 10, 8)


# -- Reference options (issue 12): decay groups, DINO's warm-up, fused-qkv clipping, per-param Adam count.

def test_no_decay_patterns_per_method():
    """MAE's and DINO's references decay cls/mask tokens and pos_embed (only <2-D params and
    biases are skipped); DeiT (timm 0.3.2) skips pos_embed / cls_token by name."""
    params = {"cls_token": jnp.ones((1, 1, 8)), "mask_token": jnp.ones((1, 1, 8)),
              "pos_embed": jnp.ones((1, 5, 8)), "w": jnp.ones((8, 8)), "b": jnp.ones(8),
              "attn": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))}}}
    mae = opt_lib.decay_mask(params, patterns=())
    assert mae["cls_token"] and mae["mask_token"] and mae["pos_embed"] and mae["w"]
    assert not mae["b"] and not mae["attn"]["query"]["bias"] and mae["attn"]["query"]["kernel"]
    deit = opt_lib.decay_mask(params, patterns=(r"pos_embed$", r"cls_token$"))
    assert not deit["cls_token"] and not deit["pos_embed"] and deit["mask_token"]


def test_linspace_warmup_is_dinos():
    """DINO's cosine_scheduler warms up with np.linspace(0, peak, W): peak * s / (W - 1)."""
    opt = dict(lr=1.0, warmup_steps=5, warmup_mode="linspace", decay="cosine", min_lr=0.0)
    sched = opt_lib.make_schedule(opt, total_steps=15, global_batch=8)
    want = np.concatenate([np.linspace(0, 1.0, 5),
                           0.5 * (1 + np.cos(np.pi * np.arange(10) / 10))])
    np.testing.assert_allclose([float(sched(s)) for s in range(15)], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_mode"):
        opt_lib.make_schedule(dict(opt, warmup_mode="exp"), 15, 8)


def test_nanogpt_warmup_and_cosine_are_get_lrs():
    """nanoGPT's get_lr: peak * (s + 1) / (W + 1) while s < W, then the cosine to min_lr."""
    opt = dict(lr=6e-4, warmup_steps=4, warmup_mode="nanogpt", decay="cosine", min_lr=6e-5)
    sched = opt_lib.make_schedule(opt, total_steps=12, global_batch=8)

    def get_lr(it, lr=6e-4, w=4, decay_iters=12, min_lr=6e-5):
        if it < w:
            return lr * (it + 1) / (w + 1)
        return min_lr + 0.5 * (1.0 + np.cos(np.pi * (it - w) / (decay_iters - w))) * (lr - min_lr)
    np.testing.assert_allclose([float(sched(s)) for s in range(13)], [get_lr(s) for s in range(13)], rtol=1e-6)


def test_per_param_clip_can_fuse_qkv():
    g = {"attn": {"query": {"kernel": jnp.full((2, 2), 3.0)}, "key": {"kernel": jnp.full((2, 2), 4.0)},
                  "value": {"kernel": jnp.zeros((2, 2))}}, "w": jnp.full((2,), 0.1)}
    sep, _ = opt_lib.clip_by_param_norm(1.0).update(g, None)
    fused, _ = opt_lib.clip_by_param_norm(1.0, fuse_qkv=True).update(g, None)
    np.testing.assert_allclose(np.linalg.norm(sep["attn"]["query"]["kernel"]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(sep["attn"]["key"]["kernel"]), 1.0, rtol=1e-5)
    # Fused: one norm sqrt(4*9 + 4*16) = 10 for q, k, v together.
    np.testing.assert_allclose(np.asarray(fused["attn"]["query"]["kernel"]), 0.3, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fused["attn"]["key"]["kernel"]), 0.4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fused["w"]), 0.1, rtol=1e-6)


def test_per_param_adam_count_after_a_freeze_matches_torch():
    """A param frozen for 3 steps then trained: its first update equals torch AdamW's (its
    own count is 1); optax's shared count (4) gives a different first update."""
    import optax
    import torch
    from fmjax.train.step import mask_update

    opt = dict(name="adamw", lr=0.1, weight_decay=0.0, warmup_steps=0, decay="constant")
    grads = [np.array([0.3, -0.2], np.float32), np.array([0.1, 0.5], np.float32)]
    results = {}
    for count in ("global", "per_param"):
        tx, _ = opt_lib.make_optimizer(dict(opt, adam_count=count), 10, 8)
        params = {"a": jnp.ones((2, 2)), "last": jnp.zeros(2)}
        state = tx.init(params)
        for step in range(5):
            g = {"a": jnp.full((2, 2), 0.1 * (step + 1)), "last": jnp.asarray(grads[step % 2])}
            upd, new = tx.update(g, state, params)
            mask = {"a": jnp.asarray(True), "last": jnp.asarray(step >= 3)}
            mask = {"a": jnp.ones((2, 2), bool), "last": jnp.full(2, step >= 3)}
            upd, state = mask_update(tx, mask, upd, new, state)
            params = optax.apply_updates(params, upd)
        results[count] = np.asarray(params["last"])

    p = torch.zeros(2, requires_grad=True)
    topt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    for step in (3, 4):
        p.grad = torch.tensor(grads[step % 2])
        topt.step()
    np.testing.assert_allclose(results["per_param"], p.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(results["global"], p.detach().numpy(), rtol=1e-3)


def test_adamw_matches_torch_over_30_steps():
    """Bias corrections to float32 rounding (torch computes them in float64)."""
    import optax
    import torch
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = rng.standard_normal((30, 4, 3)).astype(np.float32)
    opt = dict(name="adamw", lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, warmup_steps=0,
               decay="constant")
    tx, _ = opt_lib.make_optimizer(opt, 30, 8)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    p = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    for g in grads:
        upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, upd)
        p.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=2e-6, atol=1e-7)


def test_decay_all_decays_biases_and_norms_too():
    """decay_all=True: one torch param group (diffusers' train_unconditional.py), every param
    decays, 1-D biases and norm scales included; it contradicts a non-empty no_decay."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "norm": {"scale": jnp.ones(3)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for decay_all, want_b in ((False, 0.0), (True, -0.05)):
        opt = dict(name="adamw", lr=0.1, weight_decay=0.5, warmup_steps=0, decay="constant", decay_all=decay_all)
        tx, _ = opt_lib.make_optimizer(opt, total_steps=10, global_batch=8)
        updates, _ = tx.update(zero, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-6)
        np.testing.assert_allclose(updates["b"], want_b, rtol=1e-6)
        np.testing.assert_allclose(updates["norm"]["scale"], want_b, rtol=1e-6)
    opt_lib.make_optimizer(dict(lr=0.1, decay_all=True, no_decay=()), 10, 8)
    with pytest.raises(ValueError, match="decay_all"):
        opt_lib.make_optimizer(dict(lr=0.1, decay_all=True, no_decay=("bias",)), 10, 8)


def test_clip_eps_is_torchs_clip_grad_norm():
    """clip_eps > 0 (global mode): g * min(1, max_norm / (norm + eps)), torch's clip_grad_norm_
    with eps 1e-6; 0 (default) keeps optax's clip_by_global_norm; per_param mode refuses it."""
    g = {"a": jnp.full((4,), 1.5), "b": jnp.full((5,), 0.0)}
    params = jax.tree.map(jnp.zeros_like, g)
    for eps in (0.0, 1e-6, 0.5):
        clip = (opt_lib.clip_by_global_norm_eps(1.0, eps) if eps else opt_lib.optax.clip_by_global_norm(1.0))
        out, _ = clip.update(g, clip.init(params), params)
        np.testing.assert_allclose(out["a"], 1.5 / (3.0 + eps), rtol=1e-6)
    small = jax.tree.map(lambda x: x / 10, g)  # norm 0.3 < 1: unchanged
    out, _ = opt_lib.clip_by_global_norm_eps(1.0, 1e-6).update(small, None)
    np.testing.assert_array_equal(out["a"], small["a"])
    tx, _ = opt_lib.make_optimizer(dict(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0,
                                        decay="constant", clip_norm=1.0, clip_eps=0.5), 10, 8)
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -1.5 / 3.5, rtol=1e-6)
    for bad in (dict(clip_mode="per_param", clip_eps=1e-6), dict(clip_eps=-1.0)):
        with pytest.raises(ValueError, match="clip_eps"):
            opt_lib.make_optimizer(dict(lr=0.1, clip_norm=1.0, **bad), 10, 8)


def test_named_wd_groups():
    """optimizer.wd_groups names a reference's exclusion list (the trajectory tests in
    tests/reference/ check the presets that use them step by step)."""
    params = {"cls_token": jnp.ones((1, 1, 8)), "pos_embed": jnp.ones((1, 5, 8)), "dist_token": jnp.ones((1, 1, 8)),
              "mask_token": jnp.ones((1, 1, 8)), "w": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)},
              "ln": {"scale": jnp.ones(8)}, "logit_scale": jnp.ones(()),
              "attn": {"relative_position_bias_table": jnp.ones((49, 2))}}
    mask = lambda name: opt_lib.decay_mask(params, patterns=opt_lib.no_decay_patterns(None, name))
    decayed = lambda m: sorted(k for k, v in m.items() if any(jax.tree_util.tree_leaves(v)))
    assert decayed(mask("mae")) == decayed(mask("dino")) == ["attn", "cls_token", "dist_token", "mask_token",
                                                             "pos_embed", "w"]
    assert decayed(mask("mae_finetune")) == ["attn", "mask_token", "w"]
    assert decayed(mask("deit")) == ["attn", "dist_token", "mask_token", "w"]  # timm 0.3.2's list
    assert decayed(mask("open_clip")) == ["attn", "dist_token", "mask_token", "pos_embed", "w"]
    assert decayed(mask("swin")) == ["cls_token", "dist_token", "mask_token", "w"]
    assert decayed(mask("big_vision")) == ["w"]
    assert decayed(mask("fmjax")) == ["w"]
    assert opt_lib.no_decay_patterns(None, "") == opt_lib.NO_DECAY_PATTERNS
    assert opt_lib.no_decay_patterns(("x",), "") == ("x",)
    with pytest.raises(ValueError, match=r"wd_groups='timm'; valid: \[.*'big_vision', 'deit', 'dino'.*'simmim_vit', 'swin', 'tinyvit'\]"):
        opt_lib.no_decay_patterns(None, "timm")
    with pytest.raises(ValueError, match="both set; use one"):
        opt_lib.no_decay_patterns((), "mae")
    with pytest.raises(ValueError, match="decay_all=True decays every param; wd_groups='mae'"):
        opt_lib.make_optimizer(dict(lr=0.1, decay_all=True, wd_groups="mae"), 10, 8)


@pytest.mark.parametrize("config,preset,want", [("mae", "default", "mae"), ("dino", "default", "dino"),
                                                ("supervised", "vit_b16_imagenet", "deit"),
                                                ("supervised", "swin_t_imagenet", "swin"),
                                                ("supervised", "tinyvit_21m_imagenet", "tinyvit")])
def test_paper_presets_name_their_wd_groups(config, preset, want):
    from fmjax.testing import load_config
    c = load_config(config, preset)
    assert c.optimizer.wd_groups == want and c.optimizer.no_decay is None
