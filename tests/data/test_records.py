"""Sharded sources: the FMJ1 record format, ``array_record:`` and ``wds:`` names, their
split / glob rules and one-line errors, index sidecars, and picklability."""
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from fmjax.data import bad_examples, records, shard_files, sources, wds
from fmjax.errors import DataError


def _examples(n, size=(9, 11)):
    rng = np.random.default_rng(0)
    return [dict(image=rng.integers(0, 256, size + (3,), dtype=np.uint8), caption=f"a shape número {i}",
                 label=i % 3, masks=rng.integers(0, 2, (2,) + size, dtype=np.uint8),
                 num_objects=np.int32(i), score=0.5 + i, flag=bool(i % 2), tags=["x", "y"],
                 extra=dict(depth=np.float32(i) / 4, note="n"))
            for i in range(n)]


def _assert_example(got, want):
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["image"].dtype == np.uint8 and got["image"].shape == want["image"].shape
    assert got["caption"] == want["caption"] and got["label"] == want["label"]
    assert isinstance(got["label"], int)
    np.testing.assert_array_equal(got["masks"], want["masks"])
    assert got["masks"].dtype == np.uint8
    assert got["num_objects"] == want["num_objects"] and got["num_objects"].dtype == np.int32
    assert got["score"] == want["score"] and got["flag"] is want["flag"] and got["tags"] == ["x", "y"]
    assert got["extra"]["depth"] == want["extra"]["depth"] and got["extra"]["depth"].dtype == np.float32


# -- the record format ----------------------------------------------------------------------------

def test_record_roundtrip_and_layout():
    ex = _examples(2)[1]
    rec = records.encode_record(ex)
    assert rec[:4] == b"FMJ1"
    (n,) = struct.unpack("<I", rec[4:8])
    header = json.loads(rec[8:8 + n].decode("utf-8"))  # plain JSON: readable without fmjax
    assert header["caption"] == ex["caption"] and header["label"] == 1
    off, length = header["image"]["$image"]
    png = rec[8 + n + off: 8 + n + off + length]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert header["masks"]["$array"][2:] == ["|u1", [2, 9, 11]]
    _assert_example(records.decode_record(rec), ex)
    # Encoded bytes are stored untouched; decode_images=False gives them back.
    jpeg = io.BytesIO()
    Image.fromarray(ex["image"]).save(jpeg, format="JPEG")
    rec = records.encode_record(dict(image=records.EncodedImage(jpeg.getvalue()), raw=b"\x00\x01"))
    back = records.decode_record(rec, decode_images=False)
    assert bytes(back["image"]) == jpeg.getvalue() and back["raw"] == b"\x00\x01"
    assert records.decode_record(rec)["image"].shape == (9, 11, 3)
    # Grayscale images come back RGB; non-finite floats survive.
    gray = records.encode_record(dict(image=np.full((4, 5), 7, np.uint8), x=float("nan")))
    out = records.decode_record(gray)
    assert out["image"].shape == (4, 5, 3) and (out["image"] == 7).all() and np.isnan(out["x"])
    with pytest.raises(ValueError, match="not an FMJ1 record"):
        records.decode_record(b"\x0a\x0bsomething")
    with pytest.raises(ValueError, match=r"keys must be strings not starting with '\$'"):
        records.encode_record({"$image": 1})


# -- array_record: -------------------------------------------------------------------------------

@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    exs = _examples(11)
    records.write_shards(exs, str(d), "train", 3)
    records.write_shards(exs[:4], str(d), "validation", 1)
    return str(d), exs


def test_array_record_source_reads_in_order_and_pickles(shard_dir):
    d, exs = shard_dir
    src = sources.get_source(f"array_record:{d}", "train")
    assert len(src) == 11
    for i in (0, 3, 4, 10):  # across the three files (3, 4, 4 records)
        _assert_example(src[i], exs[i])
    assert len(sources.get_source(f"array_record:{d}", "validation")) == 4
    src2 = pickle.loads(pickle.dumps(src))  # grain worker processes
    _assert_example(src2[7], exs[7])
    # A glob with {split}, a glob without (train only), a single file.
    assert len(sources.get_source(f"array_record:{d}/{{split}}-*.array_record", "validation")) == 4
    assert len(sources.get_source(f"array_record:{d}/train-0000[01]-*", "train")) == 7
    one = os.path.join(d, "validation-00000-of-00001.array_record")
    assert len(sources.get_source(f"array_record:{one}", "train")) == 4
    # Sub-folder per split.
    os.makedirs(os.path.join(d, "heldout"))
    records.write_shards(exs[:2], os.path.join(d, "heldout"), "part", 2)
    assert len(sources.get_source(f"array_record:{d}", "heldout")) == 2


def test_array_record_errors_are_one_line(shard_dir, tmp_path):
    d, _ = shard_dir
    with pytest.raises(FileNotFoundError) as e:
        sources.check_source(f"array_record:{d}", "test")
    msg = str(e.value)
    assert "\n" not in msg and f"No 'test' ArrayRecord shards in '{d}'" in msg
    # 'train-extra-*' files are not 'train' shards.
    records.write_shards(_examples(1), d, "train-extra", 1)
    assert len(sources.get_source(f"array_record:{d}", "train")) == 11
    assert "splits found: ['train', 'validation']" in msg and "launch/make_shards.py" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.check_source(f"array_record:{tmp_path}/nowhere", "train")
    with pytest.raises(FileNotFoundError, match="No ArrayRecord shards match"):
        sources.check_source(f"array_record:{d}/{{split}}-9*.array_record", "train")
    with pytest.raises(ValueError, match=r"has no \{split\} in it, so it only names the 'train' split"):
        sources.check_source(f"array_record:{d}/train-*.array_record", "validation")
    with pytest.raises(ValueError, match="Bad dataset name"):
        sources.check_source("array_record:", "train")
    with pytest.raises(ValueError, match="take none"):
        sources.get_source(f"array_record:{d}", "train", captions_file="x")
    # A file that is not ArrayRecord: one line when the source is opened.
    bad = tmp_path / "junk"
    bad.mkdir()
    (bad / "train-00000-of-00001.array_record").write_bytes(b"not an array record file" * 10)
    with pytest.raises(DataError, match="is not a readable ArrayRecord file"):
        sources.get_source(f"array_record:{bad}", "train")


def test_bad_record_is_a_bad_example_and_can_be_skipped(tmp_path):
    exs = _examples(3)
    path = str(tmp_path / "train-00000-of-00001.array_record")
    with records.ShardWriter(path) as w:
        w.write(exs[0])
        w.write_record(b"garbage, not FMJ1")
        w.write(dict(image=records.EncodedImage(b"\xff\xd8 truncated jpeg"), label=1))
        w.write(exs[2])
    src = sources.get_source(f"array_record:{tmp_path}", "train")
    with pytest.raises(bad_examples.BadExampleError, match=r"record 1 of .*train-00000-of-00001"):
        src[1]
    with pytest.raises(bad_examples.BadExampleError, match="record 2 of"):
        src[2]
    skipping = sources.get_source(f"array_record:{tmp_path}", "train", skip_bad_examples=2)
    _assert_example(skipping[1], exs[2])


def test_summary_counts_and_class_names(shard_dir, monkeypatch):
    d, _ = shard_dir
    files = shard_files.find_shards("array_record", f"array_record:{d}", "train", "array_record", "x")
    shard_files.write_summary(d, "train", "array_record", files, [3, 4, 4], ["a", "b", "c"], "test")
    assert sources.class_names(f"array_record:{d}") == ["a", "b", "c"]
    assert sources.num_classes(f"array_record:{d}") == 3
    opened = []
    monkeypatch.setattr(records, "count_records", lambda f: opened.append(f) or 0)
    assert len(sources.get_source(f"array_record:{d}", "train")) == 11 and not opened
    # A summary that lists other files is ignored (the files are counted).
    assert shard_files.summary_counts(files[:2], "array_record") is None


# -- wds: --------------------------------------------------------------------------------------------

def _write_tars(d, exs, shards=2, split="train"):
    os.makedirs(d, exist_ok=True)
    paths = []
    for k in range(shards):
        path = os.path.join(d, shard_files.shard_name(split, k, shards, "tar"))
        lo, hi = k * len(exs) // shards, (k + 1) * len(exs) // shards
        with wds.TarShardWriter(path) as w:
            for i in range(lo, hi):
                w.write(exs[i], key=f"s{i:04d}")
        paths.append(path)
    return paths


def test_wds_source_reads_samples_and_caches_its_index(tmp_path):
    exs = _examples(9)
    d = str(tmp_path / "wds")
    paths = _write_tars(d, exs)
    src = sources.get_source(f"wds:{d}", "train")
    assert len(src) == 9
    for i in (0, 4, 5, 8):
        ex = src[i]
        np.testing.assert_array_equal(ex["image"], exs[i]["image"])
        assert ex["caption"] == exs[i]["caption"] and ex["label"] == exs[i]["label"]
        assert ex["num_objects"] == i and ex["score"] == exs[i]["score"]  # scalars via .json
        assert "masks" not in ex  # arrays have no webdataset member
    assert src[5]["file_name"] == "train-00001-of-00002.tar/s0005"
    # The index sidecars were written, and are used (no tar header is read again).
    assert all(os.path.isfile(wds.index_path(p)) for p in paths)
    calls = []
    real = wds.build_index
    wds.build_index = lambda p: calls.append(p) or real(p)
    try:
        src = sources.get_source(f"wds:{d}", "train")
        assert len(src) == 9 and src[3]["label"] == 0 and not calls
        # A copied tar (new mtime, same bytes) keeps its sidecar; a changed tar is reindexed.
        os.utime(paths[0], ns=(1, 1))
        assert wds.load_index(paths[0]) is not None
        _write_tars(d, exs[5:8], shards=1, split="tmp")
        os.replace(os.path.join(d, "tmp-00000-of-00001.tar"), paths[0])
        calls.clear()
        src = sources.get_source(f"wds:{d}", "train")
        assert calls == [paths[0]] and len(src) == 3 + 5
        assert src[0]["caption"] == exs[5]["caption"]
    finally:
        wds.build_index = real
    pickled = pickle.loads(pickle.dumps(src))
    assert pickled[7]["caption"] == exs[8]["caption"]


def test_wds_read_only_folder_keeps_the_index_in_memory(tmp_path, monkeypatch):
    exs = _examples(4)
    d = str(tmp_path / "ro")
    paths = _write_tars(d, exs, shards=1)
    os.remove(wds.index_path(paths[0]))
    monkeypatch.setattr(wds, "save_index", lambda *a: False)  # as if the folder were read-only
    src = wds.WdsSource(paths)
    assert len(src) == 4 and not os.path.exists(wds.index_path(paths[0]))
    again = pickle.loads(pickle.dumps(src))  # the in-memory index travels with the source
    monkeypatch.setattr(wds, "build_index", lambda p: pytest.fail("reindexed"))
    assert again[2]["caption"] == exs[2]["caption"]


def test_wds_plain_webdataset_tar_and_errors(tmp_path, capsys):
    """A tar written by other tools: nested keys, upper-case extensions, a .json, a sample
    without an image (skipped with a warning), unrelated members."""
    d = tmp_path / "plain"
    d.mkdir()
    img = io.BytesIO()
    Image.fromarray(np.full((5, 6, 3), 200, np.uint8)).save(img, format="JPEG")
    members = [("dir/a1.JPG", img.getvalue()), ("dir/a1.txt", b"first\n"), ("dir/a1.cls", b" 4\n"),
               ("dir/a1.json", b'{"url": "http://x", "caption": "ignored"}'),
               ("dir/b2.txt", b"no image"), ("dir/c3.png", _png()), ("README", b"hi")]
    with tarfile.open(d / "train-00000-of-00001.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = sources.get_source(f"wds:{d}", "train")
    assert "1 sample(s) without an image member" in capsys.readouterr().err
    assert len(src) == 2
    a = src[0]
    assert a["image"].shape == (5, 6, 3) and a["caption"] == "first" and a["label"] == 4
    assert a["url"] == "http://x" and a["file_name"] == "train-00000-of-00001.tar/dir/a1"
    assert set(src[1]) == {"image", "file_name"}
    # Compressed tars cannot be read at random: one line naming the fix.
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "train-00000-of-00001.tar", "w:gz") as tf:
        info = tarfile.TarInfo("x.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match="compressed tar, which cannot be read at random"):
        sources.get_source(f"wds:{gz}", "train")
    with pytest.raises(FileNotFoundError, match=r"No 'validation' webdataset tar shards .*--format=wds"):
        sources.check_source(f"wds:{d}", "validation")


def _png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_many_shards_are_counted_and_indexed_in_threads(tmp_path):
    exs = _examples(13)
    records.write_shards(exs, str(tmp_path / "ar"), "train", 6)
    src = sources.get_source(f"array_record:{tmp_path / 'ar'}", "train")
    assert src.counts == [2, 2, 2, 2, 2, 3]
    _assert_example(src[12], exs[12])
    paths = _write_tars(str(tmp_path / "tars"), exs, shards=6)
    for p in paths:
        os.remove(wds.index_path(p))
    src = sources.get_source(f"wds:{tmp_path / 'tars'}", "train")
    assert src.counts == [2, 2, 2, 2, 2, 3] and src[12]["caption"] == exs[12]["caption"]
    assert all(os.path.isfile(wds.index_path(p)) for p in paths)
