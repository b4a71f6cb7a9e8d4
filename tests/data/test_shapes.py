"""Tests for the bundled fmjax_shapes dataset (generation and TFDS read-back)."""
import sys

import numpy as np
import pytest

from fmjax.data import shapes
from fmjax.data import sources

RES = 32


def _examples(split, n, res=RES):
    return [shapes.generate_example(i, split, res) for i in range(n)]


def test_example_format():
    ex = shapes.generate_example(0, "train", RES)
    assert ex["image"].shape == (RES, RES, 3) and ex["image"].dtype == np.uint8
    assert ex["masks"].shape == (3, RES, RES) and ex["masks"].dtype == np.uint8
    assert isinstance(ex["caption"], str)
    for key in ("shapes", "colors", "sizes", "positions"):
        assert ex[key].shape == (3,) and ex[key].dtype == np.int32
    assert len(shapes.CLASS_NAMES) >= 6 and len(shapes.COLOR_NAMES) >= 8


def test_deterministic_and_varied():
    a = shapes.generate_example(7, "train", RES)
    b = shapes.generate_example(7, "train", RES)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = shapes.generate_example(8, "train", RES)
    d = shapes.generate_example(7, "validation", RES)
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["image"], d["image"])


def test_scene_independent_of_resolution():
    for i in range(5):
        small, big = shapes.generate_example(i, "test", 32), shapes.generate_example(i, "test", 64)
        assert small["caption"] == big["caption"]
        for key in ("label", "shapes", "colors", "sizes", "positions", "num_objects"):
            np.testing.assert_array_equal(small[key], big[key])


def test_label_masks_and_attributes_consistent():
    counts = np.zeros(len(shapes.CLASS_NAMES), int)
    for ex in _examples("train", 200, 64):
        n = int(ex["num_objects"])
        assert 1 <= n <= 3
        assert ex["label"] == ex["shapes"][0]
        counts[ex["label"]] += 1
        for key in ("shapes", "colors", "sizes", "positions"):
            assert (ex[key][:n] >= 0).all() and (ex[key][n:] == -1).all()
        assert len(set(ex["positions"][:n].tolist())) == n
        assert ex["sizes"][0] == ex["sizes"][:n].max()  # main is never smaller
        masks = ex["masks"]
        assert set(np.unique(masks).tolist()) <= {0, 1}
        assert masks.sum(0).max() <= 1  # visible masks are disjoint
        assert (masks[:n].reshape(n, -1).sum(1) > 0).all()
        assert masks[n:].sum() == 0
        # Main object's pixels have (roughly) its colour.
        main_pixels = ex["image"][masks[0] == 1].astype(float)
        target = np.array(shapes.COLOR_RGB[ex["colors"][0]], float)
        assert np.abs(np.median(main_pixels, 0) - target).max() < 40
    assert (counts > 0).all()


def test_captions_name_main_colour_and_shape():
    captions = set()
    for ex in _examples("train", 200):
        main = f"{shapes.COLOR_NAMES[ex['colors'][0]]} {shapes.CLASS_NAMES[ex['label']]}"
        assert main in ex["caption"], ex["caption"]
        assert " a orange" not in ex["caption"] and not ex["caption"].startswith("a orange")
        captions.add(ex["caption"])
    assert len(captions) > 150  # varied


def test_caption_templates_used():
    assert len(shapes.CAPTION_TEMPLATES) >= 6
    single = [ex["caption"] for ex in _examples("train", 60) if ex["num_objects"] == 1]
    assert len(single) > 5


def test_heldout_combos_disjoint():
    assert 0 < len(shapes.HELDOUT_COMBOS) < len(shapes.CLASS_NAMES) * len(shapes.COLOR_NAMES)
    assert {s for s, _ in shapes.HELDOUT_COMBOS} == set(range(len(shapes.CLASS_NAMES)))
    for split in ("train", "validation", "test"):
        for i in range(300):
            objects = shapes._sample_scene(i, split)["objects"]
            for obj in objects:
                assert (obj["shape"], obj["color"]) not in shapes.HELDOUT_COMBOS
    heldout_mains = set()
    for i in range(300):
        main = shapes._sample_scene(i, "heldout")["objects"][0]
        heldout_mains.add((main["shape"], main["color"]))
    assert heldout_mains == set(shapes.HELDOUT_COMBOS)


def test_bad_split_and_resolution():
    with pytest.raises(ValueError, match="split"):
        shapes.generate_example(0, "training", RES)
    with pytest.raises(ValueError, match="resolution"):
        shapes.generate_example(0, "train", 4)


def test_simple_variant_is_the_main_object_on_a_plain_background():
    for i in range(40):
        full, simple = (shapes.generate_example(i, "validation", 32, v) for v in ("full", "simple"))
        assert simple["label"] == full["label"] and simple["num_objects"] == 1
        for key in ("shapes", "colors", "sizes", "positions"):
            assert simple[key][0] == full[key][0] and (simple[key][1:] == -1).all()
        assert not simple["masks"][1:].any() and simple["masks"][0].sum() >= full["masks"][0].sum()
        assert any(simple["caption"] == shapes._a_an(t.format(
            main=d, main_where=w)) for t in shapes.SINGLE_TEMPLATES for w in shapes._WHERE
            for d in (f"{shapes.SIZE_NAMES[full['sizes'][0]]} {shapes.COLOR_NAMES[full['colors'][0]]} "
                      f"{shapes.CLASS_NAMES[full['label']]}",
                      f"{shapes.COLOR_NAMES[full['colors'][0]]} {shapes.CLASS_NAMES[full['label']]}")), simple["caption"]
        # Background: a smooth gradient (no noise / texture): neighbouring background pixels
        # differ by a few levels at most, where the full scene's noise and texture do not.
        obj = np.pad(simple["masks"][0], 2)  # dilated by 2 px: anti-aliased edges are not background
        obj = np.max([np.roll(np.roll(obj, dy, 0), dx_, 1) for dy in range(-2, 3) for dx_ in range(-2, 3)], 0)
        bg = obj[2:-2, 2:-2] == 0
        dx = np.abs(np.diff(simple["image"].astype(int), axis=1))[bg[:, 1:] & bg[:, :-1]]
        assert dx.max() <= 4, dx.max()
    with pytest.raises(ValueError, match="variant"):
        shapes.generate_example(0, "train", RES, "tiny")


@pytest.mark.parametrize("name,config", [("fmjax_shapes", "64"), ("fmjax_shapes/32", "32"),
                                         ("fmjax_shapes/simple_32", "simple_32")])
def test_shapes_names(name, config):
    assert sources._shapes_config(name) == config
    assert sources._shapes_resolution(name) == int(config.rpartition("_")[2])


@pytest.mark.parametrize("name,match", [("fmjax_shapes/simple_33", "resolution '33'"),
                                        ("fmjax_shapes/plain_32", "variant"),
                                        ("fmjax_shapes/full_32", "variant")])
def test_bad_shapes_names(name, match):
    with pytest.raises(ValueError, match=match):
        sources.check_source(name, "train")


def test_simple_variant_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SPLIT_SIZES", dict(train=6, validation=3, test=3, heldout=3))
    sources.prepare_shapes("simple_32", str(tmp_path))
    source = sources.get_source("fmjax_shapes/simple_32", "heldout", data_dir=str(tmp_path))
    assert len(source) == 3
    for i in range(3):
        expected = shapes.generate_example(i, "heldout", 32, "simple")
        np.testing.assert_array_equal(source[i]["image"], expected["image"])
        assert source[i]["caption"] == expected["caption"]


def test_tfds_read_back_without_tensorflow(shapes_data_dir):
    import tensorflow_datasets as tfds
    sources.prepare_shapes(RES, shapes_data_dir)
    for split, size in shapes.SPLIT_SIZES.items():
        ds = tfds.data_source(f"fmjax_shapes/{RES}", split=split, data_dir=shapes_data_dir)
        assert len(ds) == size
    ds = tfds.data_source(f"fmjax_shapes/{RES}", split="heldout", data_dir=shapes_data_dir)
    for i in (0, 5, 999):
        record, expected = ds[i], shapes.generate_example(i, "heldout", RES)
        np.testing.assert_array_equal(record["image"], expected["image"])  # PNG is lossless
        np.testing.assert_array_equal(record["masks"], expected["masks"])
        assert record["label"] == expected["label"]
        assert record["caption"] in (expected["caption"], expected["caption"].encode())
        np.testing.assert_array_equal(record["shapes"], expected["shapes"])
    assert "tensorflow" not in sys.modules


def test_interrupted_preparation_is_redone(tmp_path, monkeypatch):
    """A preparation killed halfway leaves no dataset; the next call redoes it."""
    monkeypatch.setattr(shapes, "SPLIT_SIZES", dict(train=20, validation=4, test=4, heldout=4))
    real = shapes.generate_example
    calls = []

    def flaky(index, split, resolution, variant="full"):
        calls.append(index)
        if len(calls) == 10:
            raise KeyboardInterrupt("simulated interruption")
        return real(index, split, resolution, variant)

    monkeypatch.setattr(shapes, "generate_example", flaky)
    data_dir = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        sources.prepare_shapes(RES, data_dir)
    monkeypatch.setattr(shapes, "generate_example", real)
    builder = sources.prepare_shapes(RES, data_dir)
    assert builder.is_prepared()
    config_dir = tmp_path / "fmjax_shapes" / str(RES)
    assert not [p for p in config_dir.iterdir() if p.name.startswith("incomplete.")]
    source = sources.get_source(f"fmjax_shapes/{RES}", "train", data_dir=data_dir)
    assert len(source) == 20
    np.testing.assert_array_equal(source[19]["image"], real(19, "train", RES)["image"])


def test_silhouette_op_is_the_main_objects_mask():
    """pp op `silhouette`: the main object's visible mask, white on black, RGB uint8; the
    label's shape, nothing of its colour or background. Bad inputs: one-line errors."""
    from fmjax.data import transforms
    ex = shapes.generate_example(3, "validation", 32, variant="simple")
    out = transforms.parse("silhouette")(ex, None)
    img = out["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert set(np.unique(img)) == {0, 255}
    np.testing.assert_array_equal(img[..., 0] == 255, ex["masks"][0] > 0)
    assert (img[..., 0] == 255).sum() > 10
    assert out["label"] == ex["label"] and "image" in ex and ex["image"] is not img
    with pytest.raises(ValueError, match="silhouette: the example has no 'masks'"):
        transforms.parse("silhouette")({"image": img}, None)
    with pytest.raises(ValueError, match="silhouette: index 5 needs masks"):
        transforms.parse("silhouette(5)")(ex, None)
