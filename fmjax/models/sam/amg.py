"""SAM's automatic mask generation (AMG): masks for a whole image from a grid of point prompts.

A transcription of the logic of ``segment_anything``'s ``SamAutomaticMaskGenerator``
(``automatic_mask_generator.py`` and ``utils/amg.py``) for the one-crop case:

1. a regular grid of ``points_per_side`` x ``points_per_side`` points at the centres of equal
   cells (``build_point_grid``), scaled to the model's input frame;
2. the points go through the mask decoder ``points_per_batch`` at a time, each as its own
   single-point prompt with the three ambiguity-aware masks (``multimask_output=True``); one
   jitted function per generator runs the decoder, upsamples the low-res logits bilinearly
   to the output size (as the ``sam`` objective compares them with the ground truth),
   computes the stability scores, thresholds the masks and takes their areas and boxes;
3. on the host (numpy): masks with a predicted IoU <= ``pred_iou_thresh`` go, then masks with
   a stability score < ``stability_score_thresh`` (the IoU of the mask binarised at
   ``mask_threshold + offset`` with the one at ``mask_threshold - offset``), then empty masks
   (a threshold <= 0 filters nothing, as in segment-anything);
4. greedy box NMS (``box_nms_thresh``) with the predicted IoU as the score, over all the
   image's points; the survivors come out best-first.

Each mask is a dict (segment-anything's record, ``output_mode='binary_mask'``):
``segmentation`` bool (H, W); ``area`` int (pixels); ``bbox`` [x, y, w, h] (x0, y0 the
top-left pixel, w = x1 - x0 and h = y1 - y0 with x1, y1 the last pixel column / row, as
segment-anything writes it); ``predicted_iou``; ``stability_score``; ``point_coords``
[[x, y]] (the prompt, in output pixels).

Differences from segment-anything, on purpose:
- no crops (``crop_n_layers`` 0): no multi-scale crop layers, crop NMS or crop-edge filter,
  and no ``min_mask_region_area`` post-processing (holes / islands, which needs OpenCV);
- NMS IoUs use pixel-edge boxes (x1 + 1, y1 + 1): the exact overlap of pixel boxes, where
  torchvision's ``batched_nms`` on segment-anything's inclusive boxes counts a box of one
  pixel column as empty;
- an empty mask is dropped and its stability score is 0 (segment-anything divides 0 by 0).

Prompt layout: ``point_slots`` > 0 pads every prompt with padding points (label ``PAD_LABEL``,
-10, the prompt encoder's zero token) up to that many points, the static layout the ``sam``
objective trains with (its ``sam_model()`` hook says how many); 0 gives the plain
segment-anything layout (a converted checkpoint).

The model is anything with ``encode_image(images)`` and ``predict(embeddings, points, labels,
boxes, masks, multimask_output)`` methods run through ``model.apply({'params': params}, ...,
method=...)`` (``fmjax.models.sam.SAM``).

Used by the ``amg_recall`` eval (``fmjax/evals/amg_recall.py``) and ``launch/segment.py
--auto``; tests in ``tests/objectives/test_sam_amg.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PAD_LABEL = -10   # the prompt encoder's padding point (a zero token; transformers' convention)


# -- pieces (numpy unless said otherwise) ---------------------------------------------------
def build_point_grid(points_per_side: int) -> np.ndarray:
    """(n * n, 2) xy in [0, 1]: the centres of an n x n grid of equal cells, x fastest."""
    n = int(points_per_side)
    offset = 1.0 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(logits, mask_threshold: float = 0.0, offset: float = 1.0):
    """(..., H, W) logits -> (...,): |logits > t + offset| / |logits > t - offset| (the IoU of
    the two binarisations, as the first is inside the second); 0 where both are empty.
    NumPy or JAX arrays (the result is of the same kind)."""
    xp = jnp if isinstance(logits, jax.Array) else np
    inter = (logits > mask_threshold + offset).sum(axis=(-2, -1), dtype=xp.int32)
    union = (logits > mask_threshold - offset).sum(axis=(-2, -1), dtype=xp.int32)
    return xp.where(union > 0, inter / xp.maximum(union, 1), 0.0).astype(xp.float32)


def masks_to_boxes(masks):
    """(..., H, W) bool -> (..., 4) int32 x0, y0, x1, y1 (the first / last pixel column and row;
    zeros for an empty mask). NumPy or JAX arrays."""
    xp = jnp if isinstance(masks, jax.Array) else np
    h, w = masks.shape[-2:]
    cols, rows = masks.any(axis=-2), masks.any(axis=-1)
    xs, ys = xp.arange(w), xp.arange(h)
    x0 = xp.where(cols, xs, w).min(axis=-1)
    x1 = xp.where(cols, xs, -1).max(axis=-1)
    y0 = xp.where(rows, ys, h).min(axis=-1)
    y1 = xp.where(rows, ys, -1).max(axis=-1)
    box = xp.stack([x0, y0, x1, y1], axis=-1)
    return xp.where(cols.any(axis=-1)[..., None], box, 0).astype(xp.int32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) x0, y0, x1, y1 (continuous corners) -> (N, M) IoU (0 where the union is
    empty)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression (torchvision's ``nms``): the indices of the kept boxes,
    by decreasing score (ties: the earlier box first); a box goes when its IoU with a kept,
    higher-scoring box is > ``iou_threshold``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if not len(order):
        return order.astype(np.int64)
    iou = box_iou(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, np.int64)


def pad_prompt(points, labels, slots: int) -> Tuple[np.ndarray, np.ndarray]:
    """(..., N, 2) points, (..., N) labels -> padded with ``PAD_LABEL`` points up to ``slots``
    points (unchanged when N >= slots)."""
    points, labels = np.asarray(points, np.float32), np.asarray(labels, np.int32)
    extra = int(slots) - points.shape[-2]
    if extra <= 0:
        return points, labels
    points = np.concatenate([points, np.zeros(points.shape[:-2] + (extra, 2), np.float32)], axis=-2)
    labels = np.concatenate([labels, np.full(labels.shape[:-1] + (extra,), PAD_LABEL, np.int32)], -1)
    return points, labels


def mask_record(mask: np.ndarray, box, iou: float, stability: float, point) -> dict:
    """One AMG / prompt result as segment-anything's record (see the module docstring)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return dict(segmentation=np.asarray(mask, bool), area=int(np.asarray(mask).sum()),
                bbox=[x0, y0, x1 - x0, y1 - y0], predicted_iou=float(iou),
                stability_score=float(stability),
                point_coords=[[float(point[0]), float(point[1])]] if point is not None else None)


# -- the generator -------------------------------------------------------------------------
class AutomaticMaskGenerator:
    """See the module docstring. Defaults are segment-anything's (chosen for its ViT-H).

    ``generate(params, image)``: one preprocessed (H, W, C) image (normalised, the model's
    input size) -> a list of mask dicts. ``generate_batch(params, images)`` /
    ``from_embeddings(params, embeddings, input_size)``: a batch -> a list per image.
    ``output_size`` (H, W): the frame the masks, boxes and points are given in (default the
    input size; ``launch/segment.py`` gives the original image's).
    """

    def __init__(self, model, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
                 mask_threshold: float = 0.0, point_slots: int = 0):
        if int(points_per_side) < 1 or int(points_per_batch) < 1:
            raise ValueError(f"points_per_side={points_per_side} and points_per_batch={points_per_batch} "
                             "must be >= 1.")
        self.model = model
        self.points_per_side, self.points_per_batch = int(points_per_side), int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.mask_threshold = float(mask_threshold)
        self.point_slots = int(point_slots)
        self.point_grid = build_point_grid(self.points_per_side)
        self._encode = jax.jit(lambda params, images: model.apply(
            {"params": params}, images, method=model.encode_image))
        self._batch = jax.jit(self._run_batch, static_argnums=(4,))

    def _run_batch(self, params, emb, points, labels, output_size):
        """The jitted decoder pass: (B, P, S, 2) / (B, P, S) prompts -> per mask (B, P*M, ...):
        bool masks at ``output_size``, predicted IoU, stability score, box, area."""
        logits, iou = self.model.apply({"params": params}, emb, points, labels, None, None, True,
                                       method=self.model.predict)
        b, p, m = logits.shape[:3]
        logits = jax.image.resize(logits.astype(jnp.float32), (b, p, m) + tuple(output_size),
                                  "bilinear")
        logits = logits.reshape((b, p * m) + tuple(output_size))
        stability = stability_score(logits, self.mask_threshold, self.stability_score_offset)
        masks = logits > self.mask_threshold
        return (masks, iou.reshape(b, p * m).astype(jnp.float32), stability, masks_to_boxes(masks),
                masks.sum(axis=(-2, -1), dtype=jnp.int32))

    def encode(self, params, images):
        return self._encode(params, images)

    def generate(self, params, image, output_size: Optional[Sequence[int]] = None) -> list:
        return self.generate_batch(params, np.asarray(image)[None], output_size)[0]

    def generate_batch(self, params, images, output_size: Optional[Sequence[int]] = None) -> list:
        images = jnp.asarray(images)
        emb = self.encode(params, images)
        return self.from_embeddings(params, emb, images.shape[1:3], output_size)

    def from_embeddings(self, params, emb, input_size: Sequence[int],
                        output_size: Optional[Sequence[int]] = None, gather=None) -> list:
        """Masks of each image of ``emb`` (B, h, w, C); ``input_size`` (H, W): the model's input
        frame the grid points are scaled to; ``gather``: applied to every device output before
        it is read (e.g. ``process_allgather`` on several processes)."""
        in_h, in_w = (int(s) for s in input_size)
        out_h, out_w = (int(s) for s in (output_size or input_size))
        b = emb.shape[0]
        grid = self.point_grid
        n, per = len(grid), self.points_per_batch
        collected = [dict(masks=[], iou=[], stability=[], boxes=[], areas=[], points=[]) for _ in range(b)]
        for start in range(0, n, per):
            chunk = grid[start:start + per]
            count = len(chunk)
            if count < per:  # a static shape: the last batch repeats its last point (dropped below)
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], per - count, axis=0)])
            pts = (chunk * np.array([in_w, in_h], np.float64)).astype(np.float32)
            points, labels = pad_prompt(pts[:, None, :], np.ones((per, 1), np.int32), self.point_slots)
            points = np.broadcast_to(points[None], (b,) + points.shape)
            labels = np.broadcast_to(labels[None], (b,) + labels.shape)
            out = self._batch(params, emb, jnp.asarray(points), jnp.asarray(labels), (out_h, out_w))
            if gather is not None:
                out = tuple(gather(x) for x in out)
            masks, iou, stab, boxes, areas = (np.asarray(x) for x in out)
            m = masks.shape[1] // per
            valid = np.repeat(np.arange(per) < count, m)
            point_xy = np.repeat(chunk * np.array([out_w, out_h]), m, axis=0)
            for i in range(b):
                keep = valid & (areas[i] > 0)
                if self.pred_iou_thresh > 0:
                    keep &= iou[i] > self.pred_iou_thresh
                if self.stability_score_thresh > 0:
                    keep &= stab[i] >= self.stability_score_thresh
                c = collected[i]
                c["masks"].append(masks[i][keep])
                c["iou"].append(iou[i][keep])
                c["stability"].append(stab[i][keep])
                c["boxes"].append(boxes[i][keep])
                c["areas"].append(areas[i][keep])
                c["points"].append(point_xy[keep])
        results = []
        for c in collected:
            data = {k: np.concatenate(v) for k, v in c.items()}
            keep = nms(data["boxes"] + np.array([0, 0, 1, 1]), data["iou"], self.box_nms_thresh)
            results.append([mask_record(data["masks"][j], data["boxes"][j], data["iou"][j],
                                        data["stability"][j], data["points"][j]) for j in keep])
        return results


# -- pictures ------------------------------------------------------------------------------
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]],
                   np.uint8)


def overlay_masks(image: np.ndarray, masks, alpha: float = 0.5, colours=None) -> np.ndarray:
    """uint8 (H, W, 3) picture with each bool (H, W) mask of ``masks`` blended in its own
    colour (``colours[i]`` RGB, default ``PALETTE[i % 20]``) and its boundary pixels in that
    colour, the largest first so that small masks stay visible."""
    out = np.asarray(image, np.float32).copy()
    masks = [np.asarray(m, bool) for m in masks]
    for i in sorted(range(len(masks)), key=lambda j: -int(masks[j].sum())):
        m = masks[i]
        colour = np.asarray(PALETTE[i % len(PALETTE)] if colours is None else colours[i], np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        inner = np.pad(m, 1)   # a pixel is inside when its 4 neighbours are in the mask too
        inner = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        out[m & ~inner] = colour
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)
