"""The ``amg_recall`` eval type: how many ground-truth instances SAM's automatic mask
generation finds (``fmjax/models/sam/amg.py``).

For each of the first ``examples`` images of ``split`` the objective's SAM (its ``sam_model()``
hook: ``fmjax/objectives/sam.py``) runs AMG: a ``points_per_side`` grid of single-point
prompts, ``points_per_batch`` at a time, three masks each, filtered by the predicted IoU
(``pred_iou_thresh``), the stability score (``stability_score_thresh``, offset
``stability_score_offset``) and box NMS (``box_nms_thresh``). The ground truth is the batch's
``masks`` (B, K, H, W) of the first ``num_objects`` instances with a nonzero area (the shapes'
visible instance masks); the eval pipeline must keep both keys and give masks at the image's
size. Logged:

  recall@<match_iou>  instances covered by some generated mask at IoU >= match_iou (default
                      0.5), over all instances of the split (``eval/<name>_recall@0.5``)
  best_iou            the mean over instances of the best IoU of any generated mask
  precision@<match_iou>  generated masks that cover some instance at IoU >= match_iou, over all
                      generated masks (the rest are background regions, parts or unions)
  masks_per_image     the mean number of generated masks per image
  instances           the number of ground-truth instances

``pictures`` (default 8; 0: none) writes ``DIR/images/<name>_masks_<step>.png``: the first
images, their instances and their automatic masks, one row each.

The defaults suit the 64 px shapes and the small CPU SAM of configs/sam.py: 16 points per side
(a point every 4 px; 32 found no more instances and took 6x as long), predicted IoU > 0.3
and stability >= 0.5 at a logit offset of 0.25. segment-anything's defaults (32 points, 0.88,
0.95 at offset 1.0, for the released ViT-H) keep nothing of a briefly trained small SAM: its
IoU head underestimates (predictions above 0.3 had a true IoU of 0.83 on average after 250
steps) and its logits rarely pass +-1. A 0.3 filter keeps recall but not precision: ~20 masks
per scene of <= 3 shapes at any step (precision 0.28); configs/sam.py sets 0.7 (precision ~0.85,
recall ~0.96 from step 500 on; its docstring has the sweep). On the 2-core CPU the eval takes
~4 s for 64 images (~6 s with compilation).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.errors import ConfigError
from fmjax.evals import common, registry
from fmjax.evals.images import image_grid, model_inputs_to_display
from fmjax.models.sam import amg

DEFAULTS = dict(points_per_side=16, points_per_batch=64, pred_iou_thresh=0.3, stability_score_thresh=0.5,
                stability_score_offset=0.25, box_nms_thresh=0.7, match_iou=0.5, pictures=8)
AMG_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "box_nms_thresh")


def mask_ious(pred_masks, gt_masks) -> np.ndarray:
    """(N, H, W) generated and (G, H, W) ground-truth bool masks -> (G, N) IoUs."""
    gt = np.asarray(gt_masks, bool).reshape(len(gt_masks), -1).astype(np.float32)
    if not len(pred_masks) or not len(gt):
        return np.zeros((len(gt), len(pred_masks)), np.float32)
    pred = np.asarray(pred_masks, bool).reshape(len(pred_masks), -1).astype(np.float32)
    inter = gt @ pred.T
    union = gt.sum(1)[:, None] + pred.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1.0)


def match_instances(pred_masks, gt_masks) -> np.ndarray:
    """(N, H, W) generated and (G, H, W) ground-truth bool masks -> (G,) the best IoU of each
    ground-truth mask with any generated one (0 without generated masks)."""
    iou = mask_ious(pred_masks, gt_masks)
    return iou.max(axis=1) if iou.shape[1] else np.zeros(len(iou), np.float32)


@registry.register("amg_recall")
class AmgRecallEvaluator(common.Evaluator):
    """See the module docstring."""

    fields = tuple(DEFAULTS)
    requires = {"sam_model": "promptable SAM model (the sam_model hook of the 'sam' objective)"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        for key in ("points_per_side", "points_per_batch"):
            if key in ev:
                common.check_int(where, key, ev[key], 1)
        if "pictures" in ev:
            common.check_int(where, "pictures", ev["pictures"], 0, " (0: none)")
        for key in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if key in ev:
                common.check_fraction(where, key, ev[key])
        if "match_iou" in ev:
            common.check_fraction(where, "match_iou", ev["match_iou"], low_open=True)
        if "stability_score_offset" in ev:
            common.check_number(where, "stability_score_offset", ev["stability_score_offset"])

    def option(self, key):
        return self.ev.get(key, DEFAULTS[key])

    def generator(self):
        """The ``AutomaticMaskGenerator`` of this entry (built once: it holds the jitted step)."""
        if getattr(self, "_generator", None) is None:
            model, self._params_of, slots = self.ctx.objective.sam_model()
            self._generator = amg.AutomaticMaskGenerator(
                model, point_slots=slots, **{k: self.option(k) for k in AMG_KEYS})
        return self._generator

    def run(self, state, step, writer):
        gen = self.generator()
        params = self._params_of(state.params, state.extra)
        multi = jax.process_count() > 1
        gather = (lambda x: multihost_utils.process_allgather(x, tiled=True)) if multi else None
        match_iou = float(self.option("match_iou"))
        best, num_masks, num_images, matched = [], 0, 0, 0
        rows = [[], [], []]
        pictures = int(self.option("pictures"))
        with self.ctx.scope():
            for batch, valid in self.batches():
                missing = [k for k in ("masks", "num_objects") if k not in batch]
                if missing:
                    raise ConfigError(f"{self.where}: the eval pipeline ({self.pp_key}) gives no {missing}; "
                                      "amg_recall needs the instance masks: keep('image', 'masks', "
                                      "'num_objects').")
                images = batch["image"]
                if tuple(batch["masks"].shape[-2:]) != tuple(images.shape[1:3]):
                    raise ConfigError(f"{self.where}: masks {tuple(batch['masks'].shape[-2:])} differ from "
                                      f"the images {tuple(images.shape[1:3])}; resize them together "
                                      f"in {self.pp_key}.")
                emb = gen.encode(params, images)
                results = gen.from_embeddings(params, emb, images.shape[1:3], gather=gather)
                host = lambda x: np.asarray(gather(x) if multi else x)  # noqa: E731
                gt_all, counts = host(batch["masks"]) > 0, host(batch["num_objects"])
                valid = host(valid) if multi else np.asarray(valid)
                pics = host(images) if pictures and len(rows[0]) < pictures else None
                for i in np.flatnonzero(valid):
                    gt = gt_all[i][:int(counts[i])]
                    gt = gt[gt.any(axis=(-2, -1))]
                    pred = [r["segmentation"] for r in results[i]]
                    iou = mask_ious(pred, gt)
                    best.append(iou.max(axis=1) if iou.shape[1] else np.zeros(len(gt), np.float32))
                    matched += int((iou >= match_iou).any(axis=0).sum())
                    num_masks += len(pred)
                    num_images += 1
                    if pics is not None and len(rows[0]) < pictures:
                        pic = self._display(pics[i])
                        rows[0].append(pic)
                        rows[1].append(amg.overlay_masks(pic, gt))
                        rows[2].append(amg.overlay_masks(pic, pred))
        best = np.concatenate(best) if best else np.zeros(0, np.float32)
        if rows[0] and writer is not None and jax.process_index() == 0:
            writer.write_image(step, f"{self.name}_masks", image_grid([np.stack(r) for r in rows]))
        return {f"recall@{match_iou:g}": float((best >= match_iou).mean()) if len(best) else 0.0,
                "best_iou": float(best.mean()) if len(best) else 0.0,
                f"precision@{match_iou:g}": matched / num_masks if num_masks else 0.0,
                "masks_per_image": num_masks / max(num_images, 1), "instances": float(len(best))}

    def _display(self, image) -> np.ndarray:
        """uint8 (H, W, 3) of a model input: the pipeline's ``normalize`` undone (else min-max)."""
        return np.round(model_inputs_to_display(self.transform, image) * 255).astype(np.uint8)
