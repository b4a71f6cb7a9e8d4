"""Tests for the source registry and the image-folder reader."""
import json
import pickle

import numpy as np
from PIL import Image
import pytest

from fmjax.data import image_folder
from fmjax.data import shapes
from fmjax.data import sources

SHAPES = "fmjax_shapes/32"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_shapes_source(shapes_data_dir):
    source = sources.get_source(SHAPES, "validation", data_dir=shapes_data_dir)
    assert len(source) == shapes.SPLIT_SIZES["validation"]
    ex = source[np.int64(3)]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    assert isinstance(ex["label"], int) and isinstance(ex["caption"], str)
    assert ex["masks"].shape == (3, 32, 32)
    assert ex["caption"] == shapes.generate_example(3, "validation", 32)["caption"]
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == len(source)
    np.testing.assert_array_equal(clone[3]["image"], ex["image"])



def test_split_slices(shapes_data_dir):
    """TFDS slices of a split: two halves of `heldout` are disjoint and cover it, in order."""
    whole = sources.get_source(SHAPES, "heldout", data_dir=shapes_data_dir)
    first = sources.get_source(SHAPES, "heldout[:500]", data_dir=shapes_data_dir)
    second = sources.get_source(SHAPES, "heldout[50%:]", data_dir=shapes_data_dir)
    assert len(first) == len(second) == len(whole) // 2
    assert first[3]["caption"] == whole[3]["caption"]
    assert second[3]["caption"] == whole[len(whole) // 2 + 3]["caption"]
    both = sources.get_source(SHAPES, "heldout[:500]+validation[:100]", data_dir=shapes_data_dir)
    assert len(both) == 600 and both[500]["caption"] == sources.get_source(
        SHAPES, "validation", data_dir=shapes_data_dir)[0]["caption"]
    for bad in ("heldout[:500", "heldout[a:b]", "heldout[1:2:3]"):
        with pytest.raises(ValueError) as excinfo:
            sources.check_source(SHAPES, bad)
        assert "[start:end]" in _one_line(excinfo), bad
    for bad in ("held[:10]", "heldout[:5]+valid"):
        with pytest.raises(ValueError) as excinfo:
            sources.check_source(SHAPES, bad)
        assert "slice of one" in _one_line(excinfo), bad

def test_shapes_metadata():
    assert sources.class_names("fmjax_shapes") == list(shapes.CLASS_NAMES)
    assert sources.num_classes(SHAPES) == len(shapes.CLASS_NAMES)
    sources.check_source(SHAPES, "heldout", data_dir="/nonexistent")  # prepares lazily


def test_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        sources.get_source("no_such_dataset_xyz", "train")
    message = _one_line(excinfo)
    assert "no_such_dataset_xyz" in message and "image_folder:" in message and "fmjax_shapes" in message
    with pytest.raises(ValueError, match="resolution"):
        sources.check_source("fmjax_shapes/33", "train")
    with pytest.raises(ValueError) as excinfo:
        sources.check_source("fmjax_shapes", "training")
    assert "training" in _one_line(excinfo) and "validation" in str(excinfo.value)


def test_missing_catalog_dataset(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.get_source("mnist", "train", data_dir=str(tmp_path))
    message = _one_line(excinfo)
    assert "tfds build mnist" in message and str(tmp_path) in message and "fmjax[tf]" in message
    with pytest.raises(FileNotFoundError):
        sources.check_source("mnist", "train", data_dir=str(tmp_path))
    assert sources.num_classes("mnist", data_dir=str(tmp_path)) == 10


def _write_image(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write_image(root / "train" / "cat" / "a.png", (255, 0, 0))
    _write_image(root / "train" / "cat" / "b.jpg", (0, 255, 0))
    _write_image(root / "train" / "dog" / "c.jpeg", (0, 0, 255))
    _write_image(root / "val" / "dog" / "d.png", (9, 9, 9))
    _write_image(root / "val" / "emu" / "e.png", (1, 2, 3))
    return root


def test_image_folder_reading(folder):
    source = sources.get_source(f"image_folder:{folder}", "train")
    assert len(source) == 3
    ex = source[0]
    assert ex["image"].shape == (10, 12, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][0, 0], [255, 0, 0])
    assert [source[i]["label"] for i in range(3)] == [0, 0, 1]
    assert "caption" not in ex
    # Class indices agree between splits.
    val = sources.get_source(f"image_folder:{folder}", "val")
    assert [val[i]["label"] for i in range(2)] == [1, 2]
    assert sources.class_names(f"image_folder:{folder}") == ["cat", "dog", "emu"]
    assert sources.num_classes(f"image_folder:{folder}") == 3
    assert len(pickle.loads(pickle.dumps(source))) == 3
    sources.check_source(f"image_folder:{folder}", "val")


def test_image_folder_captions(folder):
    (folder / "captions.tsv").write_text(
        "train/cat/a.png\ta red square\ntrain/cat/b.jpg\ta green one\n\n"
        "train/dog/c.jpeg\tblue\nval/dog/d.png\tgrey\n")
    source = sources.get_source(f"image_folder:{folder}", "train")
    assert [source[i]["caption"] for i in range(3)] == ["a red square", "a green one", "blue"]
    # A per-split jsonl file, with paths relative to the split folder, wins.
    lines = [{"image": "dog/d.png", "caption": "dark"}, {"image": "emu/e.png", "caption": "bird"}]
    (folder / "val" / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    val = image_folder.ImageFolderSource(str(folder), "val")
    assert [val[i]["caption"] for i in range(2)] == ["dark", "bird"]


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.get_source(f"image_folder:{tmp_path}/missing", "train")
    assert "does not exist" in _one_line(excinfo)
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.check_source(f"image_folder:{folder}", "test")
    assert "test" in _one_line(excinfo) and "splits found" in str(excinfo.value)
    (folder / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.get_source(f"image_folder:{folder}", "empty")
    assert "No images found" in _one_line(excinfo)


@pytest.mark.parametrize("content, error, fragment", [
    ("train/cat/a.png\t  \n", ValueError, "captions.tsv:1: empty caption"),
    ("train/cat/a.png\tx\ntrain/cat/zzz.png\ty\n", FileNotFoundError, "captions.tsv:2: image"),
    ("train/cat/a.png\tx\ntrain/dog/c.jpeg\ty\n", ValueError, "no caption for image"),
    ("train/cat/a.png x\n", ValueError, "captions.tsv:1: expected"),
])
def test_image_folder_caption_errors(folder, content, error, fragment):
    (folder / "captions.tsv").write_text(content)
    with pytest.raises(error) as excinfo:
        sources.get_source(f"image_folder:{folder}", "train")
    assert fragment in _one_line(excinfo)


def test_image_folder_bad_jsonl(folder):
    (folder / "train" / "captions.jsonl").write_text('{"image": "cat/a.png", "caption": "ok"}\n{oops\n')
    with pytest.raises(ValueError) as excinfo:
        sources.get_source(f"image_folder:{folder}", "train")
    assert "captions.jsonl:2: invalid JSON" in _one_line(excinfo)
