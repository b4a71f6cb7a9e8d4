"""``sa1b:<dir>``: SA-1B's released layout (sa_*.jpg + sa_*.json with COCO compressed RLE masks)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from fmjax.data import sa1b, sources
from fmjax.data.bad_examples import BadExampleError

# Masks and their COCO RLE strings as pycocotools 2.0.11 (mask.encode on a Fortran-ordered
# array) writes them; the decoder and encoder must reproduce these byte for byte.
_M1 = np.unpackbits(np.array([229, 131, 242, 92, 34, 125, 208], np.uint8))[:54].reshape(6, 9)
_COCO = [
    (_M1, "011100001O023NM0020N0006OK1OO"),
    (np.ones((4, 4), np.uint8), "0`0"),
]


def _m3():
    m = np.zeros((200, 300), np.uint8)
    m[150:, 250:] = 1
    return m


_M3_COUNTS = "Vo`1b1f4" + "0" * 97   # a long first run (several 5-bit groups), then equal pairs


@pytest.mark.parametrize("mask, counts", _COCO + [(_m3(), _M3_COUNTS)])
def test_rle_matches_pycocotools(mask, counts):
    assert sa1b.rle_encode(mask) == {"size": list(mask.shape), "counts": counts}
    np.testing.assert_array_equal(sa1b.rle_decode({"size": list(mask.shape), "counts": counts}), mask)


def test_rle_round_trips_and_rejects_a_wrong_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        m = (rng.uniform(size=(h, w)) > rng.uniform()).astype(np.uint8)
        np.testing.assert_array_equal(sa1b.rle_decode(sa1b.rle_encode(m)), m)
    np.testing.assert_array_equal(sa1b.rle_decode({"size": [2, 3], "counts": [1, 2, 3]}),
                                  [[0, 1, 0], [1, 0, 0]])   # uncompressed counts, column-major
    with pytest.raises(ValueError, match="sum to"):
        sa1b.rle_decode({"size": [4, 5], "counts": "0`0"})
    with pytest.raises(ValueError, match="ends inside a count"):
        sa1b.rle_decode({"size": [4, 4], "counts": "0`"})


def _write_pair(folder, name, h, w, n_masks, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, name + ".jpg"))
    masks = []
    for i in range(n_masks):
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m[y:y + 4, x:x + 4] = 1
        m[0, :7] = (i >> np.arange(7)) & 1   # each mask different
        masks.append(m)
    anns = [{"id": i, "segmentation": sa1b.rle_encode(m), "bbox": [0, 0, 1, 1], "area": int(m.sum()),
             "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[1.0, 1.0]],
             "crop_box": [0, 0, w, h]} for i, m in enumerate(masks)]
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump({"image": {"image_id": seed, "width": w, "height": h, "file_name": name + ".jpg"},
                   "annotations": anns}, f)
    return masks


def test_source_reads_pairs_picks_up_to_64_masks_and_pads(tmp_path):
    few = _write_pair(str(tmp_path / "train" / "sa_000000"), "sa_1", 24, 36, 3, 1)
    many = _write_pair(str(tmp_path / "train" / "sa_000000"), "sa_2", 20, 16, 70, 2)
    _write_pair(str(tmp_path / "validation"), "sa_3", 16, 16, 1, 3)
    sources.check_source(f"sa1b:{tmp_path}", "train")
    src = sources.get_source(f"sa1b:{tmp_path}", "train")
    assert len(src) == 2 and len(sources.get_source(f"sa1b:{tmp_path}", "validation")) == 1
    ex = src[0]
    assert ex["image"].shape == (24, 36, 3) and ex["image"].dtype == np.uint8
    assert ex["masks"].shape == (64, 24, 36) and int(ex["num_objects"]) == 3
    np.testing.assert_array_equal(ex["masks"][:3], np.stack(few))
    assert not ex["masks"][3:].any() and ex["file_name"] == os.path.join("train", "sa_000000", "sa_1.jpg")
    ex = src[1]
    assert int(ex["num_objects"]) == 64 and ex["masks"].shape == (64, 20, 16)
    stored = {m.tobytes() for m in many}
    assert all(m.tobytes() in stored for m in ex["masks"]) and len({m.tobytes() for m in ex["masks"]}) == 64
    np.testing.assert_array_equal(src[1]["masks"], ex["masks"])   # the same subset each epoch


def test_without_split_folders_everything_is_train_and_errors_are_one_line(tmp_path):
    _write_pair(str(tmp_path), "sa_1", 16, 16, 2, 1)
    assert len(sources.get_source(f"sa1b:{tmp_path}", "train")) == 1
    with pytest.raises(FileNotFoundError, match="no 'validation' folder"):
        sources.check_source(f"sa1b:{tmp_path}", "validation")
    with pytest.raises(FileNotFoundError, match="not found"):
        sources.check_source(f"sa1b:{tmp_path}/nope", "train")
    os.remove(tmp_path / "sa_1.json")
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        sources.check_source(f"sa1b:{tmp_path}", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No SA-1B images"):
        sources.check_source(f"sa1b:{empty}", "train")


def test_a_bad_annotation_is_a_bad_example(tmp_path):
    _write_pair(str(tmp_path), "sa_1", 16, 16, 2, 1)
    with open(tmp_path / "sa_1.json") as f:
        d = json.load(f)
    d["annotations"][1]["segmentation"]["size"] = [8, 8]
    with open(tmp_path / "sa_1.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(BadExampleError, match="sa_1.jpg.*annotation 1"):
        sources.get_source(f"sa1b:{tmp_path}", "train")[0]


def test_the_paper_presets_pp_resizes_the_longer_side_normalises_and_pads(tmp_path):
    """configs/sam.py:sa1b_*'s pp_train shrunk to 32 px on a 24 x 36 SA-1B example: the longer
    side becomes 32 (24 -> int(21.33 + 0.5) = 21 rows, as SAM's ResizeLongestSide), masks
    follow (nearest), and the bottom is zero-padded after normalising (SAM pads with 0)."""
    from fmjax.data.transforms import parse_pp
    from fmjax.testing import load_config
    masks = _write_pair(str(tmp_path), "sa_1", 24, 36, 2, 1)
    ex = sources.get_source(f"sa1b:{tmp_path}", "train")[0]
    pp = load_config("sam", "sa1b_vit_b").data.pp_train.replace("1024", "32")
    out = parse_pp(pp, "pp")(ex, np.random.default_rng(0))
    assert sorted(out) == ["image", "masks", "num_objects"]
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert out["masks"].shape == (64, 32, 32) and out["masks"].dtype == np.uint8
    assert (out["image"][21:] == 0).all() and not out["masks"][:, 21:].any()
    assert np.abs(out["image"][:21]).max() > 0.5
    expected = np.asarray(Image.fromarray(masks[0] * 255).resize((32, 21), Image.NEAREST)) > 0
    np.testing.assert_array_equal(out["masks"][0, :21] > 0, expected)
    from fmjax.data.sam_ops import pad_to
    with pytest.raises(ValueError, match="larger; resize it first"):
        pad_to(16)(ex, np.random.default_rng(0))
