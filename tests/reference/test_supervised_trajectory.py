"""Training-trajectory parity of fmjax's supervised ViT step with DeiT (issue 12, section 1).

The reference is a minimal PyTorch transcription of facebookresearch/deit at commit
7e160fe43f0252d17191b71cbb5826254114ea5b (the repository's HEAD, 2024-03-15), on timm 0.3.2
(the version its requirements.txt and README pin; huggingface/pytorch-image-models commit
6504a42832cb6687e3f595c37e003ea920268365, "Version 0.3.2"):
- ``main.py``: ``args.lr = args.lr * args.batch_size * world_size / 512``;
  ``optimizer = create_optimizer(args, model_without_ddp)``; ``lr_scheduler, _ =
  create_scheduler(args, optimizer)``; criterion ``LabelSmoothingCrossEntropy(smoothing=0.1)``
  (``losses.py``; the branch taken with ``--mixup 0 --cutmix 0``, smoothing 0.1 the default),
  wrapped in ``DistillationLoss(..., 'none', ...)``, which returns the base loss; the epoch loop
  ``train_one_epoch(...)`` then ``lr_scheduler.step(epoch)`` -- at the END of epoch e, so
  epoch e + 1 trains with the scheduler's value for e (epochs 0 and 1 both at warmup_lr).
- ``engine.py`` ``train_one_epoch``: ``loss = criterion(samples, model(samples), targets)``,
  ``optimizer.zero_grad()``, ``loss_scaler(loss, optimizer, clip_grad=max_norm, ...)``
  (timm ``utils/cuda.py`` ``NativeScaler``: backward, clip only when ``clip_grad`` is not None
  -- DeiT's ``--clip-grad`` default is None --, step), then ``model_ema.update(model)``.
- timm 0.3.2 ``optim/optim_factory.py`` ``create_optimizer`` / ``add_weight_decay`` (no decay
  for ``len(shape) == 1``, ``.bias`` and ``model.no_weight_decay()`` = {'pos_embed',
  'cls_token'}, which DeiT's distilled model inherits), ``torch.optim.AdamW`` (betas
  (0.9, 0.999), eps 1e-8); ``scheduler/scheduler_factory.py`` ``create_scheduler`` and
  ``scheduler/cosine_lr.py`` / ``scheduler/scheduler.py`` ``CosineLRScheduler`` (t_initial =
  epochs, warmup_t, warmup_lr_init, lr_min, ``warmup_prefix=False``: the cosine's clock
  starts at epoch 0, so the peak lr is never reached); ``models/vision_transformer.py``
  ``VisionTransformer`` / ``Block`` / ``Attention`` (one fused ``qkv``) / ``Mlp`` /
  ``PatchEmbed`` as DeiT's ``models.py`` builds them (qkv_bias, LayerNorm eps 1e-6); the blocks
  are in timm032_blocks.py, shared with the MAE test. The transcription is in
  deit_reference.py, shared with test_distill_trajectory.py.

The only changes to the reference: float32 (DeiT trains under ``torch.cuda.amp.autocast()``;
the GradScaler only rescales); dropout / drop-path 0; no mixup / cutmix / augmentation (the
same pre-made batches feed both sides); the model EMA is left out (it is only evaluated and
saved, never fed back into training; fmjax's supervised objective keeps none).

fmjax runs its real jitted step: ``make_objective`` on ``configs/supervised.py``'s paper preset
``vit_b16_imagenet`` (model shrunk to width 64 / depth 2 / patch 8 on 32x32, the linear patch
stem, float32, drop_path 0; schedule compressed to 10 "epochs" of 3 steps with 2 warm-up
epochs, blr chosen for a peak lr of 1e-3), every other optimizer setting the preset's
(no_decay, warmup_init 1e-6, decay_from='start', schedule_epoch_lag 1, min_lr 1e-5, weight
decay 0.05, no clipping), ``make_optimizer``, ``create_state`` and ``make_train_step`` as
``loop.py`` builds them, on a 1-device mesh. Both start from the same weights (the
reference's, biases / LayerNorms / tokens / pos_embed perturbed so they matter), converted by
``fmjax.interop.hf_vit.convert_hf_vit`` after a rename of timm's keys to the transformers
layout. The per-epoch lr (timm's ``_get_lr(max(e - 1, 0))``):
1e-6, 1e-6, 5.005e-4, 9.055e-4, 7.960e-4, 6.580e-4, 5.050e-4, 3.520e-4, 2.140e-4, 1.045e-4.

Tolerance: the loss at every step and the final params within rtol 1e-5, atol 1e-6 (measured:
max |diff| / (0.1 + |ref|) 1.1e-7 for the loss, 7.2e-7 for the params, which moved by up to
8.9e-3); the lr at every step within 2e-6 relative (measured 8.5e-7: fmjax's schedule is
float32). Excepted from the param comparison, as in test_mae_trajectory.py: the attention KEY
biases, whose true gradient is exactly zero (softmax ignores the ``q . b_k`` they add to a
row), so both sides move them by Adam-amplified round-off; the test checks instead that the
reference's values, or those plus N(0, 0.1^2), put into fmjax's final params change neither
its logits nor its loss.

With fmjax's old defaults (per-step schedule: linear warm-up from 0, cosine after the warm-up;
``NO_DECAY_PATTERNS``) the trajectory does not match (measured: loss 3.4e-2, params 1.1e-1
relative); with only ``schedule_epoch_lag=0`` (timm train.py's ``step(epoch + 1)``) neither
(loss 2.2e-2). The decay groups of this ViT are the same under ``NO_DECAY_PATTERNS`` and
DeiT's list (both skip pos_embed, cls_token, biases and LayerNorms), which
``test_decay_groups_are_the_references`` checks for both.
"""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared reference
from deit_reference import (CosineLRScheduler, VisionTransformer, create_optimizer,  # noqa: E402
                            create_scheduler, reference_train)
from fmjax_step import flat, random_batches, rel_err, run_steps  # noqa: E402

from fmjax.interop import hf_vit  # noqa: E402
from fmjax.train import optimizer as opt_lib  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
IMG, PATCH, BATCH, CLASSES = 32, 8, 8, 8
WIDTH, DEPTH, HEADS = 64, 2, 4
MLP_RATIO = 4.0
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 3, 10, 2   # 30 optimizer steps, 6 of warm-up
PEAK_LR, WARMUP_LR, MIN_LR, WD, SMOOTHING = 1e-3, 1e-6, 1e-5, 0.05, 0.1


def deit_args(**overrides):
    """main.py's argparse defaults that matter here, with the compressed schedule."""
    args = dict(batch_size=BATCH, epochs=EPOCHS, lr=PEAK_LR * 512 / BATCH, unscale_lr=False,
                opt='adamw', opt_eps=1e-8, opt_betas=None, clip_grad=None, weight_decay=WD,
                sched='cosine', warmup_lr=WARMUP_LR, min_lr=MIN_LR, decay_rate=0.1,
                warmup_epochs=WARMUP_EPOCHS, cooldown_epochs=10, smoothing=SMOOTHING,
                mixup=0.0, cutmix=0.0, distillation_type='none', distillation_alpha=0.5,
                distillation_tau=1.0)
    args.update(overrides)
    return types.SimpleNamespace(**args)


def reference_lrs(args, steps_per_epoch):
    """The lr of every optimizer step of DeiT's loop (no training)."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    lrs = []
    for epoch in range(args.epochs):
        lrs += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        lr_scheduler.step(epoch)
    return np.array(lrs)


# ----------------------------------------------------------------------------------------------
# Weights: timm's state dict -> transformers' ViT key layout -> fmjax's converter.
# ----------------------------------------------------------------------------------------------

def hf_config():
    return dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                intermediate_size=int(WIDTH * MLP_RATIO), image_size=IMG, patch_size=PATCH,
                num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", num_labels=CLASSES,
                architectures=["ViTForImageClassification"])


_TOP = {"patch_embed.proj": "embeddings.patch_embeddings.projection",
        "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "norm": "layernorm", "head": "classifier"}
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def to_fmjax(state_dict):
    """timm names -> transformers ViTForImageClassification names (fused qkv split in three)
    -> ``convert_hf_vit``."""
    out = {}
    for name, value in state_dict.items():
        value = value.detach().cpu()
        parts = name.split(".")
        if parts[0] == "blocks":
            prefix = "layers." + parts[1]
            sub, leaf = ".".join(parts[2:-1]), parts[-1]
            if sub == "attn.qkv":
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.attention.{proj}.{leaf}"] = chunk
            else:
                out[f"{prefix}.{_BLOCK[sub]}.{leaf}"] = value
        else:
            stem, leaf = (name, None) if name in _TOP else tuple(name.rsplit(".", 1))
            out[_TOP[stem] + ("" if leaf is None else "." + leaf)] = value
    return hf_vit.convert_hf_vit(out, hf_config())


def reference_model(seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=CLASSES,
                              embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP_RATIO,
                              qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    with torch.no_grad():  # biases, LayerNorms, tokens and pos_embed away from their init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name or "pos_embed" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------------
# fmjax: the paper preset's objective and optimizer, the trainer's jitted step.
# ----------------------------------------------------------------------------------------------

def supervised_config(default_config):
    c = default_config("supervised", "vit_b16_imagenet")
    c.model = dict(name="vit", variant=f"Ti/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                   mlp_dim=int(WIDTH * MLP_RATIO), num_classes=CLASSES, pool="cls", drop_path=0.0,
                   stem="patch", attention_impl="xla", remat=False)
    c.dtype = "float32"
    c.data.image_size = IMG
    c.batch_size = BATCH
    c.grad_accum_steps = 1
    c.total_steps = EPOCHS * STEPS_PER_EPOCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    # Only the schedule is compressed; every other optimizer setting is the preset's.
    c.optimizer.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH
    c.optimizer.schedule_steps_per_epoch = STEPS_PER_EPOCH
    assert c.optimizer.lr_scaling == "linear"
    c.optimizer.blr = PEAK_LR * 256 / BATCH
    return c


def run_fmjax(config, params0, batches):
    m, params, _, objective = run_steps(config, params0, batches)
    return m["loss"], m["lr"], params, objective


def _batches(n):
    """``n`` pre-augmented batches (NHWC float32 images, int32 labels), fixed seed."""
    return random_batches(n, BATCH, IMG, CLASSES)


_flat = flat


def _rel_err(a, b):
    return rel_err(a, b, RTOL, ATOL)


def _trajectory(config):
    ref = reference_model()
    params0 = to_fmjax(ref.state_dict())
    batches = _batches(config.total_steps)
    losses, lrs, params, objective = run_fmjax(config, params0, batches)
    loader = [[(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                torch.from_numpy(y.astype(np.int64)))
               for x, y in batches[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH]] for e in range(EPOCHS)]
    ref_losses, ref_lrs = reference_train(ref, loader, deit_args())
    return ref, params, losses, lrs, ref_losses, ref_lrs, objective


# ----------------------------------------------------------------------------------------------

def test_epoch_schedule_options_match_timm():
    """make_schedule's reference options = timm 0.3.2 CosineLRScheduler stepped as DeiT steps it
    (``schedule_epoch_lag=1``) or as timm's train.py does (``step(epoch + 1)``: lag 0, with the
    scheduler's value for epoch e + 1 after epoch e, i.e. epoch e at e), for several shapes;
    the defaults are unchanged, and wrong values are refused."""
    for k, epochs, warm, init, min_lr in ((3, 10, 2, 1e-6, 1e-5), (4, 7, 1, 5e-7, 0.0), (1, 12, 3, 1e-6, 1e-5),
                                          (5, 6, 0, 1e-6, 1e-5)):
        args = deit_args(epochs=epochs, warmup_epochs=warm, warmup_lr=init, min_lr=min_lr, lr=PEAK_LR)
        opt = dict(lr=PEAK_LR, warmup_steps=warm * k, min_lr=min_lr, decay="cosine", warmup_init=init,
                   decay_from="start", schedule_steps_per_epoch=k, schedule_epoch_lag=1)
        got = np.array([float(opt_lib.make_schedule(opt, epochs * k, BATCH)(s)) for s in range(epochs * k)])
        np.testing.assert_allclose(got, reference_lrs(args, k), rtol=2e-6, atol=1e-12, err_msg=str(opt))
        # lag 0: timm's own train.py steps step(epoch + 1), so epoch e trains at _get_lr(e).
        sched = CosineLRScheduler(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=PEAK_LR), epochs,
                                  lr_min=min_lr, decay_rate=0.1, warmup_t=warm, warmup_lr_init=init,
                                  cycle_limit=1)
        want = np.repeat([sched._get_lr(e)[0] for e in range(epochs)], k)
        got = [float(opt_lib.make_schedule(dict(opt, schedule_epoch_lag=0), epochs * k, BATCH)(s))
               for s in range(epochs * k)]
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
        # jitted with a traced int32 step, as make_train_step calls it
        f = jax.jit(opt_lib.make_schedule(opt, epochs * k, BATCH))
        np.testing.assert_allclose([float(f(jnp.int32(s))) for s in range(epochs * k)],
                                   reference_lrs(args, k), rtol=2e-6, atol=1e-12)
    # The old per-step default differs from DeiT's schedule from the first step on.
    old = dict(lr=PEAK_LR, warmup_steps=6, min_lr=MIN_LR, decay="cosine")
    got = np.array([float(opt_lib.make_schedule(old, 30, BATCH)(s)) for s in range(30)])
    assert not np.allclose(got, reference_lrs(deit_args(lr=PEAK_LR), 3), rtol=1e-2)
    # Defaults: the explicit default values give the very same schedule as none.
    for base in (old, dict(old, warmup_mode="linspace"), dict(old, decay="linear"), dict(old, warmup_steps=0)):
        same = dict(base, warmup_init=0.0, decay_from="warmup_end", schedule_steps_per_epoch=0,
                    schedule_epoch_lag=0)
        a = [float(opt_lib.make_schedule(base, 30, BATCH)(s)) for s in range(30)]
        b = [float(opt_lib.make_schedule(same, 30, BATCH)(s)) for s in range(30)]
        assert a == b
    # warmup_init on a per-step schedule: init + (peak - init) * s / W.
    f = opt_lib.make_schedule(dict(old, warmup_init=1e-4), 30, BATCH)
    np.testing.assert_allclose([float(f(s)) for s in (0, 3, 6)], [1e-4, 1e-4 + 0.9e-3 * 0.5, 1e-3], rtol=1e-6)
    for bad, match in ((dict(old, schedule_epoch_lag=1), "schedule_epoch_lag needs"),
                       (dict(old, schedule_steps_per_epoch=4), "not a whole number of epochs"),
                       (dict(old, schedule_steps_per_epoch=-1), "must be >= 0"),
                       (dict(old, decay_from="end"), "decay_from='end'"),
                       (dict(old, decay_from="start", decay="linear"), "needs decay='cosine'"),
                       (dict(old, warmup_init=1e-6, warmup_mode="linspace"), "warmup_init needs")):
        with pytest.raises(ValueError, match=match):
            opt_lib.make_schedule(bad, 30, BATCH)


def test_decay_groups_are_the_references(default_config):
    """create_optimizer's groups (add_weight_decay with no_weight_decay() = pos_embed,
    cls_token) = fmjax's decay mask with the preset's ``optimizer.wd_groups='deit'``; fmjax's old
    default NO_DECAY_PATTERNS gives the same groups on this ViT."""
    ref = reference_model()
    groups = create_optimizer(deit_args(), ref).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, WD]
    decayed = {id(p) for p in groups[1]["params"]}
    want = _flat(to_fmjax({n: torch.full_like(p, float(id(p) in decayed)) for n, p in ref.named_parameters()}))
    o = default_config("supervised", "vit_b16_imagenet").optimizer
    preset = opt_lib.no_decay_patterns(o.get("no_decay"), o.get("wd_groups", ""))
    for patterns in (tuple(preset), opt_lib.NO_DECAY_PATTERNS):
        mask = _flat(opt_lib.decay_mask(to_fmjax(ref.state_dict()), patterns=patterns))
        assert mask.keys() == want.keys()
        for k, v in want.items():
            assert np.all(v == v.flat[0]), k
            assert bool(v.flat[0]) == bool(mask[k]), (patterns, k)
    assert not mask["['cls_token']"] and not mask["['pos_embed']"] and mask["['head']['kernel']"]
    # DeiT's distilled model inherits no_weight_decay() unchanged: its dist_token decays
    # (tests/reference/test_distill_trajectory.py steps it).
    dist = opt_lib.decay_mask({"dist_token": jnp.zeros((1, 1, 4)), "x": jnp.zeros((2, 2))},
                              patterns=tuple(preset))
    assert dist == {"dist_token": True, "x": True}


def test_paper_preset_optimizer_is_the_references(default_config):
    """main.py's defaults: lr 5e-4 * batch / 512, AdamW (0.9, 0.999) eps 1e-8, wd 0.05, no
    clip, cosine over 300 epochs with 5 warm-up epochs from 1e-6, min_lr 1e-5, stepped per
    epoch after it (lag 1); an epoch is 1281167 // 1024 steps (drop_last)."""
    c = default_config("supervised", "vit_b16_imagenet")
    o = c.optimizer
    spe = 1281167 // c.batch_size
    assert (o.name, o.b1, o.b2, o.eps, o.weight_decay, o.min_lr) == ("adamw", 0.9, 0.999, 1e-8, 0.05, 1e-5)
    assert o.lr_scaling == "linear" and o.blr * c.batch_size / 256 == pytest.approx(5e-4 * c.batch_size / 512)
    assert not o.get("clip_norm") and o.decay == "cosine"
    assert (o.warmup_init, o.decay_from, o.schedule_epoch_lag) == (1e-6, "start", 1)
    assert o.schedule_steps_per_epoch == spe and o.warmup_steps == 5 * spe and c.total_steps == 300 * spe
    assert o.wd_groups == "deit" and opt_lib.NO_DECAY_PRESETS["deit"] == (r"pos_embed$", r"cls_token$")
    assert c.objective.label_smoothing == SMOOTHING and c.model.get("stem", "patch") == "patch"
    # The preset's schedule = DeiT's at three epochs' boundaries.
    f = opt_lib.make_schedule(o, c.total_steps, c.batch_size)
    args = deit_args(epochs=300, warmup_epochs=5, lr=5e-4 * c.batch_size / 512)
    want = reference_lrs(args, 1)
    for e in (0, 1, 2, 5, 6, 150, 299):
        np.testing.assert_allclose(float(f(e * spe)), want[e], rtol=1e-5)
        np.testing.assert_allclose(float(f(e * spe + spe - 1)), want[e], rtol=1e-5)


def test_trajectory_matches_reference(default_config):
    """30 optimizer steps (DeiT's epochs 0-1 at warmup_lr, epoch 2 mid warm-up, then the
    cosine), AdamW with decay 0.05, label smoothing 0.1: loss and lr at every step, final
    params (key biases: see the module docstring)."""
    config = supervised_config(default_config)
    ref, params, losses, lrs, ref_losses, ref_lrs, objective = _trajectory(config)
    np.testing.assert_allclose(lrs, ref_lrs, rtol=2e-6, err_msg="lr per step")
    assert lrs[0] == pytest.approx(WARMUP_LR, rel=1e-6) and lrs.max() < PEAK_LR
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL, err_msg="loss per step")
    got, want = _flat(params), _flat(to_fmjax(ref.state_dict()))
    assert got.keys() == want.keys()
    keys = [k for k in got if "['attn']['key']['bias']" not in k]
    assert len(keys) == len(got) - DEPTH
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
    key_bias = [k for k in got if k not in keys]
    assert max(float(np.abs(got[k] - want[k]).max()) for k in key_bias) < 0.1 * lrs.sum()
    x = jnp.asarray(_batches(1)[0][0])
    y = jnp.asarray(_batches(1)[0][1])
    a = objective.model.apply({"params": params}, x)["logits"]
    for shift in (0.0, 0.1):
        rng = np.random.default_rng(1)
        swapped = jax.tree_util.tree_map_with_path(
            lambda p, v: (want[jax.tree_util.keystr(p)] + shift * rng.standard_normal(v.shape).astype(v.dtype)
                          if jax.tree_util.keystr(p) in key_bias else v), params)
        b = objective.model.apply({"params": swapped}, x)["logits"]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
        la, _ = objective.loss(params, {}, {"image": x, "label": y}, jax.random.PRNGKey(0), 0)
        lb, _ = objective.loss(swapped, {}, {"image": x, "label": y}, jax.random.PRNGKey(0), 0)
        np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    init = _flat(to_fmjax(reference_model().state_dict()))
    moved = max(float(np.abs(got[k] - init[k]).max()) for k in keys)
    print(f"max rel err (rtol {RTOL}, atol {ATOL}): loss {_rel_err(losses, ref_losses):.2e}, "
          f"params {max(_rel_err(got[k], want[k]) for k in keys):.2e}; max param change {moved:.2e}; "
          f"losses {losses[0]:.4f} -> {losses[-1]:.4f}")
