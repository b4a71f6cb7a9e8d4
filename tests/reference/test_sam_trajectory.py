"""SAM: fmjax's jitted training step against SAM 2's training code, step by step.

SAM 1's public code (facebookresearch/segment-anything) is inference-only. The authors'
nearest training code is SAM 2's: facebookresearch/sam2 at commit 2b90b9f, whose image
training (SA-1B as one-frame videos) runs the interactive loop below. Transcribed in PyTorch
around the SAM 1 model (transformers' ``SamModel``; SAM 2's memory attention, Hiera trunk and
object-score head left out: one frame, ``pred_obj_scores=False``):
  - training/model/sam2.py ``prepare_prompt_inputs``: one frame forces point input; box or
    point is drawn ONCE per batch (``self.rng.random() < prob_to_use_box_input_for_train``);
    a box through sam2/modeling/sam2_utils.py ``sample_box_points`` (``mask_to_box`` bounds,
    each corner moved by U(-1, 1) x min(0.1 x side, 20) px, clamped to the image, labels 2 / 3
    as points), a point through ``get_next_point(gt, None, 'uniform')``;
  - ``_iter_correct_pt_sampling``: ``num_correction_pt_per_frame`` rounds, each a click from
    ``sample_random_points_from_errors`` ((H, W, 2) uniform noise masked by the FP / FN maps,
    the argmax; a background negative click when the prediction is exact) on the previous
    round's chosen high-res mask (with probability ``prob_to_sample_from_gt_for_train``, once
    per batch and round, on the ground truth alone), appended to the prompt, and the previous
    chosen low-res logits as the mask prompt, not detached;
  - sam2/modeling/sam2_base.py ``_forward_sam_heads``: points with boxes=None (the prompt
    encoder appends its not-a-point pad), multimask output for one point only
    (``_use_multimask``, min 0 / max 1 points), logits upsampled bilinearly (align_corners
    False) to the image, the chosen mask the IoU head's argmax;
  - sam2/modeling/sam/prompt_encoder.py ``_embed_points`` (labels -1 / 0 / 1 / 2 / 3 by
    ``torch.where``, so every point embedding gets a gradient every step);
  - training/loss_fns.py ``MultiStepMultiMasksAndIous`` with sam2.1_training's values
    (loss_mask 20, loss_dice 1, loss_iou 1, ``supervise_all_iou``, ``iou_use_l1_loss``): per
    round focal + dice of the lowest-loss mask, the IoU head's L1 over all masks, each summed
    over objects / the batch's objects, the rounds SUMMED;
  - training/trainer.py + training/optimizer.py: ``GradientClipper`` (clip_grad_norm_, 0.1),
    ``torch.optim.AdamW``, the lr of every group from fvcore's ``CosineParamScheduler(base,
    base / 10)`` at ``where = step / total`` (set before each step), the image encoder's
    group at ``vision_lr`` (0.6 of base, as 3e-6 / 5e-6), weight decay 0.1 except params
    named ``*bias*`` and those of ``torch.nn.LayerNorm`` modules (SAM's LayerNorm2d -- the
    neck's, the mask downscaler's and the upscaler's -- is not one: their weights decay); the
    random-Fourier matrix a buffer (frozen).
Not transcribed: the layer-wise lr decay of the Hiera trunk (its ``get_layer_id`` is Hiera's;
fmjax's ``optimizer.llrd`` follows MAE's ViT rule), bfloat16 autocast (float32 here).

fmjax runs its real jitted step (tests/reference/fmjax_step.py) on configs/sam.py with the
reference options: ``objective.interaction='sam2'``, ``round_reduction='sum'``,
``iou_loss='l1'``, ``mask_prompt_grad=True``, ``click_from_gt_prob``; ``optimizer.decay_all``
with ``wd_mult`` 0 on biases and the nn.LayerNorm params, ``lr_mult`` on the image encoder,
``decay_from='start'``, ``min_lr`` = lr / 10, ``clip_eps=1e-6``. The draws (box or point,
box noise, click noise, ground-truth rounds) are fmjax's (``SAMObjective.sam2_draws`` of the
step's key), handed to the reference. 26 steps, 2 images of 32 px x 2 instances, 3 rounds.

Asserted: the loss of every step, the lr, and every final param. Measured: losses within 2.4e-7
relative (13.74 -> 8.29), params within 1.5e-6 absolute (they moved by up to 2.6e-2); 15 box and
11 point batches, 22 of 78 rounds clicking on the mask alone. The weights are random at half the
fan-in scale: at the full scale the float32 gradients of the mask-prompt path already differ
from float64 by 6e-4 (both sides alike), too noisy for a 26-step comparison. Each of fmjax's
defaults for the loss (mask prompt without gradient, MSE IoU loss, rounds averaged) failed it
(the first is ``test_fmjax_defaults_are_detected``, slow).
"""
import os
import re
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from fmjax.interop import hf_sam  # noqa: E402
from fmjax.testing import load_config  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared helpers
from fmjax_step import flat, param_error, rel_err, run_steps  # noqa: E402

B, K, SIZE = 2, 2, 32
R = B * K
ROUNDS = 3
STEPS, TOTAL = 26, 30
LR, VISION_MULT, WD, CLIP = 2e-3, 0.6, 0.1, 0.1
BOX_PROB, GT_PROB = 0.5, 0.25
W_MASK, W_DICE, W_IOU = 20.0, 1.0, 1.0
RTOL, ATOL = 1e-4, 3e-6     # params: measured max |diff| 1.5e-6 where they moved up to 2.6e-2
LOSS_RTOL = 2e-5


# -- the reference, transcribed -------------------------------------------------------------------
def hf_config():
    return transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                           patch_size=8, window_size=2, global_attn_indexes=[1], output_channels=32,
                           num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=SIZE, patch_size=8, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        attn_implementation="eager")


def reference_model(seed=0):
    cfg = hf_config()
    torch.manual_seed(seed)
    model = transformers.SamModel(cfg)
    with torch.no_grad():   # every param random (HF inits rel-pos and pos-embed to zeros)
        for name, p in model.named_parameters():
            if "positional_embedding" in name:
                p.copy_(torch.randn_like(p))     # PositionEmbeddingRandom: scale 1
            elif p.ndim > 1:
                p.copy_(0.5 * p[0].numel() ** -0.5 * torch.randn_like(p))   # well conditioned in float32
            else:
                p.copy_(0.05 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return cfg, model.train()


def embed_points(model, points, labels):
    """prompt_encoder.py _embed_points(points, labels, pad=True) on HF's modules."""
    pe = model.prompt_encoder
    points = points + 0.5
    points = torch.cat([points, torch.zeros(points.shape[0], 1, 2)], 1)
    labels = torch.cat([labels, -torch.ones(labels.shape[0], 1, dtype=labels.dtype)], 1)
    coords = points / SIZE                                      # forward_with_coords
    coords = 2 * coords - 1
    coords = 2 * np.pi * (coords @ model.shared_image_embedding.positional_embedding)
    emb = torch.cat([torch.sin(coords), torch.cos(coords)], -1)
    lab = labels.unsqueeze(-1)
    emb = torch.where(lab == -1, torch.zeros_like(emb) + pe.not_a_point_embed.weight, emb)
    for k in range(4):
        emb = torch.where(lab == k, emb + pe.point_embed[k].weight, emb)
    return emb


def sam_heads(model, feats, points, labels, mask_inputs, multimask):
    """sam2_base.py _forward_sam_heads on SAM 1's prompt encoder / mask decoder."""
    sparse = embed_points(model, points, labels)
    if mask_inputs is not None:
        dense = model.prompt_encoder.mask_embed(mask_inputs)
    else:
        dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            feats.shape[0], -1, feats.shape[2], feats.shape[3])
    image_pe = model.get_image_wide_positional_embeddings().repeat(feats.shape[0], 1, 1, 1)
    low, ious = model.mask_decoder(feats, image_pe, sparse[:, None], dense, multimask)
    low, ious = low[:, 0], ious[:, 0]
    high = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    if multimask:
        best = torch.argmax(ious, -1)
        rows = torch.arange(low.shape[0])
        return low, high, ious, low[rows, best].unsqueeze(1), high[rows, best].unsqueeze(1)
    return low, high, ious, low, high


def mask_to_box(masks):   # sam2/utils/misc.py
    b, _, h, w = masks.shape
    xs, ys = torch.meshgrid(torch.arange(w, dtype=torch.int32), torch.arange(h, dtype=torch.int32), indexing="xy")
    xs, ys = xs[None, None].expand(b, 1, h, w), ys[None, None].expand(b, 1, h, w)
    min_xs, _ = torch.min(torch.where(masks, xs, w).flatten(-2), -1)
    max_xs, _ = torch.max(torch.where(masks, xs, -1).flatten(-2), -1)
    min_ys, _ = torch.min(torch.where(masks, ys, h).flatten(-2), -1)
    max_ys, _ = torch.max(torch.where(masks, ys, -1).flatten(-2), -1)
    return torch.stack((min_xs, min_ys, max_xs, max_ys), -1)


def sample_box_points(masks, rand, noise=0.1, noise_bound=20):   # sam2_utils.py; rand: torch.rand(B, 1, 4)
    box = mask_to_box(masks)
    bw, bh = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    max_dx = torch.min(bw * noise, torch.tensor(noise_bound))
    max_dy = torch.min(bh * noise, torch.tensor(noise_bound))
    box = box + (2 * rand - 1) * torch.stack((max_dx, max_dy, max_dx, max_dy), -1)
    bounds = torch.tensor([SIZE, SIZE, SIZE, SIZE]) - 1
    box = box.clamp(torch.zeros_like(bounds), bounds)
    labels = torch.tensor([2, 3], dtype=torch.int).repeat(masks.shape[0])
    return box.reshape(-1, 2, 2), labels.reshape(-1, 2)


def sample_points_from_errors(gt, pred, noise):   # sam2_utils.py; noise: torch.rand(B, 1, H, W, 2)
    if pred is None:
        pred = torch.zeros_like(gt)
    fp, fn = ~gt & pred, gt & ~pred
    all_correct = torch.all((gt == pred).flatten(2), dim=2)[..., None, None]
    noise = noise.clone()
    noise[..., 0] *= fp | (all_correct & ~gt)
    noise[..., 1] *= fn
    idx = noise.flatten(2).argmax(dim=2)
    labels = (idx % 2).to(torch.int32)
    idx = idx // 2
    return torch.stack([idx % SIZE, idx // SIZE], dim=2).to(torch.float), labels


def focal(inputs, targets, num_objects, alpha=0.25, gamma=2.0):   # loss_fns.py, loss_on_multimask
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1) / num_objects


def dice(inputs, targets, num_objects):
    inputs, targets = inputs.sigmoid().flatten(2), targets.flatten(2)
    return (1 - (2 * (inputs * targets).sum(-1) + 1) / (inputs.sum(-1) + targets.sum(-1) + 1)) / num_objects


def iou_l1(inputs, targets, pred_ious, num_objects):
    pred, gt = inputs.flatten(2) > 0, targets.flatten(2) > 0
    actual = (pred & gt).sum(-1).float() / torch.clamp((pred | gt).sum(-1).float(), min=1.0)
    return F.l1_loss(pred_ious, actual, reduction="none") / num_objects


def multistep_loss(multimasks, ious, gt):
    """MultiStepMultiMasksAndIous._forward: rounds summed."""
    target = gt.unsqueeze(1).float()
    n = float(gt.shape[0])
    total = 0.0
    for src, iou in zip(multimasks, ious):
        t = target.expand_as(src)
        lm, ld, li = focal(src, t, n), dice(src, t, n), iou_l1(src, t, iou, n)
        if lm.size(1) > 1:
            best = torch.argmin(lm * W_MASK + ld * W_DICE, -1)
            rows = torch.arange(lm.size(0))
            lm, ld, li = lm[rows, best], ld[rows, best], li.mean(-1)
        total = total + W_MASK * lm.sum() + W_DICE * ld.sum() + W_IOU * li.sum()
    return total


def reference_step(model, batch, draws):
    pix = torch.as_tensor(batch["image"].transpose(0, 3, 1, 2))
    feats = model.vision_encoder(pix).last_hidden_state                      # (B, C, h, w)
    feats = feats[torch.as_tensor(np.repeat(np.arange(B), K))]               # per object
    gt = torch.as_tensor(batch["masks"].reshape(R, 1, SIZE, SIZE) > 0)
    clicks = torch.as_tensor(np.array(draws["clicks"]))[:, :, None]       # (rounds + 1, R, 1, H, W, 2)
    use_box = float(draws["box"]) < BOX_PROB
    if use_box:
        points, labels = sample_box_points(gt, torch.as_tensor(np.array(draws["box_noise"]))[:, None])
    else:
        points, labels = sample_points_from_errors(gt, None, clicks[0])
    multimask = points.shape[1] == 1
    low_multi, high_multi, ious, low, high = sam_heads(model, feats, points, labels, None, multimask)
    all_multi, all_ious = [high_multi], [ious]
    from_gt = []
    for rnd in range(ROUNDS):
        sample_from_gt = float(draws["from_gt"][rnd]) < GT_PROB
        from_gt.append(sample_from_gt)
        pred = None if sample_from_gt else high > 0
        new_points, new_labels = sample_points_from_errors(gt, pred, clicks[rnd + 1])
        points, labels = torch.cat([points, new_points], 1), torch.cat([labels, new_labels], 1)
        multimask = points.shape[1] == 1
        low_multi, high_multi, ious, low, high = sam_heads(model, feats, points, labels, low, multimask)
        all_multi.append(high_multi)
        all_ious.append(ious)
    return multistep_loss(all_multi, all_ious, gt[:, 0]), use_box, from_gt


def is_vision(name):
    return name.startswith("vision_encoder.")


def decays(model, name):
    """weight_decay 0 for '*bias*' and the params of torch.nn.LayerNorm modules (exact class,
    as training/optimizer.py get_module_cls_to_param_names); HF's SamLayerNorm is a LayerNorm
    subclass used both ways: its channels_first instances are SAM's LayerNorm2d."""
    if "bias" in name:
        return False
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return not (isinstance(module, torch.nn.LayerNorm) and getattr(module, "data_format", "channels_last")
                == "channels_last")


def run_reference(model, batches, draws):
    groups = {}
    for name, p in model.named_parameters():
        if "positional_embedding" in name:     # PositionEmbeddingRandom's buffer
            p.requires_grad_(False)
            continue
        groups.setdefault((is_vision(name), decays(model, name)), []).append(p)
    keys = sorted(groups)
    opt = torch.optim.AdamW([dict(params=groups[k], weight_decay=WD if k[1] else 0.0) for k in keys],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses, lrs, boxes, gts = [], [], [], []
    for s, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss, use_box, from_gt = reference_step(model, batch, draws[s])
        loss.backward()
        where = s / TOTAL                                      # trainer.py: set before the step
        base = LR / 10 + 0.5 * (LR - LR / 10) * (1 + np.cos(np.pi * where))   # CosineParamScheduler
        for k, group in zip(keys, opt.param_groups):
            group["lr"] = base * (VISION_MULT if k[0] else 1.0)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm=CLIP)
        opt.step()
        losses.append(float(loss.detach()))
        lrs.append(base)
        boxes.append(use_box)
        gts.extend(from_gt)
    return np.array(losses), np.array(lrs), np.array(boxes), np.array(gts)


# -- the data ------------------------------------------------------------------------------------
def make_batches(seed=0):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    batches = []
    for _ in range(STEPS):
        masks = np.zeros((B, K, SIZE, SIZE), np.uint8)
        for i in range(B):
            for k in range(K):
                cx, cy = g.uniform(6, SIZE - 6, 2)
                rx, ry = g.uniform(3, 10, 2)
                if g.random() < 0.5:   # an ellipse or a rectangle
                    masks[i, k] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
                else:
                    masks[i, k] = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        image = g.standard_normal((B, SIZE, SIZE, 3)).astype(np.float32)
        image += 1.5 * masks.max(1)[..., None]       # the objects are brighter than the background
        batches.append(dict(image=image, masks=masks, num_objects=np.full((B,), K, np.int32)))
    return batches


# -- fmjax -----------------------------------------------------------------------------------------
LN = r"(image_encoder/block_\d+/norm\d|mask_decoder/transformer/(layers_\d+/norm\d|norm_final_attn))/.*"


def sam_config(cfg, **overrides):
    c = load_config("sam")
    c.model = dict(name="sam", **hf_sam.sam_kwargs_from_hf_config(cfg))
    c.data.image_size = SIZE
    c.objective.update(dict(correction_rounds=ROUNDS, box_prob=BOX_PROB, box_noise=0.1, box_noise_max=20.0,
                            focal_weight=W_MASK, dice_weight=W_DICE, iou_weight=W_IOU,
                            interaction="sam2", round_reduction="sum", iou_loss="l1",
                            mask_prompt_grad=True, click_from_gt_prob=GT_PROB))
    c.optimizer.update(dict(name="adamw", lr=LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, warmup_steps=0,
                            decay="cosine", decay_from="start", min_lr=LR / 10, clip_norm=CLIP, clip_eps=1e-6,
                            decay_all=True, wd_mult=((r".*bias$", 0.0), (LN, 0.0)),
                            lr_mult=((r"image_encoder/.*", VISION_MULT),)))
    c.batch_size, c.total_steps = B, TOTAL
    for k, val in overrides.items():
        group, key = k.split(".")
        c[group][key] = val
    return c


def fmjax_draws(config, batches):
    """The draws of every step: the loss's key is fold_in(state rng, step) (fmjax/train/step.py),
    sam2_draws takes fold_in(that, 2) (SAMObjective.loss)."""
    from fmjax.objectives.base import make_objective
    objective = make_objective(config)
    state_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]    # fmjax/train/state.py
    out = []
    for s in range(len(batches)):
        key = jax.random.fold_in(jax.random.fold_in(state_rng, s), 2)
        out.append(jax.device_get(objective.sam2_draws(key, R, SIZE, SIZE)))
    return out


@pytest.fixture(scope="module")
def reference_run():
    cfg, model = reference_model()
    params0 = hf_sam.convert_hf_sam(model.state_dict(), cfg)
    batches = make_batches()
    draws = fmjax_draws(sam_config(cfg), batches)
    losses, lrs, boxes, gts = run_reference(model, batches, draws)
    final = hf_sam.convert_hf_sam(model.state_dict(), cfg)
    return cfg, params0, batches, losses, lrs, boxes, gts, final


# Attention key biases are not compared (as the CLIP and OWL trajectory tests): softmax is
# invariant to them, their exact gradient is 0, both sides compute rounding noise.
NOISE_ONLY = re.compile(r"\['key'\]\['bias'\]$")


def _param_error(params, final):
    return param_error(params, final, RTOL, ATOL, NOISE_ONLY)


def test_sam_trajectory_matches_sam2_training(reference_run):
    cfg, params0, batches, ref_losses, ref_lrs, boxes, gts, final = reference_run
    assert 0 < boxes.sum() < len(boxes) and gts.any()   # box and point batches, clicks from the mask
    out, params, _, _ = run_steps(sam_config(cfg), params0, batches)
    np.testing.assert_allclose(out["lr"], ref_lrs, rtol=1e-6)
    err, got, want = _param_error(params, final)
    print(f"SAM vs sam2: {int(boxes.sum())} box / {len(boxes) - int(boxes.sum())} point batches, "
          f"{int(gts.sum())} rounds clicked on the mask; loss {ref_losses[0]:.3f} -> {ref_losses[-1]:.3f}, "
          f"loss rel err {np.max(np.abs(out['loss'] - ref_losses) / ref_losses):.1e}, param err {err:.1e}")
    np.testing.assert_allclose(out["loss"], ref_losses, rtol=LOSS_RTOL, atol=ATOL)
    assert err <= RTOL, err
    moved = [np.abs(want[k] - flat(params0)[k]).max() for k in want]
    assert np.median(moved) > 1e-3          # the run moves the params, the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("override", ["objective.mask_prompt_grad=False"])
def test_fmjax_defaults_are_detected(reference_run, override):
    """fmjax's own choice of a detached mask prompt leaves SAM 2's trajectory: the option is
    what makes the test pass. (MSE on the IoU head and the rounds averaged failed it too,
    measured 2026-12-05; not run here for the suite's time: averaging shows in the loss values
    only, as the clipped Adam update does not see the loss scale.)"""
    cfg, params0, batches, ref_losses, _, _, _, final = reference_run
    key, value = override.split("=")
    out, params, _, _ = run_steps(sam_config(cfg, **{key: value == "True" if value in ("True", "False") else value}),
                                  params0, batches)
    loss_err = rel_err(out["loss"], ref_losses, LOSS_RTOL, ATOL)
    err, _, _ = _param_error(params, final)
    assert max(loss_err / LOSS_RTOL, err / RTOL) > 10.0, (loss_err, err)
