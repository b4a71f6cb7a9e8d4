"""Segment one image with a trained SAM workdir: what ``launch/segment.py`` runs.

``segment_image(workdir, image_path, points= | boxes= | auto=True)`` restores the workdir's
checkpoint (``fmjax.train.restore``, as ``launch/eval.py`` / ``launch/sample.py``), resizes
the image to the model's square input (bicubic, stretched: the shapes data is square; SAM's
longest-side resize and padding are not done) and runs the workdir's eval pipeline
(``config.data.pp_eval`` without its ``keep``), then

- ``points`` (``'x,y;x,y'``, original pixel coordinates) with ``labels`` (``'1,0'``, 1
  foreground / 0 background, default all 1): ONE prompt of all the points; a single point
  gives SAM's three masks and the one the IoU head rates best is kept, several points one mask;
- ``boxes`` (``'x0,y0,x1,y1;...'``, inclusive pixel bounds): one prompt and one mask per box;
- ``prompt`` (``'a red circle;a blue square'``) with ``detector_workdir`` (a configs/owl.py run):
  Grounded-SAM, each phrase's top-scoring box from the open-vocabulary detector
  (``fmjax/train/grounding.py``) as a box prompt;
- ``auto``: automatic mask generation (``fmjax.models.sam.amg``) with the settings of the
  workdir's ``amg_recall`` eval entry if it has one, else that eval's defaults, each
  overridable (``points_per_side=`` ...).

Prompts use the training layout of the ``sam`` objective (boxes as two corner points, padding
points up to its slot count: its ``sam_model()`` hook). Masks come back at the original
image's size (the low-res logits upsampled bilinearly). Writes a PNG overlay (each mask in a
colour, the prompts drawn; pictures under 256 px are enlarged by an integer factor) to ``out``
(default ``DIR/images/segment_<image name>.png``) and prints one line per mask: its predicted
IoU, stability score, area and bbox (x, y, w, h). Returns ``{'masks': [records], 'path',
'step'}`` (records as ``amg.mask_record``).

Bad input (no such workdir or image, malformed points / labels / boxes, prompts outside the
image, several prompt kinds at once, a workdir whose objective has no ``sam_model`` hook) is a
``ConfigError`` raised before the checkpoint is read or anything compiled.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.evals import amg_recall
from fmjax.evals.images import save_png
from fmjax.models.sam import amg
from fmjax.objectives.base import supports
from fmjax.train import files
from fmjax.train.restore import load_checkpoint, load_workdir_config
from fmjax.train.grounding import Detector, model_inputs, preprocess, workdir_config  # noqa: F401 - preprocess: API
from fmjax.train.setup import build

MIN_PICTURE = 256  # smaller overlays are enlarged by an integer factor to at least this side


# -- parsing (no jax, no model) --------------------------------------------------------------
def _numbers(text: str, flag: str, per: int, example: str) -> np.ndarray:
    groups = [g.strip() for g in str(text).split(";") if g.strip()]
    if not groups:
        raise ConfigError(f"{flag}={text!r} holds nothing; give e.g. {flag}='{example}'.")
    out = []
    for g in groups:
        parts = [p.strip() for p in g.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != per or not np.isfinite(values).all():
            raise ConfigError(f"{flag}={text!r}: {g!r} is not {per} comma-separated numbers; give e.g. "
                              f"{flag}='{example}'.")
        out.append(values)
    return np.asarray(out, np.float64)


def parse_points(text: str) -> np.ndarray:
    """``'x,y;x,y'`` -> (N, 2) float."""
    return _numbers(text, "--points", 2, "12,30;40,8")


def parse_boxes(text: str) -> np.ndarray:
    """``'x0,y0,x1,y1;...'`` -> (N, 4) float, x0 <= x1 and y0 <= y1 checked."""
    boxes = _numbers(text, "--boxes", 4, "4,6,30,28;32,32,60,50")
    bad = [i for i, b in enumerate(boxes) if b[2] < b[0] or b[3] < b[1]]
    if bad:
        raise ConfigError(f"--boxes={text!r}: box {bad[0]} has x1 < x0 or y1 < y0; give x0,y0,x1,y1 with "
                          "the top-left corner first.")
    return boxes


def parse_labels(text, n: int) -> np.ndarray:
    """``'1,0'`` (or None: all foreground) -> (n,) int32 of 0 / 1."""
    if text is None:
        return np.ones(n, np.int32)
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else map(str, text)) if p.strip()]
    if len(parts) != n or any(p not in ("0", "1") for p in parts):
        shown = text if isinstance(text, str) else ",".join(map(str, text))
        raise ConfigError(f"--labels={shown!r}: give one label per point ({n}), each 1 (foreground) or "
                          "0 (background), e.g. --labels=" + ",".join(["1"] + ["0"] * (n - 1)) + ".")
    return np.asarray([int(p) for p in parts], np.int32)


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; a missing or unreadable file is a ConfigError."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(full):
        raise ConfigError(f"--image={path}: no such file ({full}).")
    from fmjax.data.image_folder import read_rgb
    try:
        return read_rgb(full)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad file
        raise ConfigError(f"--image={path}: cannot read it as an image ({type(e).__name__}: {e}).") from None


def check_request(points=None, labels=None, boxes=None, auto: bool = False, prompt=None):
    """``(points (N, 2) | None, labels (N,) | None, boxes (M, 4) | None)`` from the flags, or a
    ConfigError: exactly one of points / boxes / auto / prompt, labels only with points."""
    given = [name for name, v in (("--points", points), ("--boxes", boxes), ("--auto", auto or None),
                                  ("--prompt", prompt)) if v is not None]
    if len(given) != 1:
        raise ConfigError(("give one of --points='x,y;...', --boxes='x0,y0,x1,y1;...', --auto or "
                           "--prompt='a red circle'"
                           if not given else f"{' and '.join(given)} together; give one of them") + ".")
    if labels is not None and points is None:
        raise ConfigError("--labels go with --points (one 0 / 1 label per point).")
    pts = parse_points(points) if points is not None else None
    lab = parse_labels(labels, len(pts)) if pts is not None else None
    bxs = parse_boxes(boxes) if boxes is not None else None
    return pts, lab, bxs


def check_inside(points, boxes, hw) -> None:
    h, w = hw
    for name, arr in (("--points", points), ("--boxes", boxes)):
        if arr is None:
            continue
        xy = arr.reshape(-1, 2)
        if (xy < 0).any() or (xy[:, 0] > w - 1).any() or (xy[:, 1] > h - 1).any():
            raise ConfigError(f"{name}: coordinates must lie in the image: x in [0, {w - 1}], y in "
                              f"[0, {h - 1}] (it is {w}x{h} pixels).")


# -- the model side ------------------------------------------------------------------------
def to_model_frame(xy: np.ndarray, hw, size: int) -> np.ndarray:
    """Pixel coordinates (x, y, ...) of the original (H, W) image -> those of the size x size
    input (pixel centres map to pixel centres)."""
    h, w = hw
    scale = np.tile(np.array([size / w, size / h]), xy.shape[-1] // 2)
    return (xy + 0.5) * scale - 0.5


_PREDICT_FNS: dict = {}   # id(model) -> (model, jitted prompt -> masks): compiled once per model


def _make_predict(model):
    if id(model) in _PREDICT_FNS and _PREDICT_FNS[id(model)][0] is model:
        return _PREDICT_FNS[id(model)][1]

    def run(params, emb, points, labels, boxes, multimask, output_size):
        logits, iou = model.apply({"params": params}, emb, points, labels, boxes, None, multimask,
                                  method=model.predict)
        b, p, m = logits.shape[:3]
        logits = jax.image.resize(logits.astype(jnp.float32), (b, p, m) + tuple(output_size), "bilinear")
        masks = logits > 0.0
        return (masks, iou.astype(jnp.float32), amg.stability_score(logits), amg.masks_to_boxes(masks))
    _PREDICT_FNS[id(model)] = (model, jax.jit(run, static_argnums=(5, 6)))
    return _PREDICT_FNS[id(model)][1]


def predict_prompts(model, params, emb, slots: int, hw, points=None, labels=None, boxes=None) -> list:
    """Records of the points prompt (one) or of each box (model-frame coordinates), at (H, W)."""
    fn = _make_predict(model)
    if points is not None:
        pts, lab = amg.pad_prompt(points[None, None], labels[None, None], slots)
        multimask = len(points) == 1
        masks, iou, stab, bxs = (np.asarray(x)[0, 0] for x in fn(
            params, emb, jnp.asarray(pts), jnp.asarray(lab), None, multimask, tuple(hw)))
        j = int(np.argmax(iou)) if multimask else 0
        return [amg.mask_record(masks[j], bxs[j], iou[j], stab[j], None)]
    if slots > 0:   # the training layout: a box as its two corners (labels 2 / 3) + padding points
        corners = boxes.reshape(1, -1, 2, 2)
        pts, lab = amg.pad_prompt(corners, np.broadcast_to(np.array([2, 3], np.int32), corners.shape[:-1]),
                                  slots)
        out = fn(params, emb, jnp.asarray(pts), jnp.asarray(lab), None, False, tuple(hw))
    else:
        out = fn(params, emb, None, None, jnp.asarray(boxes[None], jnp.float32), False, tuple(hw))
    masks, iou, stab, bxs = (np.asarray(x)[0, :, 0] for x in out)
    return [amg.mask_record(masks[i], bxs[i], iou[i], stab[i], None) for i in range(len(boxes))]


def draw(image: np.ndarray, records, points=None, labels=None, boxes=None) -> np.ndarray:
    """The overlay picture: masks in colour, points (green foreground, red background, with a
    white ring), boxes (the colour of their mask), AMG prompt points as dots."""
    from PIL import Image, ImageDraw
    pic = amg.overlay_masks(image, [r["segmentation"] for r in records])
    h, w = pic.shape[:2]
    k = max(1, -(-MIN_PICTURE // max(h, w)))
    im = Image.fromarray(pic).resize((w * k, h * k), Image.NEAREST)
    d = ImageDraw.Draw(im)
    c = lambda x: (x + 0.5) * k  # noqa: E731 - pixel centre in the enlarged picture
    r = max(2, k)
    for i, rec in enumerate(records):
        if rec.get("point_coords"):
            x, y = rec["point_coords"][0]
            d.ellipse([x * k - 2, y * k - 2, x * k + 2, y * k + 2], fill=tuple(int(v) for v in amg.PALETTE[i % 20]))
    if boxes is not None:
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            d.rectangle([x0 * k, y0 * k, (x1 + 1) * k - 1, (y1 + 1) * k - 1],
                        outline=tuple(int(v) for v in amg.PALETTE[i % 20]), width=max(1, k // 2))
    if points is not None:
        for (x, y), lab in zip(points, labels):
            d.ellipse([c(x) - r - 1, c(y) - r - 1, c(x) + r + 1, c(y) + r + 1], fill=(255, 255, 255))
            d.ellipse([c(x) - r, c(y) - r, c(x) + r, c(y) + r], fill=(0, 200, 0) if lab == 1 else (220, 0, 0))
    return np.asarray(im)


def amg_settings(config, overrides: dict) -> dict:
    """AMG settings: the workdir's ``amg_recall`` eval entry, else that eval's defaults, then
    ``overrides`` (None values ignored); checked as the eval checks them."""
    entry = next((dict(v) for v in (config.get("evals") or {}).values()
                  if dict(v).get("type") == "amg_recall"), {})
    out = {k: entry.get(k, amg_recall.DEFAULTS[k]) for k in amg_recall.AMG_KEYS}
    out.update({k: v for k, v in overrides.items() if v is not None})
    try:
        amg_recall.AmgRecallEvaluator.check_options(
            "FLAG", {k: v for k, v in overrides.items() if v is not None}, config, None)
    except ConfigError as e:
        raise ConfigError(str(e).replace("FLAG.", "--")) from None
    return out


def parse_prompts(prompt: str) -> list[str]:
    phrases = [p.strip() for p in str(prompt).split(";")]
    if not all(phrases):
        raise ConfigError(f"--prompt={prompt!r}: give one or more ';'-separated phrases, e.g. "
                          "'a red circle;a blue square'.")
    return phrases


def segment_image(workdir: str, image: str, points=None, labels=None, boxes=None, auto: bool = False,
                  out: str | None = None, step: int | None = None, config=None, devices=None,
                  prompt: str | None = None, detector_workdir: str | None = None,
                  **amg_overrides) -> dict:
    """See the module docstring."""
    pts, lab, bxs = check_request(points, labels, boxes, auto, prompt)
    phrases = parse_prompts(prompt) if prompt is not None else None
    if (phrases is None) != (not detector_workdir):
        raise ConfigError("--prompt needs --detector_workdir=DIR (a configs/owl.py run)" if phrases is not None
                          else "--detector_workdir goes with --prompt='a red circle'.")
    if detector_workdir and not files.isdir(files.resolve(detector_workdir)):
        raise ConfigError(f"--detector_workdir={detector_workdir}: no such directory; give a workdir "
                          "written by launch/train.py --config=configs/owl.py.")
    unknown = sorted(set(amg_overrides) - set(amg_recall.AMG_KEYS))
    if unknown:
        raise ConfigError(f"unknown AMG settings {unknown}; valid: {list(amg_recall.AMG_KEYS)}.")
    if auto is False and any(v is not None for v in amg_overrides.values()):
        raise ConfigError("the AMG settings (--points_per_side ...) go with --auto.")
    wd = files.resolve(workdir)
    if not files.isdir(wd):
        raise ConfigError(f"--workdir={workdir}: no such directory; give a workdir written by "
                          "launch/train.py --config=configs/sam.py.")
    config = config or load_workdir_config(wd)
    picture = read_image(image)
    hw = picture.shape[:2]
    check_inside(pts, bxs, hw)
    objective, _, _ = build(config, devices)
    if not supports(objective, "sam_model"):
        raise ConfigError(f"{wd} holds a {config.objective.name!r} model, which takes no prompts; "
                          "launch/segment.py needs a SAM workdir (configs/sam.py).")
    settings = amg_settings(config, amg_overrides) if auto else None
    model, params_of, slots = objective.sam_model()
    size = int(getattr(model, "image_size", 0) or config.data.image_size)
    x = preprocess(config, picture, size)
    stem = os.path.splitext(os.path.basename(str(image)))[0]
    out = files.resolve(out) if out else files.join(wd, "images", f"segment_{stem}.png")

    if phrases is not None:   # text -> the detector's top box of each phrase -> box prompts
        det = Detector(detector_workdir, devices=devices)
        bxs, scores = det.top_boxes(picture[None].astype(np.float32) / 255.0, phrases)
        bxs, scores = bxs[0], scores[0]
        for ph, b, sc in zip(phrases, bxs, scores):
            print(f"prompt {ph!r}: box {b[0]:.0f},{b[1]:.0f},{b[2]:.0f},{b[3]:.0f} score={sc:.3f} "
                  f"(detector {files.resolve(detector_workdir)} at step {det.step})", flush=True)
    config, objective, mesh, rules, state, step = load_checkpoint(wd, config, step, devices)
    model, params_of, slots = objective.sam_model()
    params = params_of(state.params, state.extra)
    emb = jax.jit(lambda p, im: model.apply({"params": p}, im, method=model.encode_image))(
        params, jnp.asarray(x[None]))
    if auto:
        gen = amg.AutomaticMaskGenerator(model, point_slots=slots, **settings)
        records = gen.from_embeddings(params, emb, (size, size), hw)[0]
    else:
        frame = lambda a: None if a is None else to_model_frame(a, hw, size).astype(np.float32)  # noqa: E731
        records = predict_prompts(model, params, emb, slots, hw, frame(pts), lab, frame(bxs))
    save_png(out, draw(picture, records, pts, lab, bxs))
    for i, r in enumerate(records):
        x0, y0, w, h = r["bbox"]
        print(f"mask {i}: score={r['predicted_iou']:.3f} stability={r['stability_score']:.3f} "
              f"area={r['area']} bbox={x0},{y0},{w},{h}", flush=True)
    print(f"{len(records)} mask{'s' if len(records) != 1 else ''} from {wd} at step {step} -> {out}", flush=True)
    return dict(masks=records, path=out, step=step)


class Segmenter:
    """A restored ``sam`` workdir (its ``sam_model()`` hook): one mask per box prompt (the
    second half of Grounded-SAM, after ``fmjax.train.grounding.Detector``; the ``box_ap`` eval's
    ``sam_workdir``). Images are float [0, 1] (B, H, W, 3), resized to the model's input and
    normalised by the workdir's own ``pp_eval``."""

    def __init__(self, workdir: str, step=None, devices=None, flag: str = "--workdir"):
        wd, config = workdir_config(workdir, flag, "configs/sam.py")
        self.config, self.objective, _, _, state, self.step = load_checkpoint(wd, config, step, devices)
        if not supports(self.objective, "sam_model"):
            raise ConfigError(f"{flag}={workdir} holds a {self.config.objective.name!r} model, which "
                              "takes no prompts; give a SAM workdir (configs/sam.py).")
        self.model, params_of, self.slots = self.objective.sam_model()
        self.params = params_of(state.params, state.extra)
        self.size = int(getattr(self.model, "image_size", 0) or self.config.data.image_size)
        m = self.model
        self._encode = jax.jit(lambda p, x: m.apply({"params": p}, x, method=m.encode_image))

    def masks(self, images01, boxes) -> np.ndarray:
        """float [0, 1] images (B, H, W, 3) and boxes (B, P, 4) pixel xyxy -> bool (B, P, H, W)."""
        images01 = np.asarray(images01)
        hw = images01.shape[1:3]
        emb = self._encode(self.params, jnp.asarray(model_inputs(self.config, images01, self.size)))
        out = []
        for i in range(len(images01)):
            frame = to_model_frame(np.asarray(boxes[i], np.float32), hw, self.size).astype(np.float32)
            recs = predict_prompts(self.model, self.params, emb[i:i + 1], self.slots, hw, boxes=frame)
            out.append(np.stack([r["segmentation"] for r in recs]))
        return np.stack(out)
