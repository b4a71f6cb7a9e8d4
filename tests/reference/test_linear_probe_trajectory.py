"""Training-trajectory parity of fmjax's linear-probe step with MAE's ``main_linprobe.py``
(issue 13's probe, issue 12's protocol).

The reference is a minimal PyTorch transcription of facebookresearch/mae at commit
efb2a8062c206524e35e47d04501ed4f544c0ae8:
- ``main_linprobe.py``: ``models_vit.VisionTransformer(global_pool=False)`` (the class-token
  feature after the encoder's final norm: timm 0.3.2's ``VisionTransformer``, transcribed in
  tests/reference/deit_reference.py), ``trunc_normal_(model.head.weight, std=0.01)``, then
  ``model.head = Sequential(BatchNorm1d(in_features, affine=False, eps=1e-6), model.head)``,
  every param frozen but the head's, ``args.lr = args.blr * eff_batch_size / 256``,
  ``LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)``
  (``util/lars.py``, in tests/reference/mae_util.py), ``torch.nn.CrossEntropyLoss()``, and
  ``train_one_epoch(..., max_norm=None)`` per epoch;
- ``engine_finetune.py`` ``train_one_epoch``: ``model.train(True)`` (the batch norm uses the
  batch's statistics and updates its running ones), the lr set every iteration by
  ``util/lr_sched.py`` ``adjust_learning_rate(optimizer, data_iter_step / len(data_loader) +
  epoch, args)``, the loss scaler's backward and step (no clipping), ``zero_grad``.

The only changes to the reference: float32 (no autocast), drop path 0 (``main_linprobe.py``
builds the model without ``drop_path_rate``: 0 already), no augmentation (the same pre-made
batches feed both sides).

fmjax runs its real jitted step on ``configs/linear_probe.py``'s paper preset
``mae_vit_b16_imagenet`` (model shrunk to width 64 / depth 2 / patch 8 on 32x32, float32;
schedule compressed to 10 "epochs" of 3 steps with 2 of warm-up; blr raised for a peak lr of
1 (MAE's is 6.4 at batch 16384): LARS's ``trust * |w| * lr`` steps move the head kernel by ~4%
in 30 steps, and the bias (no trust ratio) by 0.6;
every other setting the preset's: LARS momentum 0.9, trust 0.001, weight decay 0, cosine to
0, the backbone frozen by ``optimizer.frozen``), on the reference's weights converted by
``fmjax.interop.timm_vit.convert_timm_vit``. Checked: the lr and the loss at every step, the
final head, the batch norm's running mean / variance, and a backbone unchanged to the bit. A
second run adds weight decay (``--weight_decay 0.05``), which LARS applies inside the trust
ratio.
"""
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared reference
from deit_reference import VisionTransformer  # noqa: E402  (timm 0.3.2 = models_vit, cls token)
from fmjax_step import flat, random_batches, run_steps  # noqa: E402
from mae_util import LARS, adjust_learning_rate  # noqa: E402

from fmjax.interop import timm_vit  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
IMG, PATCH, BATCH, CLASSES = 32, 8, 16, 8
WIDTH, DEPTH, HEADS = 64, 2, 4
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 3, 10, 2   # 30 optimizer steps, 6 of warm-up
PEAK_LR = 1.0


def reference_model():
    """main_linprobe.py's model: random encoder weights (biases, norms, tokens perturbed so
    they matter), the head trunc_normal(0.01) behind BatchNorm1d(affine=False), all else frozen."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=CLASSES,
                              embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
                              qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "token" in name or "pos_embed" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    nn.init.trunc_normal_(model.head.weight, std=0.01)  # timm's trunc_normal_ (cut at +-2)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for _, p in model.named_parameters():
        p.requires_grad = False
    for _, p in model.head.named_parameters():
        p.requires_grad = True
    return model


def linprobe_args(weight_decay):
    return types.SimpleNamespace(batch_size=BATCH, accum_iter=1, epochs=EPOCHS, blr=PEAK_LR * 256 / BATCH,
                                 lr=None, min_lr=0.0, warmup_epochs=WARMUP_EPOCHS,
                                 weight_decay=weight_decay)


def reference_train(model, data_loader, args):
    """main_linprobe.py's optimizer and criterion, its epoch loop over engine_finetune.py's
    train_one_epoch. Returns the loss and the lr of every step."""
    eff_batch_size = args.batch_size * args.accum_iter * 1
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    losses, lrs = [], []
    for epoch in range(args.epochs):
        model.train(True)
        optimizer.zero_grad()
        for data_iter_step, (samples, targets) in enumerate(data_loader[epoch]):
            if data_iter_step % args.accum_iter == 0:
                adjust_learning_rate(optimizer, data_iter_step / len(data_loader[epoch]) + epoch, args)
            outputs = model(samples)
            loss = criterion(outputs, targets)
            losses.append(loss.item())
            lrs.append(optimizer.param_groups[0]["lr"])
            loss /= args.accum_iter
            loss.backward()          # loss_scaler(..., clip_grad=None): backward, unscale, step
            optimizer.step()
            optimizer.zero_grad()
    return np.array(losses), np.array(lrs)


def to_fmjax(model):
    """{backbone: the encoder (timm_vit converter), head: the Linear}, and the batch norm's
    running statistics."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    head = model.head[1]
    params = {"backbone": timm_vit.convert_timm_vit(sd, HEADS),
              "head": {"kernel": head.weight.detach().numpy().T.copy(),
                       "bias": head.bias.detach().numpy().copy()}}
    bn = model.head[0]
    return params, {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()}


def probe_config(default_config, weight_decay):
    c = default_config("linear_probe", "mae_vit_b16_imagenet")
    assert (c.optimizer.name, c.optimizer.momentum, c.optimizer.trust_coefficient) == ("lars", 0.9, 0.001)
    assert c.optimizer.weight_decay == 0.0 and c.optimizer.min_lr == 0.0 and not c.optimizer.clip_norm
    assert c.optimizer.lr_scaling == "linear" and c.optimizer.blr == 0.1
    assert tuple(c.optimizer.frozen) == ("backbone/.*",)
    assert (c.objective.bn_eps, c.objective.bn_momentum, c.objective.head_init_std) == (1e-6, 0.1, 0.01)
    c.model = dict(name="vit", variant=f"Ti/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                   mlp_dim=4 * WIDTH, num_classes=0, pool="cls", pos_embed="learned", stem="patch",
                   attention_impl="xla", remat=False)
    c.objective.num_classes = CLASSES
    c.dtype = "float32"
    c.data.image_size = IMG
    c.batch_size = BATCH
    c.grad_accum_steps = 1
    c.total_steps = EPOCHS * STEPS_PER_EPOCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.optimizer.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH
    c.optimizer.blr = PEAK_LR * 256 / BATCH
    c.optimizer.weight_decay = weight_decay
    return c


def run_fmjax(config, params0, extra0, batches):
    m, params, extra, _ = run_steps(config, params0, batches, extra0)
    return m["loss"], m["lr"], params, extra


def _batches(n):
    return random_batches(n, BATCH, IMG, CLASSES)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_trajectory_matches_mae_linprobe(weight_decay, default_config):
    batches = _batches(EPOCHS * STEPS_PER_EPOCH)
    params0, extra0 = to_fmjax(reference_model())
    losses, lrs, params, extra = run_fmjax(probe_config(default_config, weight_decay), params0,
                                           extra0, batches)
    ref = reference_model()
    loader = [[(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                torch.from_numpy(y.astype(np.int64)))
               for x, y in batches[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH]] for e in range(EPOCHS)]
    ref_losses, ref_lrs = reference_train(ref, loader, linprobe_args(weight_decay))
    want, want_extra = to_fmjax(ref)

    np.testing.assert_allclose(lrs, ref_lrs, rtol=1e-6, atol=1e-6 * PEAK_LR, err_msg="lr per step")
    assert lrs[0] == 0.0 and lrs.max() == pytest.approx(PEAK_LR, rel=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL, err_msg="loss per step")
    # The kernel (~0.02) moves by ~8e-4: atol 1e-7 keeps the comparison well inside that motion
    # (measured |diff| 7.5e-9; the bias 1.2e-7 after moving 0.62).
    for k, atol in (("kernel", 1e-7), ("bias", ATOL)):
        np.testing.assert_allclose(params["head"][k], want["head"][k], rtol=RTOL, atol=atol, err_msg=k)
    for k in ("mean", "var"):
        np.testing.assert_allclose(extra[k], want_extra[k], rtol=RTOL, atol=ATOL, err_msg=f"running {k}")
    got_b, init_b = flat(params["backbone"]), flat(params0["backbone"])
    for k in init_b:  # frozen: bit-identical
        np.testing.assert_array_equal(got_b[k], init_b[k], err_msg=k)
    moved = float(np.abs(params["head"]["kernel"] - params0["head"]["kernel"]).max() /
                  np.abs(params0["head"]["kernel"]).max())
    assert moved > 0.01, moved  # measured 0.02
    print(f"wd={weight_decay}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; head moved {moved:.2f} of its "
          f"max; max rel err loss {float(np.max(np.abs(losses - ref_losses) / (0.1 + np.abs(ref_losses)))):.2e}")
