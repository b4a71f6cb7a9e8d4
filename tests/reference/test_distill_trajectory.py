"""Training-trajectory parity of fmjax's distillation step with DeiT's (issue 18, issue 12's
protocol).

The reference is facebookresearch/deit at commit 7e160fe43f0252d17191b71cbb5826254114ea5b on
timm 0.3.2, transcribed in tests/reference/deit_reference.py: ``models.py``
``DistilledVisionTransformer`` (class and distillation tokens, ``head`` / ``head_dist``; in
training mode it returns both heads' logits), ``losses.py`` ``DistillationLoss`` (hard:
``CE(outputs_kd, teacher.argmax)``; soft: ``kl_div(log_softmax(outputs_kd / T),
log_softmax(teacher / T), 'sum', log_target=True) * T^2 / outputs_kd.numel()``; both
``(1 - alpha) base + alpha kd`` with the label-smoothed base loss on the class head), the
teacher put in ``.eval()`` by ``main.py`` and run under ``no_grad`` on the same samples,
``engine.py`` ``train_one_epoch``, and timm 0.3.2's ``create_optimizer`` (AdamW; no decay for
1-D params, biases and ``no_weight_decay()`` = {pos_embed, cls_token}: DeiT's distilled model
inherits that list, so its ``dist_token`` IS decayed) and per-epoch ``CosineLRScheduler``.

The only changes to the reference: float32 (DeiT trains under autocast), dropout / drop path
0, no mixup / CutMix / augmentation (DeiT's ``--mixup 0 --cutmix 0``; the same pre-made batches
feed both sides), no model EMA (evaluation only), and a timm ViT teacher instead of DeiT's
RegNetY (any classifier serves: ``DistillationLoss`` only reads its logits).

fmjax runs its real jitted step on ``configs/distill.py``'s paper preset ``deit_b16_imagenet``
(model shrunk to width 64 / depth 2 / patch 8 on 32x32 with the linear patch stem, float32;
schedule compressed to 10 "epochs" of 3 steps, 2 of warm-up; mixup and CutMix off; every other
setting the preset's) with the teacher read from a workdir holding the reference teacher's
weights, as a user's teacher would be. The student's weights are the reference's, converted by
``fmjax.interop.timm_vit.convert_timm_vit(..., head_dist='distill')``.

Tolerances as test_supervised_trajectory.py (loss and final params rtol 1e-5, atol 1e-6; the
attention KEY biases, whose true gradient is zero, within a loose bound). The same run with
``dist_token`` excluded from weight decay (fmjax's 'deit' list before this test: timm >= 0.4's
``no_weight_decay()``) does not match the reference's ``dist_token``.
"""
import json
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared reference
from deit_reference import DistilledVisionTransformer, VisionTransformer, reference_train  # noqa: E402
from fmjax_step import flat, random_batches, rel_err, run_steps  # noqa: E402

from fmjax.interop import timm_vit  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
IMG, PATCH, BATCH, CLASSES = 32, 8, 8, 8
WIDTH, DEPTH, HEADS = 64, 2, 4
T_WIDTH, T_DEPTH = 48, 1       # the teacher: a different (smaller) ViT
MLP_RATIO = 4.0
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 3, 10, 2   # 30 optimizer steps, 6 of warm-up
PEAK_LR, WARMUP_LR, MIN_LR, WD, SMOOTHING = 1e-3, 1e-6, 1e-5, 0.05, 0.1


def deit_args(kd, tau):
    """main.py's argparse defaults that matter here, the compressed schedule, distillation on."""
    return types.SimpleNamespace(
        batch_size=BATCH, epochs=EPOCHS, lr=PEAK_LR * 512 / BATCH, unscale_lr=False, opt='adamw',
        opt_eps=1e-8, opt_betas=None, clip_grad=None, weight_decay=WD, sched='cosine',
        warmup_lr=WARMUP_LR, min_lr=MIN_LR, decay_rate=0.1, warmup_epochs=WARMUP_EPOCHS,
        cooldown_epochs=10, smoothing=SMOOTHING, mixup=0.0, cutmix=0.0, distillation_type=kd,
        distillation_alpha=0.5, distillation_tau=tau)


def _perturb(model, seed):
    """Biases, LayerNorms, tokens and pos_embed away from their init, so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name or "pos_embed" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def student_model():
    torch.manual_seed(0)
    return _perturb(DistilledVisionTransformer(
        img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=CLASSES, embed_dim=WIDTH,
        depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP_RATIO, qkv_bias=True,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6)), 1)


def teacher_model():
    """A timm 0.3.2 ViT with every weight random (fan-in scaled matrices, other vectors
    N(0, 0.1^2) about their init, tokens and pos_embed N(0, 0.02^2)), so its argmax and
    softened targets vary over the batch."""
    t = VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=CLASSES,
                          embed_dim=T_WIDTH, depth=T_DEPTH, num_heads=HEADS, mlp_ratio=MLP_RATIO,
                          qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in t.named_parameters():
            std = (0.02 if "token" in name or "pos_embed" in name
                   else p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1)
            p.copy_(std * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm1.weight")
                                                               or name.endswith("norm2.weight")
                                                               or name == "norm.weight" else 0.0))
        t.head.weight.mul_(3.0)
    return t


def _vit_config(width, depth, **kw):
    return dict(name="vit", variant=f"Ti/{PATCH}", width=width, depth=depth, num_heads=HEADS,
                mlp_dim=int(width * MLP_RATIO), num_classes=CLASSES, pool="cls", drop_path=0.0,
                stem="patch", attention_impl="xla", remat=False, **kw)


def write_teacher_workdir(path, teacher):
    """A workdir as launch/train.py leaves it (config.json, checkpoints/<step>/state) holding
    the reference teacher's weights, converted."""
    import orbax.checkpoint as ocp
    os.makedirs(os.path.join(path, "checkpoints"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": _vit_config(T_WIDTH, T_DEPTH), "dtype": "float32"}, f)
    params = timm_vit.convert_timm_vit(teacher.state_dict(), HEADS)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "checkpoints", "0", "state"), {"params": params})
    ckpt.wait_until_finished()
    return path


def distill_config(default_config, kd, tau, teacher_dir):
    c = default_config("distill", "deit_b16_imagenet")
    c.model = _vit_config(WIDTH, DEPTH, distill_token=True)
    c.dtype = "float32"
    c.data.image_size = IMG
    c.batch_size = BATCH
    c.grad_accum_steps = 1
    c.total_steps = EPOCHS * STEPS_PER_EPOCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.optimizer.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH
    c.optimizer.schedule_steps_per_epoch = STEPS_PER_EPOCH
    assert c.optimizer.lr_scaling == "linear"
    c.optimizer.blr = PEAK_LR * 256 / BATCH
    assert (c.objective.alpha, c.objective.label_smoothing) == (0.5, SMOOTHING)
    c.objective.update(dict(kd=kd, temperature=tau, mixup_alpha=0.0, cutmix_alpha=0.0))
    c.objective.teacher.workdir = teacher_dir
    return c


def run_fmjax(config, params0, batches):
    m, params, _, _ = run_steps(config, params0, batches, record=("loss", "agreement"))
    return m["loss"], m["agreement"], params


def _batches(n):
    """``n`` pre-augmented batches (NHWC float32 images, int32 labels), fixed seed."""
    return random_batches(n, BATCH, IMG, CLASSES)


_flat = flat


def _rel_err(a, b):
    return rel_err(a, b, RTOL, ATOL)


def _to_fmjax(student):
    return timm_vit.convert_timm_vit(student.state_dict(), HEADS, head_dist="distill")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher_workdir(str(tmp_path_factory.mktemp("deit_teacher")), teacher_model())


@pytest.mark.parametrize("kd, tau", [("hard", 1.0), ("soft", 3.0)])
def test_trajectory_matches_deit(kd, tau, default_config, teacher_dir):
    """30 steps of DeiT's distilled training (epochs 0-1 at warmup_lr, the warm-up, then the
    cosine): the loss at every step and the final params, dist_token and head_dist included."""
    batches = _batches(EPOCHS * STEPS_PER_EPOCH)
    config = distill_config(default_config, kd, tau, teacher_dir)
    losses, agreement, params = run_fmjax(config, _to_fmjax(student_model()), batches)

    ref, teacher = student_model(), teacher_model()
    loader = [[(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                torch.from_numpy(y.astype(np.int64)))
               for x, y in batches[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH]] for e in range(EPOCHS)]
    ref_losses, _ = reference_train(ref, loader, deit_args(kd, tau), teacher)
    with torch.no_grad():  # the teacher's hard labels are not one class for the whole batch
        t_labels = torch.cat([teacher(x).argmax(1) for x, _ in loader[0]])
    assert len(set(t_labels.tolist())) >= 3, t_labels

    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL, err_msg="loss per step")
    got, want = _flat(params), _flat(_to_fmjax(ref))
    assert got.keys() == want.keys() and "['dist_token']" in got and "['head_dist']['kernel']" in got
    keys = [k for k in got if "['key']['bias']" not in k]
    assert len(keys) == len(got) - DEPTH
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in got if k not in keys) < 1e-2
    init = _flat(_to_fmjax(student_model()))
    moved = {k: float(np.abs(got[k] - init[k]).max()) for k in keys}
    assert moved["['dist_token']"] > 1e-4 and moved["['head_dist']['kernel']"] > 1e-4
    print(f"kd={kd}: max rel err loss {_rel_err(losses, ref_losses):.2e}, params "
          f"{max(_rel_err(got[k], want[k]) for k in keys):.2e}; max change {max(moved.values()):.2e}; "
          f"losses {losses[0]:.4f} -> {losses[-1]:.4f}; agreement {agreement[0]:.2f} -> {agreement[-1]:.2f}")


def test_dist_token_outside_decay_does_not_match(default_config, teacher_dir):
    """Excluding dist_token from weight decay (timm >= 0.4's no_weight_decay list, fmjax's
    'deit' list before the trajectory test) moves dist_token off the reference."""
    batches = _batches(EPOCHS * STEPS_PER_EPOCH)
    config = distill_config(default_config, "hard", 1.0, teacher_dir)
    config.optimizer.wd_groups = ""
    config.optimizer.no_decay = (r"pos_embed$", r"cls_token$", r"dist_token$")
    _, _, params = run_fmjax(config, _to_fmjax(student_model()), batches)
    ref, teacher = student_model(), teacher_model()
    loader = [[(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                torch.from_numpy(y.astype(np.int64)))
               for x, y in batches[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH]] for e in range(EPOCHS)]
    reference_train(ref, loader, deit_args("hard", 1.0), teacher)
    got, want = _flat(params), _flat(_to_fmjax(ref))
    assert _rel_err(got["['dist_token']"], want["['dist_token']"]) > 1e-4
    np.testing.assert_allclose(got["['cls_token']"], want["['cls_token']"], rtol=1e-4, atol=1e-5)
