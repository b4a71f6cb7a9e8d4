"""The ``box_ap`` eval type: open-vocabulary detection (the ``owl`` objective's ``detector()``
hook, ``fmjax/objectives/owl.py``) on a split with instance masks and attributes.

The vocabulary is every (shape, colour) phrase of the objective, the ones its training left out
(``objective.exclude``) included; the text tower embeds it once per eval. Ground truth: the
first ``num_objects`` instances with a visible mask, their boxes the masks' bounds, their phrase
from ``shapes`` / ``colors``. Predictions: every patch x phrase with its sigmoid score, the
``max_detections`` (default 100) highest of each image, no NMS (set prediction: duplicates are
false positives, as DETR / OWL-ViT are scored). Logged:

  ap50            COCO-style AP at IoU ``match_iou`` (default 0.5; 101-point interpolated
                  precision; detections greedily matched by score) averaged over the phrases
                  that have ground truth in the split
  unseen_ap50     the same over the left-out phrases only (when the split has any: the
                  shapes' ``heldout`` split)
  compositional_acc  ARO-style binding: over pairs of instances (A, B) of one image that differ
                  in shape and colour, where no instance has A's shape in B's colour, how often
                  A's phrase scores higher (best patch) than the phrase with A's shape and B's
                  colour
  grounding_acc   over instances whose phrase is unique in their image: the top box of their
                  phrase covers them at IoU >= ``match_iou``
  relation_acc    referring expressions with a spatial relation (``relations`` > 0): over ordered
                  pairs (A, B) of instances whose phrases are unique in their image and whose box
                  centres are clearly left / right of or above / below each other (the dominant
                  axis ahead of the other by ``relation_margin`` of the image side), how often
                  the true phrase 'a photo of a <A> on the left of a <B>.' (the objective's
                  ``relation_template``; the shapes captions' words) scores higher (best patch)
                  than the same phrase with the opposite relation: ARO's relation swap
  relation_grounding_acc  over the same pairs: the top box of the true phrase covers A (its
                  subject) at IoU >= ``match_iou``, not B
  grounded_miou   with ``sam_workdir`` (a configs/sam.py run): the mean IoU of the mask SAM makes
                  from that top box with the instance's mask (Grounded-SAM;
                  ``fmjax/train/segment.py`` Segmenter), and grounded_iou@0.5 the fraction at IoU >= 0.5
  instances       ground-truth instances scored (the other keys are logged only where they
                  are defined: e.g. no compositional_acc without a pair to swap)

``pictures`` (default 8; 0: none) writes ``DIR/images/<name>_boxes_<step>.png``: per image the
ground-truth boxes, then the top box of each instance's phrase (and, with ``sam_workdir``, its
mask), in the instance's colour.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.evals import common, registry
from fmjax.evals.images import image_grid, model_inputs_to_display

DEFAULTS = dict(max_detections=100, match_iou=0.5, pictures=8, sam_workdir="", relations=2,
                relation_margin=0.1)
REQUIRED_KEYS = ("masks", "num_objects", "shapes", "colors")


def box_iou(a, b) -> np.ndarray:
    """(N, 4), (M, 4) xyxy -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def average_precision(scores, tps, num_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections (``scores``, ``tps`` True for a match)
    against ``num_gt`` ground-truth boxes."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.asarray(tps, bool)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def match_detections(det_boxes, det_scores, gt_boxes, iou_thresh: float) -> np.ndarray:
    """Greedy by score: each detection is a true positive if it overlaps a not yet matched
    ground-truth box at IoU >= ``iou_thresh`` (the best such one). Returns (D,) bool."""
    tp = np.zeros(len(det_boxes), bool)
    if not len(gt_boxes) or not len(det_boxes):
        return tp
    iou = box_iou(det_boxes, gt_boxes)
    used = np.zeros(len(gt_boxes), bool)
    for d in np.argsort(-np.asarray(det_scores), kind="stable"):
        cand = np.where(used, -1.0, iou[d])
        g = int(np.argmax(cand))
        if cand[g] >= iou_thresh:
            used[g], tp[d] = True, True
    return tp


def spatial_relation(a, b, margin: float):
    """Where box ``a`` (xyxy, y down) lies relative to box ``b``, from their centres: an index of
    ``fmjax.objectives.owl.RELATIONS`` (0 left of, 1 right of, 2 above, 3 below) by the dominant
    axis, as the shapes captions decide it (``owl.spatial_relation``, which the objective's
    relation queries use too); None when the two axes differ by less than ``margin``."""
    from fmjax.objectives.owl import spatial_relation as relation
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel, clear = relation((a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2, margin)
    return int(rel) if clear else None


def xyxy(cxcywh) -> np.ndarray:
    c = np.asarray(cxcywh, np.float64)
    return np.concatenate([c[..., :2] - c[..., 2:] / 2, c[..., :2] + c[..., 2:] / 2], -1)


class _Tally:
    """Per-phrase detections and counts, and the instance-level accuracies, over a split."""

    def __init__(self, num_phrases: int, iou_thresh: float, max_det: int):
        self.det = [([], []) for _ in range(num_phrases)]
        self.num_gt = np.zeros(num_phrases, np.int64)
        self.iou, self.max_det = iou_thresh, max_det
        self.comp, self.ground, self.instances = [], [], 0

    def add(self, scores, boxes, gt_boxes, gt_phrase, swaps):
        """One image: scores (N, Q), boxes (N, 4) xyxy; its instances' boxes / phrase indices;
        ``swaps`` [(true phrase, swapped phrase)]. Returns the top patch of each instance."""
        n, q = scores.shape
        flat = scores.ravel()
        keep = np.argsort(-flat, kind="stable")[:self.max_det]
        patch, phrase = np.unravel_index(keep, (n, q))
        for p in np.unique(gt_phrase):
            sel = phrase == p
            gts = gt_boxes[gt_phrase == p]
            self.num_gt[p] += len(gts)
            tp = match_detections(boxes[patch[sel]], flat[keep[sel]], gts, self.iou)
            self.det[p][0].extend(flat[keep[sel]].tolist())
            self.det[p][1].extend(tp.tolist())
        for p in np.setdiff1d(np.unique(phrase), gt_phrase):   # detections of absent phrases: false
            sel = phrase == p
            self.det[p][0].extend(flat[keep[sel]].tolist())
            self.det[p][1].extend([False] * int(sel.sum()))
        best = scores.max(0)
        for true, swapped in swaps:
            self.comp.append(best[true] > best[swapped])
        top = scores[:, gt_phrase].argmax(0)                  # (K,) the top patch of each phrase
        counts = {p: int((gt_phrase == p).sum()) for p in gt_phrase}
        for k, p in enumerate(gt_phrase):
            if counts[p] == 1:
                self.ground.append(box_iou(boxes[top[k]], gt_boxes[k])[0, 0] >= self.iou)
        self.instances += len(gt_phrase)
        return top

    def ap(self, phrases) -> float:
        vals = [average_precision(*self.det[p], self.num_gt[p]) for p in phrases if self.num_gt[p] > 0]
        return float(np.mean(vals)) if vals else float("nan")


def _relation_pairs(i, ks, shapes, colors, boxes, limit, margin):
    """Up to ``limit`` ordered pairs (A, B) of image ``i``'s instances ``ks`` (boxes ``boxes``, in
    ``ks`` order) whose (shape, colour) phrases are unique in the image and whose relation is
    clear: ``(i, A's box, (A, relation, B), (A, opposite relation, B))``."""
    from fmjax.objectives.owl import OPPOSITE_RELATION
    phrases = [(int(shapes[k]), int(colors[k])) for k in ks]
    unique = [j for j, p in enumerate(phrases) if phrases.count(p) == 1]
    out = []
    for a in unique:
        for b in unique:
            if a == b or len(out) >= limit:
                continue
            rel = spatial_relation(boxes[a], boxes[b], margin)
            if rel is not None:
                out.append((i, boxes[a], (phrases[a], rel, phrases[b]),
                            (phrases[a], OPPOSITE_RELATION[rel], phrases[b])))
    return out


@registry.register("box_ap")
class BoxAPEvaluator(common.Evaluator):
    """See the module docstring."""

    fields = tuple(DEFAULTS)
    requires = {"detector": "open-vocabulary detector (the detector hook of the 'owl' objective)"}

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "max_detections" in ev:
            common.check_int(where, "max_detections", ev["max_detections"], 1)
        if "pictures" in ev:
            common.check_int(where, "pictures", ev["pictures"], 0, " (0: none)")
        if "match_iou" in ev:
            common.check_fraction(where, "match_iou", ev["match_iou"], low_open=True)
        if "relations" in ev:
            common.check_int(where, "relations", ev["relations"], 0, " (pairs per image; 0: none)")
        if "relation_margin" in ev:
            common.check_fraction(where, "relation_margin", ev["relation_margin"])
        if ev.get("sam_workdir"):
            common.check_str(where, "sam_workdir", ev["sam_workdir"])
            from fmjax.train import files
            if not files.isdir(files.resolve(ev["sam_workdir"])):
                raise ConfigError(f"{where}.sam_workdir={ev['sam_workdir']!r}: no such directory; give a "
                                  "workdir of launch/train.py --config=configs/sam.py (or '' for none).")

    def option(self, key):
        return self.ev.get(key, DEFAULTS[key])

    def _setup(self):
        if getattr(self, "_fns", None) is None:
            model, self._params_of = self.ctx.objective.detector()
            self._fns = (jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_queries)),
                         jax.jit(lambda p, x, q: model.apply({"params": p}, x, q, method=model.detect)))
            self._segmenter = None
            if self.option("sam_workdir"):
                from fmjax.train.segment import Segmenter
                devices = list(np.asarray(self.ctx.mesh.devices).flat) if self.ctx.mesh is not None else None
                self._segmenter = Segmenter(self.option("sam_workdir"), devices=devices,
                                            flag=f"{self.where}.sam_workdir")
        return self._fns

    def run(self, state, step, writer):
        queries_fn, detect_fn = self._setup()
        obj = self.ctx.objective
        params = self._params_of(state.params, state.extra)
        pairs = obj.vocabulary(include_excluded=True)
        index = {p: i for i, p in enumerate(pairs)}
        unseen = [index[p] for p in sorted(obj.exclude) if p in index]
        tally = _Tally(len(pairs), float(self.option("match_iou")), int(self.option("max_detections")))
        pictures, rows = int(self.option("pictures")), [[], [], []]
        grounded = []
        relations, margin = int(self.option("relations")), float(self.option("relation_margin"))
        rel_acc, rel_ground = [], []
        with self.ctx.scope():
            q = queries_fn(params, jnp.asarray(obj.tokens(pairs)))
            for batch, valid in self.batches():
                missing = [k for k in REQUIRED_KEYS if k not in batch]
                if missing:
                    raise ConfigError(f"{self.where}: the eval pipeline ({self.pp_key}) gives no {missing}; "
                                      "box_ap needs keep('image', 'masks', 'num_objects', 'shapes', 'colors').")
                out = detect_fn(params, batch["image"], q)
                scores = np.asarray(jax.nn.sigmoid(out["logits"]), np.float64)
                boxes = xyxy(np.asarray(out["boxes"]))
                gt_boxes_all = xyxy(np.asarray(obj.targets(batch)[0]))
                masks = np.asarray(batch["masks"]) > 0
                counts, shp, col = (np.asarray(batch[k]) for k in ("num_objects", "shapes", "colors"))
                images = None
                if self._segmenter is not None or (pictures and len(rows[0]) < pictures):
                    images = self._display(np.asarray(batch["image"]))
                pairs_of_batch = []   # (image, A's box, (A, relation, B), (A, opposite, B))
                for i in np.flatnonzero(np.asarray(valid)):
                    ks = [k for k in range(int(counts[i])) if masks[i, k].any() and (shp[i, k], col[i, k]) in index]
                    if not ks:
                        continue
                    phrase = np.array([index[(shp[i, k], col[i, k])] for k in ks])
                    present = {(shp[i, k], col[i, k]) for k in ks}
                    swaps = [(index[(shp[i, a], col[i, a])], index[(shp[i, a], col[i, b])])
                             for a in ks for b in ks
                             if shp[i, a] != shp[i, b] and col[i, a] != col[i, b]
                             and (shp[i, a], col[i, b]) not in present and (shp[i, a], col[i, b]) in index]
                    gtb = gt_boxes_all[i, ks]
                    if relations:
                        pairs_of_batch += _relation_pairs(i, ks, shp[i], col[i], gtb, relations, margin)
                    top = tally.add(scores[i], boxes[i], gtb, phrase, swaps)
                    pred_masks = None
                    if self._segmenter is not None:
                        h, w = masks.shape[-2:]
                        px = boxes[i, top] * np.array([w, h, w, h]) - np.array([0, 0, 1, 1])
                        px = np.clip(px, 0, np.array([w - 1, h - 1, w - 1, h - 1]))
                        pred_masks = self._segmenter.masks(images[i:i + 1], px[None])[0]
                        for k, pm in zip(ks, pred_masks):
                            gt = masks[i, k]
                            grounded.append((pm & gt).sum() / max((pm | gt).sum(), 1))
                    if pictures and len(rows[0]) < pictures:
                        self._picture(rows, images[i], gtb, boxes[i, top], col[i, ks], pred_masks)
                if pairs_of_batch:
                    self._score_relations(params, batch["image"], pairs_of_batch, rel_acc, rel_ground)
        res = {"instances": float(tally.instances)}   # the others only where defined
        if tally.instances:
            res["ap50"] = tally.ap(range(len(pairs)))
        if tally.comp:
            res["compositional_acc"] = float(np.mean(tally.comp))
        if tally.ground:
            res["grounding_acc"] = float(np.mean(tally.ground))
        if any(tally.num_gt[p] for p in unseen):
            res["unseen_ap50"] = tally.ap(unseen)
        if rel_acc:
            res["relation_acc"] = float(np.mean(rel_acc))
            res["relation_grounding_acc"] = float(np.mean(rel_ground))
        if grounded:
            res["grounded_miou"] = float(np.mean(grounded))
            res["grounded_iou@0.5"] = float(np.mean(np.asarray(grounded) >= 0.5))
        if rows[0] and writer is not None and jax.process_index() == 0:
            writer.write_image(step, f"{self.name}_boxes", image_grid([np.stack(r) for r in rows]))
        return res

    def _score_relations(self, params, images, pairs, acc, ground):
        """Embeds each pair's true and swapped phrase (padded to a multiple of 16 queries, so
        batches share compiled programs) and scores them on the batch's images."""
        queries_fn, detect_fn = self._setup()
        triples = [t for _, _, true, false in pairs for t in (true, false)]
        tokens = self.ctx.objective.relation_tokens(triples)
        rows = -(-len(triples) // 16) * 16
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - len(triples), 0)])
        out = detect_fn(params, images, queries_fn(params, jnp.asarray(tokens)))
        logits = np.asarray(out["logits"], np.float64)          # (B, N, Q): sigmoid is monotone
        boxes = xyxy(np.asarray(out["boxes"]))
        iou = float(self.option("match_iou"))
        for j, (i, box_a, _, _) in enumerate(pairs):
            true, false = logits[i, :, 2 * j], logits[i, :, 2 * j + 1]
            acc.append(true.max() > false.max())
            ground.append(box_iou(boxes[i, true.argmax()], box_a)[0, 0] >= iou)

    def _picture(self, rows, image01, gt_boxes, top_boxes, colors, pred_masks):
        from PIL import Image, ImageDraw
        from fmjax.data.shapes import COLOR_RGB
        k = max(1, 128 // image01.shape[0])
        base = Image.fromarray(np.round(image01 * 255).astype(np.uint8)).resize(
            (image01.shape[1] * k, image01.shape[0] * k), Image.NEAREST)
        pics = []
        for boxes, masks in ((gt_boxes, None), (top_boxes, pred_masks)):
            im = base.copy()
            if masks is not None:
                from fmjax.models.sam.amg import overlay_masks
                im = Image.fromarray(overlay_masks(
                    np.asarray(im), [np.kron(m, np.ones((k, k), bool)) for m in masks],
                    colours=[COLOR_RGB[int(c) % len(COLOR_RGB)] for c in colors]))
            d = ImageDraw.Draw(im)
            s = np.array([image01.shape[1], image01.shape[0]] * 2) * k
            for b, c in zip(boxes, colors):
                d.rectangle(list(np.asarray(b) * s), outline=(255, 255, 255), width=3)
                d.rectangle(list(np.asarray(b) * s), outline=tuple(COLOR_RGB[int(c) % len(COLOR_RGB)]), width=1)
            pics.append(np.asarray(im))
        rows[0].append(np.asarray(base))
        rows[1].append(pics[0])
        rows[2].append(pics[1])

    def _display(self, images) -> np.ndarray:
        return model_inputs_to_display(self.transform, images)
