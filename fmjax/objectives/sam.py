"""SAM's promptable-segmentation training with simulated interaction (Kirillov et al., 2023,
section 3 and appendix A "Training algorithm").

Per image the image encoder runs once; every instance of the image (``masks`` (B, K, H, W),
``num_objects``) becomes one prompt row whose decoder runs ``1 + correction_rounds`` times:

- round 0: with probability ``box_prob`` a box (the mask's bounds, each coordinate moved by
  N(0, (``box_noise`` x side)^2), capped at ``box_noise_max`` px) and one mask (the fourth
  output token: the paper predicts three masks only for an ambiguous prompt, a single point),
  else one foreground point drawn uniformly from the mask, three masks and the loss of the best
  one (min over the three, as the paper backpropagates only the lowest loss);
- rounds 1..N: one new point drawn uniformly from the error region of the previous prediction
  (a positive point if it lands in a false negative, a negative one in a false positive), the
  points so far, and the previous round's low-res mask logits (no gradient) as the mask
  prompt; one mask.

The loss of a prediction is ``focal_weight`` x focal (alpha 0.25, gamma 2) + ``dice_weight``
x dice on the mask logits upsampled to the image (the paper's 20:1), plus ``iou_weight`` x the
MSE between the IoU head and each output mask's IoU with the ground truth. Rounds are
averaged; rows of absent or fully occluded instances are masked out. ``remat_rounds=True``
recomputes each round's decoder pass and loss in the backward pass (same values and
gradients, far less memory at 1024 px; the paper presets set it).

Prompts share one static layout so box and point rows batch together: ``1 + rounds + 1``
point slots; a box is given as its two corners with labels 2 / 3 (the prompt encoder embeds
them exactly as box tokens), unused slots are padding (-10). Point rows therefore carry the
padding tokens a box row uses for its second corner (HF's batched-prompt convention), and box
rows the not-a-point pad token the prompt encoder appends (the original appends it for point
prompts only).

Reference options (defaults: the behaviour above). ``interaction='sam2'`` simulates the
interaction as SAM 2's training code does (facebookresearch/sam2 ``training/model/sam2.py``
``prepare_prompt_inputs`` / ``_iter_correct_pt_sampling``, ``sam2/modeling/sam2_utils.py``;
tests/reference/test_sam_trajectory.py steps against it): box or point is chosen once per
batch (P(box) = ``box_prob``); a box's corners move by U(-1, 1) x min(``box_noise`` x side,
``box_noise_max``) px (``sample_box_points``); every click, the first included, is
``sample_random_points_from_errors``: the argmax of (H, W, 2) uniform noise masked by the
false-positive (channel 0, a negative click; the background when the prediction is exact) and
false-negative (channel 1, positive) maps; with probability ``click_from_gt_prob`` per round
(once per batch) the click comes from the ground truth alone; a prompt grows by one point per
round (no padding slots; the pad token the prompt encoder appends is kept); the next click and
mask prompt come from the round-0 mask the IoU head ranks first. ``round_reduction='sum'``
sums the rounds' losses (SAM 2's ``MultiStepMultiMasksAndIous``) instead of averaging them;
``iou_loss='l1'`` (its ``iou_use_l1_loss``) instead of MSE; ``mask_prompt_grad=True``
backpropagates through the previous round's logits given as the mask prompt (SAM 2 feeds
them without a ``detach``). Not transcribed: SAM 2's object-score head (``pred_obj_scores``:
SAM has none), its memory attention (one frame: the image embedding as it is).

``eval_metrics``: per image, the mean IoU over its instances with one box (no noise), one
point (the most confident of the three masks by the IoU head, as SAM's ambiguity rule;
``miou_1pt_oracle``: the best of the three), and one point plus two corrections
(``miou_3pt``); each a separate forward with its own draws.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective

PAD, BOX_TL, BOX_BR = -10, 2, 3


def sigmoid_focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss (Lin et al., 2017); alpha < 0: no alpha weighting."""
    p = jax.nn.sigmoid(logits)
    ce = jnp.logaddexp(0.0, logits) - logits * targets  # binary cross-entropy with logits
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Sigmoid focal loss averaged over the last two (pixel) axes."""
    return sigmoid_focal(logits, targets, alpha, gamma).mean(axis=(-2, -1))


def dice_loss(logits, targets, eps: float = 1.0):
    p = jax.nn.sigmoid(logits)
    num = 2 * (p * targets).sum(axis=(-2, -1)) + eps
    return 1 - num / (p.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1)) + eps)


def mask_iou(pred, gt):
    """IoU of boolean masks over the last two axes (1 when both are empty)."""
    inter = (pred & gt).sum(axis=(-2, -1))
    union = (pred | gt).sum(axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def sample_pixel(rng, region):
    """(R, H, W) bool -> (xy (R, 2) float pixel coords, found (R,) bool): uniform over the
    region (Gumbel-max over its pixels)."""
    r, h, w = region.shape
    scores = jax.random.uniform(rng, (r, h * w)) + 2.0 * region.reshape(r, -1)
    idx = jnp.argmax(scores, axis=-1)
    xy = jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.float32)
    return xy, region.reshape(r, -1).any(-1)


def mask_box(gt):
    """(R, H, W) bool -> (R, 4) x0, y0, x1, y1 (inclusive pixel bounds; zeros when empty)."""
    h, w = gt.shape[-2:]
    ys, xs = jnp.arange(h), jnp.arange(w)
    rows, cols = gt.any(-1), gt.any(-2)
    big = max(h, w) + 1
    y0 = jnp.min(jnp.where(rows, ys, big), -1)
    y1 = jnp.max(jnp.where(rows, ys, -1), -1)
    x0 = jnp.min(jnp.where(cols, xs, big), -1)
    x1 = jnp.max(jnp.where(cols, xs, -1), -1)
    box = jnp.stack([x0, y0, x1, y1], -1).astype(jnp.float32)
    return jnp.where(gt.any((-2, -1))[:, None], box, 0.0)


def jitter_box(rng, box, frac: float, max_px: float, size: int):
    side = jnp.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]] * 2, -1) + 1
    noise = jnp.clip(jax.random.normal(rng, box.shape) * frac * side, -max_px, max_px)
    out = jnp.clip(box + noise, 0, size - 1)
    x0, x1 = jnp.minimum(out[:, 0], out[:, 2]), jnp.maximum(out[:, 0], out[:, 2])
    y0, y1 = jnp.minimum(out[:, 1], out[:, 3]), jnp.maximum(out[:, 1], out[:, 3])
    return jnp.stack([x0, y0, x1, y1], -1)


def _take(x, i):
    """x (R, M, ...), i (R,) -> x[r, i[r]] for every row."""
    return jnp.take_along_axis(x, i.reshape((-1,) + (1,) * (x.ndim - 1)), 1)[:, 0]


class SAMObjective(Objective):
    batch_keys = ("image", "masks", "num_objects")

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("promptable_masks",), "objective 'sam'", config.model.name)
        o = config.objective
        self.rounds = int(o.get("correction_rounds", 2))
        self.box_prob = float(o.get("box_prob", 0.5))
        self.box_noise = float(o.get("box_noise", 0.1))
        self.box_noise_max = float(o.get("box_noise_max", 20.0))
        self.focal_weight = float(o.get("focal_weight", 20.0))
        self.dice_weight = float(o.get("dice_weight", 1.0))
        self.iou_weight = float(o.get("iou_weight", 1.0))
        # recompute each round's decoder pass and full-resolution loss in the backward pass
        # instead of keeping them: at 1024 px with 64 masks per image and 11 rounds the kept
        # upsampled logits alone are ~1 GB per image per round (the paper presets set it)
        self.remat_rounds = bool(o.get("remat_rounds", False))
        self.patch_size = self.model.patch_size
        # reference options (module docstring)
        self.interaction = o.get("interaction", "fmjax")
        self.round_reduction = o.get("round_reduction", "mean")
        self.iou_loss = o.get("iou_loss", "mse")
        self.mask_prompt_grad = bool(o.get("mask_prompt_grad", False))
        self.click_from_gt_prob = float(o.get("click_from_gt_prob", 0.0))

    def check(self, config):
        from fmjax.errors import ConfigError
        size = config.data.get("image_size")
        if size and size != self.model.image_size:
            raise ConfigError(f"config.data.image_size={size} but the SAM model takes {self.model.image_size} px "
                              f"images; set --config.model.image_size={size} (or resize the data).")
        if self.rounds < 0 or not 0 <= self.box_prob <= 1:
            raise ConfigError("config.objective.correction_rounds must be >= 0 and box_prob in [0, 1].")
        for key, value, valid in (("interaction", self.interaction, ("fmjax", "sam2")),
                                  ("round_reduction", self.round_reduction, ("mean", "sum")),
                                  ("iou_loss", self.iou_loss, ("mse", "l1"))):
            if value not in valid:
                raise ConfigError(f"config.objective.{key}={value!r}; valid: {', '.join(map(repr, valid))}.")
        if not 0 <= self.click_from_gt_prob <= 1:
            raise ConfigError(f"config.objective.click_from_gt_prob={self.click_from_gt_prob}; must be in [0, 1].")
        if self.click_from_gt_prob and self.interaction != "sam2":
            raise ConfigError("config.objective.click_from_gt_prob is SAM 2's option (a batch's click from the "
                              "ground truth); set --config.objective.interaction=sam2 too, or leave it 0.")

    def init(self, rng, batch):
        return self.model.init({"params": rng}, *self.model.init_inputs(1))["params"], {}

    # -- the interactive rounds ------------------------------------------------------------------
    def _rows(self, batch):
        """(R = B*K ground-truth masks (R, H, W) bool, valid (R,), image index (R,))."""
        masks = batch["masks"]
        b, k = masks.shape[:2]
        gt = masks.reshape((b * k,) + masks.shape[2:]) > 0
        present = (jnp.arange(k)[None, :] < batch["num_objects"].reshape(b, 1)).reshape(-1)
        return gt, present & gt.any((-2, -1)), jnp.repeat(jnp.arange(b), k)

    def _first_prompt(self, rng, gt, use_box, box_noise: bool = True):
        """Points (R, S, 2) and labels (R, S) of round 0 in the static layout of S slots."""
        r = gt.shape[0]
        slots = 2 + self.rounds
        k_pt, k_box = jax.random.split(rng)
        point, _ = sample_pixel(k_pt, gt)
        box = mask_box(gt)
        if box_noise:
            box = jitter_box(k_box, box, self.box_noise, self.box_noise_max, gt.shape[-1])
        pts = jnp.zeros((r, slots, 2), jnp.float32)
        labels = jnp.full((r, slots), PAD, jnp.int32)
        box_pts = pts.at[:, 0].set(box[:, :2]).at[:, 1].set(box[:, 2:])
        box_lab = labels.at[:, 0].set(BOX_TL).at[:, 1].set(BOX_BR)
        pt_pts, pt_lab = pts.at[:, 0].set(point), labels.at[:, 0].set(1)
        ub = use_box[:, None]
        return jnp.where(ub[..., None], box_pts, pt_pts), jnp.where(ub, box_lab, pt_lab)

    def _predict(self, params, emb, points, labels, prev, multimask):
        out = self.model.apply({"params": params}, emb, points[:, None], labels[:, None], None, prev,
                               multimask, method=self.model.predict)
        logits, iou = out
        return logits[:, 0], iou[:, 0]   # (R, M, 4h, 4w), (R, M)

    def _upsample(self, logits, hw):
        return jax.image.resize(logits, logits.shape[:-2] + tuple(hw), "bilinear")

    def _losses(self, logits, iou_pred, gt):
        """Per row and output mask: (mask loss, iou mse, actual iou) at full resolution."""
        up = self._upsample(logits.astype(jnp.float32), gt.shape[-2:])
        target = gt[:, None].astype(jnp.float32)
        mask_loss = self.focal_weight * focal_loss(up, target) + self.dice_weight * dice_loss(up, target)
        actual = jax.lax.stop_gradient(mask_iou(up > 0, gt[:, None]))
        err = iou_pred.astype(jnp.float32) - actual
        return mask_loss, (jnp.abs(err) if self.iou_loss == "l1" else err ** 2), actual, up

    def _round_fns(self):
        """(decoder pass, loss) of one round; with ``remat_rounds`` both recompute in the backward pass."""
        if self.remat_rounds:
            return jax.checkpoint(self._predict, static_argnums=(5,)), jax.checkpoint(self._losses)
        return self._predict, self._losses

    def _embed(self, params, images, image_of_row, rng, train):
        if train and self.model.drop_path > 0:  # the encoder's stochastic depth; other draws unchanged
            emb = self.model.apply({"params": params}, images, True, method=self.model.encode_image,
                                   rngs={"dropout": jax.random.fold_in(rng, 0x5A4D)})
        else:
            emb = self.model.apply({"params": params}, images, method=self.model.encode_image)
        return emb[image_of_row]

    def _interact(self, params, images, gt, image_of_row, rng, use_box, box_noise=True, train=True,
                  rounds=None):
        """Runs round 0 and the correction rounds; returns per-round (loss (R,), iou (R,))."""
        rounds = self.rounds if rounds is None else rounds
        emb = self._embed(params, images, image_of_row, rng, train)
        rng, k0 = jax.random.split(rng)
        points, labels = self._first_prompt(k0, gt, use_box, box_noise)
        prev, results = None, []
        predict, losses = self._round_fns()
        ambiguous = ~use_box  # one point: three masks (the paper); a box or several points: one
        for rnd in range(rounds + 1):
            # round 0 needs the single mask and the three from one decoder pass (all four tokens)
            logits, iou_pred = predict(params, emb, points, labels, prev, None if rnd == 0 else False)
            mask_loss, iou_mse, actual, up = losses(logits, iou_pred, gt)
            if rnd == 0:
                m_logits, m_iou_pred, m_loss, m_mse, m_actual, m_up = (
                    x[:, 1:] for x in (logits, iou_pred, mask_loss, iou_mse, actual, up))
                logits, mask_loss, iou_mse, actual, up = (
                    x[:, :1] for x in (logits, mask_loss, iou_mse, actual, up))
            loss, iou, oracle = mask_loss[:, 0] + self.iou_weight * iou_mse[:, 0], actual[:, 0], actual[:, 0]
            logits, up = logits[:, 0], up[:, 0]
            if rnd == 0:
                # training backpropagates the lowest of the three losses; inference takes the
                # mask the IoU head is most confident of
                best = jnp.argmin(m_loss, -1) if train else jnp.argmax(m_iou_pred, -1)
                a = ambiguous
                loss = jnp.where(a, _take(m_loss, best) + self.iou_weight * m_mse.mean(-1), loss)
                iou = jnp.where(a, _take(m_actual, best), iou)
                oracle = jnp.where(a, m_actual.max(-1), oracle)
                logits = jnp.where(a[:, None, None], _take(m_logits, best), logits)
                up = jnp.where(a[:, None, None], _take(m_up, best), up)
            results.append((loss, iou, oracle))
            if rnd == rounds:
                break
            # the next point from the error region of this round's mask
            pred = jax.lax.stop_gradient(up > 0)
            fn, fp = gt & ~pred, pred & ~gt
            rng, k = jax.random.split(rng)
            xy, found = sample_pixel(k, fn | fp)
            xi, yi = xy[:, 0].astype(jnp.int32), xy[:, 1].astype(jnp.int32)
            positive = fn[jnp.arange(gt.shape[0]), yi, xi]
            slot = 1 + rnd + 1   # after a box's two corners, or the first point's slot and a pad
            points = points.at[:, slot].set(xy)
            labels = labels.at[:, slot].set(jnp.where(found, positive.astype(jnp.int32), PAD))
            ambiguous = jnp.zeros_like(ambiguous)
            prev = logits if self.mask_prompt_grad else jax.lax.stop_gradient(logits)
        return results

    # -- SAM 2's interaction (interaction='sam2') ---------------------------------------------------
    def sam2_draws(self, rng, rows: int, h: int, w: int):
        """Every random number one training step of ``interaction='sam2'`` uses, from the
        step's key: ``box`` () (box if < box_prob), ``box_noise`` (R, 4) in [0, 1),
        ``clicks`` (1 + rounds, R, H, W, 2) in [0, 1), ``from_gt`` (rounds,) (the round's click
        from the ground truth if < click_from_gt_prob). The encoder's drop path keeps its own key."""
        k_box, k_noise, k_clicks, k_gt = jax.random.split(rng, 4)
        return {"box": jax.random.uniform(k_box, ()),
                "box_noise": jax.random.uniform(k_noise, (rows, 4)),
                "clicks": jax.random.uniform(k_clicks, (1 + self.rounds, rows, h, w, 2)),
                "from_gt": jax.random.uniform(k_gt, (self.rounds,))}

    @staticmethod
    def sam2_click(gt, pred, noise):
        """SAM 2's ``sample_random_points_from_errors`` (one point per row): gt, pred (R, H, W)
        bool, noise (R, H, W, 2) -> (xy (R, 2) float, label (R,) int32: 1 in a false negative,
        0 in a false positive, 0 on the background when pred is exact)."""
        r, h, w = gt.shape
        fp, fn = ~gt & pred, gt & ~pred
        exact = (gt == pred).all((-2, -1))[:, None, None]
        scores = jnp.stack([noise[..., 0] * (fp | (exact & ~gt)), noise[..., 1] * fn], -1).reshape(r, -1)
        idx = jnp.argmax(scores, -1)
        pix = idx // 2
        return jnp.stack([pix % w, pix // w], -1).astype(jnp.float32), (idx % 2).astype(jnp.int32)

    def _interact_sam2(self, params, emb, gt, draws, box: bool):
        """SAM 2's rounds on the rows' image embeddings for a batch of box (``box=True``) or
        point prompts; per-round (loss (R,), iou (R,), oracle (R,)) as ``_interact``."""
        r, h, w = gt.shape
        if box:   # sam2_utils.sample_box_points on the mask's bounds (sam2.utils.misc.mask_to_box)
            b = mask_box(gt)
            mdx = jnp.minimum((b[:, 2] - b[:, 0]) * self.box_noise, self.box_noise_max)
            mdy = jnp.minimum((b[:, 3] - b[:, 1]) * self.box_noise, self.box_noise_max)
            b = b + (2 * draws["box_noise"] - 1) * jnp.stack([mdx, mdy, mdx, mdy], -1)
            b = jnp.clip(b, 0.0, jnp.array([w - 1, h - 1, w - 1, h - 1], jnp.float32))
            points = b.reshape(r, 2, 2)
            labels = jnp.broadcast_to(jnp.array([BOX_TL, BOX_BR], jnp.int32), (r, 2))
        else:     # the first click: the error of an empty prediction, i.e. the mask
            xy, lab = self.sam2_click(gt, jnp.zeros_like(gt), draws["clicks"][0])
            points, labels = xy[:, None], lab[:, None]
        predict, losses = self._round_fns()
        prev, results = None, []
        for rnd in range(self.rounds + 1):
            multimask = rnd == 0 and not box        # SAM2Base._use_multimask: one point only
            logits, iou_pred = predict(params, emb, points, labels, prev, multimask)
            mask_loss, iou_err, actual, up = losses(logits, iou_pred, gt)
            if multimask:
                best = jnp.argmin(mask_loss, -1)     # the loss backpropagates the lowest focal + dice
                results.append((_take(mask_loss, best) + self.iou_weight * iou_err.mean(-1),
                                _take(actual, best), actual.max(-1)))
                chosen = jnp.argmax(iou_pred, -1)   # _forward_sam_heads: the next prompt's mask
                logits, up = _take(logits, chosen), _take(up, chosen)
            else:
                results.append((mask_loss[:, 0] + self.iou_weight * iou_err[:, 0], actual[:, 0], actual[:, 0]))
                logits, up = logits[:, 0], up[:, 0]
            if rnd == self.rounds:
                break
            pred = jax.lax.stop_gradient(up > 0)
            if self.click_from_gt_prob > 0:
                pred = jnp.where(draws["from_gt"][rnd] < self.click_from_gt_prob, False, pred)
            xy, lab = self.sam2_click(gt, pred, draws["clicks"][rnd + 1])
            points = jnp.concatenate([points, xy[:, None]], 1)
            labels = jnp.concatenate([labels, lab[:, None]], 1)
            prev = logits if self.mask_prompt_grad else jax.lax.stop_gradient(logits)
        return results

    def loss(self, params, extra, batch, rng, step):
        gt, valid, rows = self._rows(batch)
        if self.interaction == "sam2":
            draws = self.sam2_draws(jax.random.fold_in(rng, 2), gt.shape[0], *gt.shape[-2:])
            emb = self._embed(params, batch["image"], rows, rng, True)   # once, outside the branches
            results = jax.lax.cond(draws["box"] < self.box_prob,
                                   lambda: self._interact_sam2(params, emb, gt, draws, True),
                                   lambda: self._interact_sam2(params, emb, gt, draws, False))
        else:
            k_box, k_rest = jax.random.split(rng)
            use_box = jax.random.uniform(k_box, valid.shape) < self.box_prob
            results = self._interact(params, batch["image"], gt, rows, k_rest, use_box)
        w = valid.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        losses = jnp.stack([(r[0] * w).sum() / n for r in results])
        ious = [(r[1] * w).sum() / n for r in results]
        metrics = {"miou_round0": ious[0], f"miou_round{len(ious) - 1}": ious[-1],
                   "loss_round0": losses[0], "instances": w.sum()}
        return (losses.sum() if self.round_reduction == "sum" else losses.mean()), (metrics, extra)

    def eval_metrics(self, params, extra, batch, rng):
        gt, valid, rows = self._rows(batch)
        b = batch["image"].shape[0]
        w = valid.astype(jnp.float32).reshape(b, -1)
        per_image = lambda iou: (iou.reshape(b, -1) * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)  # noqa: E731
        k1, k2 = jax.random.split(rng)
        box = self._interact(params, batch["image"], gt, rows, k1, jnp.ones(valid.shape, bool),
                             box_noise=False, train=False, rounds=0)
        pts = self._interact(params, batch["image"], gt, rows, k2, jnp.zeros(valid.shape, bool), train=False,
                             rounds=min(2, self.rounds))
        out = {"miou_box": per_image(box[0][1]), "miou_1pt": per_image(pts[0][1]),
               "miou_1pt_oracle": per_image(pts[0][2])}
        if len(pts) == 3:
            out["miou_3pt"] = per_image(pts[2][1])
        return out

    def features(self, params, extra, images):
        emb = self.model.apply({"params": params}, images, method=self.model.encode_image)
        return emb.mean(axis=(1, 2))

    def sam_model(self):
        """``(model, params_of, point_slots)`` for prompting outside training (AMG, the
        ``amg_recall`` eval, ``launch/segment.py``): the SAM module, ``params_of(params,
        extra)`` -> its params, and the number of point slots of the training layout (pad a
        prompt with label -10 points up to it, as training does)."""
        return self.model, (lambda params, extra: params), 2 + self.rounds


def make(config) -> SAMObjective:
    return SAMObjective(config)
