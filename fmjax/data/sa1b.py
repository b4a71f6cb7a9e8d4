"""SA-1B (Kirillov et al., 2023) as released: ``sa1b:<dir>`` dataset names.

The release is tar files of ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs; extract them anywhere
under ``<dir>``. Splits: ``<dir>/<split>/`` when that folder exists (e.g. ``train`` and
``validation`` folders of your own choosing), else ``train`` is every pair under ``<dir>`` (SA-1B
has no official splits). Each json is ``{"image": {...}, "annotations": [{"segmentation":
{"size": [h, w], "counts": <COCO compressed RLE>}, "bbox", "area", "predicted_iou", ...}]}``.

``source[i]`` is ``{"image": uint8 (H, W, 3), "masks": uint8 (K, H, W), "num_objects": int,
"file_name": str}`` at the image's own resolution with K = ``MAX_MASKS`` (64, the paper's
"up to 64 randomly sampled masks" per image): a random subset of the annotations when there are
more (drawn from the example's index, so it is the same subset every epoch), zero masks after
``num_objects`` when there are fewer. Only the chosen masks are decoded. The SAM paper presets
resize the longest side to 1024 and pad (``resize_longest`` / ``pad_to`` pp ops).

``rle_decode`` / ``rle_encode`` are COCO's compressed RLE (pycocotools ``maskApi.c``
``rleFrString`` / ``rleToString``): run lengths of 0s then 1s, alternating, over the mask in
column-major order, each written as 5-bit groups (+48, bit 0x20: more groups follow), from the
third on as the difference to the count two before.

A pair that does not decode is a ``bad_examples.BadExampleError`` naming the file.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from fmjax.data.bad_examples import BadExampleError
from fmjax.data.image_folder import read_rgb
from fmjax.data.registry import SourceKind, register_source

PREFIX = "sa1b:"
MAX_MASKS = 64


def rle_counts(s: str | bytes) -> list:
    """The run lengths of a COCO compressed RLE string."""
    data = s.encode() if isinstance(s, str) else s
    counts, p = [], 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("RLE string ends inside a count")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """``{"size": [h, w], "counts": str or list}`` -> uint8 (h, w) mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(counts) != h * w or min(counts, default=0) < 0:
        raise ValueError(f"RLE counts sum to {sum(counts)}, not h*w = {h * w}")
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape(w, h).T.copy()   # column-major


def rle_encode(mask: np.ndarray) -> dict:
    """uint8 / bool (h, w) mask -> ``{"size": [h, w], "counts": str}`` (COCO compressed RLE)."""
    m = np.asarray(mask).astype(bool)
    flat = m.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = list(np.diff(bounds))
    if flat.size and flat[0]:
        counts = [0] + counts
    out = bytearray()
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": out.decode()}


def _pairs(root: str, split: str) -> list:
    split_dir = os.path.join(root, split)
    base = split_dir if os.path.isdir(split_dir) else (root if split == "train" else None)
    if base is None:
        raise FileNotFoundError(
            f"SA-1B folder {root!r} has no {split!r} folder; put that split's sa_*.jpg / sa_*.json "
            f"pairs under {split_dir} (without split folders, every pair under {root} is 'train').")
    images = sorted(glob.glob(os.path.join(base, "**", "*.jpg"), recursive=True))
    if not images:
        raise FileNotFoundError(f"No SA-1B images (*.jpg with a *.json beside each) under {base}; "
                                "extract the release's tar files there.")
    missing = [p for p in images if not os.path.isfile(p[:-4] + ".json")]
    if missing:
        raise FileNotFoundError(f"{len(missing)} SA-1B images have no annotation file, e.g. "
                                f"{missing[0][:-4] + '.json'}; extract the json files beside the images.")
    return images


class Sa1bSource:
    """Random-access SA-1B pairs (see the module docstring); picklable."""

    def __init__(self, root: str, split: str, max_masks: int = MAX_MASKS):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.split, self.max_masks = split, int(max_masks)
        self.paths = _pairs(self.root, split)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        index = int(index)
        path = self.paths[index]
        try:
            image = read_rgb(path)
            with open(path[:-4] + ".json") as f:
                anns = json.load(f)["annotations"]
            h, w = image.shape[:2]
            chosen = np.arange(len(anns))
            if len(anns) > self.max_masks:
                chosen = np.sort(np.random.default_rng(index).permutation(len(anns))[:self.max_masks])
            masks = np.zeros((self.max_masks, h, w), np.uint8)
            for slot, a in enumerate(chosen):
                try:
                    m = rle_decode(anns[a]["segmentation"])
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"annotation {a}: {e}") from None
                if m.shape != (h, w):
                    raise ValueError(f"annotation {a} is {m.shape[0]}x{m.shape[1]}, the image {h}x{w}")
                masks[slot] = m
        except Exception as e:  # noqa: BLE001 - PIL, json and RLE errors alike
            raise BadExampleError(f"SA-1B example {path}", str(e) or type(e).__name__,
                                  "re-extract or remove the pair") from None
        return {"image": image, "masks": masks, "num_objects": np.int32(len(chosen)),
                "file_name": os.path.relpath(path, self.root)}

    def __repr__(self):
        return f"Sa1bSource({self.root!r}, split={self.split!r}, len={len(self)})"


@register_source("sa1b", forms=f"'{PREFIX}<dir>'")
class Sa1bKind(SourceKind):
    """``sa1b:<dir>`` names (extracted SA-1B tar files)."""

    @staticmethod
    def root(name):
        path = name[len(PREFIX):] if name.startswith(PREFIX) else ""
        if not path:
            raise ValueError(f"Bad dataset name {name!r}: use '{PREFIX}/path/to/extracted/sa1b'.")
        root = os.path.expanduser(path)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"SA-1B folder {root!r} not found: extract the release's tar "
                                    "files there or set config.data.name=sa1b:DIR.")
        return root

    def check(self, name, split, data_dir):
        _pairs(self.root(name), split)

    def get(self, name, split, data_dir, **options):
        return Sa1bSource(self.root(name), split, **options)
