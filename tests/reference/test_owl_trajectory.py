"""OWL-ViT: fmjax's jitted training step against the original training code, step by step.

Reference: google-research/scenic at commit 4a38d47 (JAX / Flax; the OWL-ViT authors' code),
transcribed below in PyTorch (pmap dropped: one device, so ``pmean`` is the identity):
  - scenic/projects/owl_vit/trainer.py ``get_train_step``: with
    ``optimizer.per_example_clipping`` the batch gets a leading axis of one per example and
    ``jax.vmap(grad_fn)`` computes each example's loss and gradient alone (the model sees that
    image and its own text queries), ``update_fn`` hands the per-example gradients to the
    optax chain;
  - scenic/train_lib/optax.py ``make``: ``optax.contrib.differentially_private_aggregate(
    max_grad_norm, 0.0, 0)`` (each example's gradient divided by ``max(|g_i| / c, 1)``, its
    global L2 norm, then the mean over the examples; noise 0), ``aggregate_gradients_pmean``,
    ``optax.scale_by_adam(b1, b2)`` (eps 1e-8), no weight decay (``optimizer.weight_decay`` 0),
    then one ``optax.scale_by_schedule`` per ``config.schedule`` group (``img_heads``: every
    param but ``backbone/clip/text/.*``; ``txt``: the text tower, its projection included) and
    ``optax.scale(-1)``;
  - scenic/train_lib/lr_schedules.py ``compound`` 'constant*linear_warmup*cosine_decay':
    ``base * min(1, s / W) * 0.5 * (1 + cos(pi * max(s - W, 0) / (T - W)))`` at the optax
    count s = 0, 1, ...;
  - scenic/projects/owl_vit/matching_base_models.py ``ObjectDetectionModel.loss_function``
    with ``normalization='per_example'``: an appended padding instance, the matching on
    ``losses.compute_cost`` (``class_loss_coef`` x (pos - neg) Deformable-DETR focal cost of
    the instance's query, ``bbox_loss_coef`` x L1 of (cx, cy, w, h), ``giou_loss_coef`` x -GIoU;
    padded columns masked) by an optimal assignment (``hungarian`` / ``hungarian_cover_tpu``;
    scipy's ``linear_sum_assignment`` here), then ``labels_losses_and_metrics`` (sigmoid focal
    cross-entropy, ``model_utils.focal_sigmoid_cross_entropy``, over every prediction and query,
    the matched prediction's query the only positive, summed, divided by the image's positives,
    at least 1) and ``boxes_losses_and_metrics`` (``weighted_box_l1_loss`` of the matched
    boxes in xyxy, and 1 - GIoU, summed, divided by the image's instances, at least 1), each
    averaged over the examples; the total ``class_loss_coef * loss_class + bbox_loss_coef *
    loss_bbox + giou_loss_coef * loss_giou``;
  - scenic/projects/owl_vit/configs/clip_b32.py: the recipe's values (focal alpha 0.3, gamma 2,
    loss coefficients 1 / 1 / 1, per-example clipping at 1.0, Adam b1 0.9, b2 0.999, the text
    tower at 2e-6 / 5e-5 = 0.04 of the image tower's and heads' lr, warm-up then cosine).
The model: transformers' ``OwlViTForObjectDetection`` (a port of scenic's
``TextZeroShotDetectionModule``; tests/interop/test_owlvit_parity.py checks fmjax's against it),
tiny (width 32, 2 + 2 layers, patch 8 on 32 px: 16 predictions), random weights, converted by
``fmjax/interop/hf_owlvit.py``.

fmjax runs the real jitted step (``make_train_step`` / ``make_optimizer`` / ``create_state``,
as fmjax/train/loop.py builds them; tests/reference/fmjax_step.py) on configs/owl.py's preset
with the reference options set (prior_prob is the reference's init, applied to both through the
converted weights): ``objective.normalization='per_example'``,
``objective.box_l1='xyxy'``, ``optimizer.clip_mode='per_example'``, ``optimizer.name='adam'``
and ``optimizer.lr_mult=(('clip/text/.*', 0.04),)``. Both train 26 steps (warm-up 6, cosine over
30) on the same batches: 4 random-normal images with 0 to 3 rectangular instances each (an image
without instances included), 9 phrases (3 colours x 3 shapes, random token ids), float32.
The clip norm sits inside the spread of the per-example gradient norms, so some examples are
clipped and some are not.

Asserted: the loss of every step and every final param (rtol 1e-4, atol 1e-6; the matching is
discrete, so a tie broken differently would show as a jump); the DETR defaults
(``box_l1='cxcywh'``; ``clip_mode='global'``; ``normalization='global'`` with it) each end
measurably away from the reference.
"""
import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
scipy_optimize = pytest.importorskip("scipy.optimize")


from fmjax.interop import formats, hf_owlvit  # noqa: E402
from fmjax.objectives import owl as owl_lib  # noqa: E402
from fmjax.testing import load_config  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared helpers
from fmjax_step import flat, param_error, rel_err, run_steps  # noqa: E402

B, K, SIZE, V, L = 4, 3, 32, 9, 12
STEPS, WARMUP, TOTAL = 26, 6, 30
LR, TEXT_MULT, CLIP = 3e-3, 0.04, 18.0
ALPHA, GAMMA = 0.3, 2.0
PRIOR = 0.01
COEF_CLASS, COEF_BBOX, COEF_GIOU = 1.0, 1.0, 1.0
RTOL, ATOL = 5e-5, 1e-6      # params; the losses at LOSS_RTOL
LOSS_RTOL = 1e-5


# -- the reference, transcribed -------------------------------------------------------------------
def reference_model(seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=SIZE, patch_size=8)
    cfg = transformers.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32,
                                    attn_implementation="eager")
    model = transformers.OwlViTForObjectDetection(cfg)
    with torch.no_grad():
        # the heads as scenic's flax nn.Dense initialises them (lecun normal, zero bias), not
        # transformers' N(0, 1) (whose logits and sigmoid boxes start saturated)
        for head in (model.class_head, model.box_head):
            for layer in head.children():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0.0, layer.in_features ** -0.5)
                    layer.bias.zero_()
        # every param matters: biases / norms / class embedding off their init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
        # trainer.py: config.prior_prob (0.01) sets class_head/logit_shift/bias after the init
        # (utils.init_classification_bias: log(p) - log1p(-p))
        model.class_head.logit_shift.bias.fill_(float(np.log(PRIOR) - np.log1p(-PRIOR)))
    return cfg, model.train()


def lr_at(s, base):   # lr_schedules.py compound 'constant*linear_warmup*cosine_decay'
    warm = min(1.0, s / WARMUP)
    adjusted = max(0.0, s - WARMUP)
    return base * warm * 0.5 * (1 + np.cos(np.pi * ((adjusted / (TOTAL - WARMUP)) % 1.0)))


def is_text(name):    # the 'txt' schedule group: backbone/clip/text/.* (text_projection included)
    return name.startswith("owlvit.text_model.") or name == "owlvit.text_projection.weight"


def box_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def giou_pairs(a, b):   # box_utils.generalized_box_iou on xyxy boxes, a (N, 4) x b (M, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / (union + 1e-6)
    lt2 = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb2 = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb2 - lt2).clamp(min=0).prod(-1)
    return iou - (hull - union) / (hull + 1e-6)


def example_loss(logits, boxes, labels, gt):
    """One image (scenic's loss_function on a batch of one, normalization='per_example'):
    logits (N, V), boxes (N, 4) cxcywh, labels (n,) query index, gt (n, 4) cxcywh."""
    n = len(labels)
    if n:   # losses.compute_cost + the matcher (an optimal assignment)
        x = logits[:, labels].detach()
        neg = -torch.nn.functional.logsigmoid(-x) * (1 - ALPHA) * torch.sigmoid(x) ** GAMMA
        pos = -torch.nn.functional.logsigmoid(x) * ALPHA * torch.sigmoid(-x) ** GAMMA
        cost = (COEF_CLASS * (pos - neg) + COEF_BBOX * (boxes.detach()[:, None] - gt[None]).abs().sum(-1)
                - COEF_GIOU * giou_pairs(box_xyxy(boxes.detach()), box_xyxy(gt)))
        rows, cols = scipy_optimize.linear_sum_assignment(cost.double().numpy())
        rows = torch.as_tensor(rows)[np.argsort(cols)]
    target = torch.zeros_like(logits)
    if n:
        target[rows, torch.as_tensor(labels)] = 1.0
    # model_utils.focal_sigmoid_cross_entropy
    ce = -(target * torch.nn.functional.logsigmoid(logits)
           + (1 - target) * torch.nn.functional.logsigmoid(-logits))
    p_t = torch.exp(-ce)
    focal = ce * (1 - p_t) ** GAMMA * (ALPHA * target + (1 - ALPHA) * (1 - target))
    denom = max(n, 1)
    loss_class = focal.sum() / denom
    if n:
        src, tgt = box_xyxy(boxes[rows]), box_xyxy(gt)
        loss_bbox = (src - tgt).abs().sum() / denom                    # weighted_box_l1_loss on xyxy
        loss_giou = (1 - torch.diagonal(giou_pairs(src, tgt))).sum() / denom
    else:
        loss_bbox = loss_giou = logits.sum() * 0
    return COEF_CLASS * loss_class + COEF_BBOX * loss_bbox + COEF_GIOU * loss_giou


def run_reference(model, batches, tokens):
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    ids, mask = torch.as_tensor(tokens), torch.ones(tokens.shape, dtype=torch.long)
    losses, clipped = [], []
    for s, batch in enumerate(batches):
        agg = {k: torch.zeros_like(p) for k, p in params.items()}
        step_losses = []
        for i in range(B):   # trainer.py: vmap(grad_fn) over examples, each a batch of one
            model.zero_grad()
            pix = torch.as_tensor(batch["image"][i:i + 1].transpose(0, 3, 1, 2))
            out = model(input_ids=ids, pixel_values=pix, attention_mask=mask)
            labels, gt = batch["ref_labels"][i], torch.as_tensor(batch["ref_boxes"][i])
            loss = example_loss(out.logits[0], out.pred_boxes[0], labels, gt)
            loss.backward()
            grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
            top = max(float(g.abs().max()) for g in grads.values())
            key = max(float(g.abs().max()) for k, g in grads.items() if "k_proj.bias" in k)
            assert key <= 1e-5 * top, (key, top)     # NOISE_ONLY: the key biases get rounding noise
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float()
            divisor = torch.clamp(norm / CLIP, min=1.0)     # per_example_global_norm_clip
            clipped.append(bool(divisor > 1))
            for k in agg:
                agg[k] += grads[k] / divisor
            step_losses.append(float(loss.detach()))
        losses.append(np.mean(step_losses))
        t = s + 1
        with torch.no_grad():
            for k, p in params.items():
                g = agg[k] / B                                  # the mean over examples
                m[k].mul_(0.9).add_(0.1 * g)                   # optax.scale_by_adam
                v[k].mul_(0.999).add_(0.001 * g * g)
                mhat, vhat = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
                lr = lr_at(s, LR * TEXT_MULT if is_text(k) else LR)
                p.add_(-lr * mhat / (torch.sqrt(vhat) + 1e-8))
    return np.array(losses), np.array(clipped)


# -- the data ------------------------------------------------------------------------------------
def make_batches(seed=0):
    g = np.random.default_rng(seed)
    batches = []
    for s in range(STEPS):
        masks = np.zeros((B, K, SIZE, SIZE), np.uint8)
        num = g.integers(1, K + 1, B).astype(np.int32)
        num[s % B] = 0 if s % 3 == 0 else num[s % B]    # now and then an image without instances
        colors, shapes = g.integers(0, 3, (B, K)).astype(np.int32), g.integers(0, 3, (B, K)).astype(np.int32)
        ref_labels, ref_boxes = [], []
        for i in range(B):
            lab, box = [], []
            for k in range(num[i]):
                w, h = g.integers(4, 20, 2)
                x0, y0 = g.integers(0, SIZE - w), g.integers(0, SIZE - h)
                masks[i, k, y0:y0 + h, x0:x0 + w] = 1
                lab.append(shapes[i, k] * 3 + colors[i, k])   # the vocabulary is shape-major
                box.append([(x0 + w / 2) / SIZE, (y0 + h / 2) / SIZE, w / SIZE, h / SIZE])
            ref_labels.append(np.asarray(lab, np.int64))
            ref_boxes.append(np.asarray(box, np.float32).reshape(-1, 4))
        image = g.standard_normal((B, SIZE, SIZE, 3)).astype(np.float32)
        batches.append(dict(image=image, masks=masks, num_objects=num, colors=colors, shapes=shapes,
                            ref_labels=ref_labels, ref_boxes=ref_boxes))
    return batches


def make_tokens(seed=1):
    ids = np.random.default_rng(seed).integers(3, 90, size=(V, L))
    for i in range(V):   # one end token per row, the largest id (argmax pooling), zeros after
        ids[i, 3 + i % 6] = 99
        ids[i, 4 + i % 6:] = 0
    return ids


# -- fmjax -----------------------------------------------------------------------------------------
def owl_config(cfg, **overrides):
    c = load_config("owl")
    c.model = hf_owlvit.owl_kwargs_from_hf_config(cfg)
    c.objective.update(dict(color_names=("red", "green", "blue"), shape_names=("circle", "square", "star"),
                            exclude=(), class_weight=COEF_CLASS, l1_weight=COEF_BBOX,
                            giou_weight=COEF_GIOU, focal_alpha=ALPHA,
                            normalization="per_example", box_l1="xyxy"))
    c.optimizer.update(dict(name="adam", lr=LR, warmup_steps=WARMUP, decay="cosine", min_lr=0.0,
                            weight_decay=0.0, clip_norm=CLIP, clip_mode="per_example",
                            lr_mult=(("clip/text/.*", TEXT_MULT),)))
    c.batch_size, c.total_steps = B, TOTAL
    c.data.image_size = SIZE
    for k, val in overrides.items():
        group, key = k.split(".")
        c[group][key] = val
    return c


def run_fmjax(config, params0, batches, tokens, monkeypatch):
    monkeypatch.setattr(owl_lib.OWLObjective, "tokens",
                        lambda self, pairs=None: np.asarray(tokens, np.int32))
    keys = ("image", "masks", "num_objects", "colors", "shapes")
    out, params, _, _ = run_steps(config, params0, [{k: b[k] for k in keys} for b in batches],
                                  record=("loss", "lr", "clipped_fraction")
                                  if config.optimizer.clip_mode == "per_example" else ("loss", "lr"))
    return out, params


@pytest.fixture(scope="module")
def reference_run():
    cfg, model = reference_model()
    params0 = formats.convert("hf_owlvit", model.state_dict(), cfg)
    batches, tokens = make_batches(), make_tokens()
    losses, clipped = run_reference(model, batches, tokens)
    final = formats.convert("hf_owlvit", model.state_dict(), cfg)
    return cfg, params0, batches, tokens, losses, clipped, final


# Attention key biases are not compared (as tests/reference/test_clip_trajectory.py): softmax
# attention is invariant to them, their exact gradient is 0, and both sides compute rounding
# noise (run_reference checks it stays < 1e-5 of the largest gradient) that Adam scales up to
# steps of ~lr in random directions. They do not change the function: the losses cover that.
NOISE_ONLY = re.compile(r"\['attn'\]\['key'\]\['bias'\]$")


def _param_error(params, final):
    return param_error(params, final, RTOL, ATOL, NOISE_ONLY)


def test_owl_trajectory_matches_scenic(reference_run, monkeypatch):
    cfg, params0, batches, tokens, ref_losses, clipped, final = reference_run
    assert 0.1 < clipped.mean() < 0.9, clipped.mean()    # the clip bites for some examples only
    out, params = run_fmjax(owl_config(cfg), params0, batches, tokens, monkeypatch)
    np.testing.assert_allclose(out["lr"], [lr_at(s, LR) for s in range(STEPS)], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["clipped_fraction"], clipped.reshape(STEPS, B).mean(1), atol=1e-6)
    np.testing.assert_allclose(out["loss"], ref_losses, rtol=LOSS_RTOL, atol=ATOL)
    err, got, want = _param_error(params, final)
    assert err <= RTOL, err
    moved = [np.abs(want[k] - flat(params0)[k]).max() for k in want if "text" not in k and "logit_scale" not in k
             and "image_proj" not in k]
    assert np.median(moved) > 1e-3          # the run moves the params, the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("override", ["objective.box_l1=cxcywh", "optimizer.clip_mode=global",
                                      "objective.normalization=global,optimizer.clip_mode=global"])
def test_detr_defaults_are_detected(reference_run, monkeypatch, override):
    """fmjax's defaults (DETR's box L1, one global clip, and DETR's loss normalisation, which
    couples the examples and so needs the global clip) each leave the reference's trajectory:
    the options are what makes the test pass."""
    cfg, params0, batches, tokens, ref_losses, _, final = reference_run
    changes = dict(kv.split("=") for kv in override.split(","))
    out, params = run_fmjax(owl_config(cfg, **changes), params0, batches, tokens, monkeypatch)
    loss_err = rel_err(out["loss"], ref_losses, LOSS_RTOL, ATOL)
    err, _, _ = _param_error(params, final)
    assert max(loss_err / LOSS_RTOL, err / RTOL) > 10.0, (loss_err, err)
