"""Bad input data ends in one ``DataError`` line naming the file and the fix (issue 11, item 10).

Covers a corrupt or truncated image mid-epoch (and ``config.data.skip_bad_examples``), mixed
image sizes in a batch, and bad captions files: first at the source / pipeline level, then
through the real ``launch/train.py``.
"""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fmjax.data import pipeline, sources
from fmjax.errors import DataError
from fmjax.testing import assert_one_line_error, run_cli

SKIP_KEY = "skip_bad_examples"


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _make_folder(root, n=12, split="train", size=32, sizes=None, seed=0):
    """``root/<split>/c{0,1}/NNN.png``: ``n`` random images; returns their paths in source order."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = sizes[i] if sizes else size
        path = root / split / f"c{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(path)
    return sources.get_source(f"image_folder:{root}", split).paths


def _corrupt(path, kind="truncated"):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": data[: len(data) // 2], "garbage": b"this is not an image\n" * 8,
                 "empty": b""}[kind])


def _read_all(source, n_batches, bs=4, **kw):
    it = pipeline.make_train_iterator(source, global_batch_size=bs, transform="keep('image', 'label')",
                                      seed=0, shuffle=False, **kw)
    try:
        return [next(it) for _ in range(n_batches)]
    finally:
        if kw.get("worker_count"):
            it.close()


# -- 1. A corrupt image. ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_image_is_one_line_data_error(tmp_path, kind):
    paths = _make_folder(tmp_path / "imgs")
    _corrupt(paths[6], kind)
    source = sources.get_source(f"image_folder:{tmp_path / 'imgs'}", "train")
    with pytest.raises(DataError) as excinfo:  # raised by next(), unwrapped, message intact
        _read_all(source, 3)
    message = _one_line(excinfo)
    assert paths[6] in message and "replace or remove" in message and SKIP_KEY in message, message


def test_corrupt_image_with_worker_processes(tmp_path):
    """A grain worker process re-raises the DataError in the trainer, type and message intact."""
    paths = _make_folder(tmp_path / "imgs", n=8)
    _corrupt(paths[5])
    source = sources.get_source(f"image_folder:{tmp_path / 'imgs'}", "train")
    with pytest.raises(DataError) as excinfo:
        _read_all(source, 2, worker_count=1)
    assert paths[5] in _one_line(excinfo)


def test_skip_bad_examples(tmp_path, capfd):
    paths = _make_folder(tmp_path / "imgs", n=12)
    good = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for i in (3, 7):
        _corrupt(paths[i])
    name = f"image_folder:{tmp_path / 'imgs'}"
    source = sources.get_source(name, "train", skip_bad_examples=2)
    batches = _read_all(source, 6)  # two epochs: each bad file is met twice, counted once
    images = np.concatenate([b["image"] for b in batches])
    for pos in range(24):  # a bad example is replaced by the next readable one, deterministically
        i = pos % 12
        np.testing.assert_array_equal(images[pos], good[i + 1 if i in (3, 7) else i])
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("fmjax: warning:")]
    assert len(warnings) == 2, warnings
    assert paths[3] in warnings[0] + warnings[1] and paths[7] in warnings[0] + warnings[1]
    # Picklable (grain workers), same batches; resuming from a saved iterator state gives the rest.
    clone = pickle.loads(pickle.dumps(source))
    it = pipeline.make_train_iterator(clone, global_batch_size=4, transform="keep('image')", seed=0)
    for _ in range(2):
        next(it)
    state = it.get_state()
    rest = [next(it)["image"] for _ in range(3)]
    it2 = pipeline.make_train_iterator(sources.get_source(name, "train", skip_bad_examples=2),
                                       global_batch_size=4, transform="keep('image')", seed=0)
    it2.set_state(state)
    for a in rest:
        np.testing.assert_array_equal(a, next(it2)["image"])
    # One bad file past the budget is the DataError.
    _corrupt(paths[9])
    over = sources.get_source(name, "train", skip_bad_examples=2)
    with pytest.raises(DataError) as excinfo:
        _read_all(over, 3)
    message = _one_line(excinfo)
    assert paths[9] in message and f"{SKIP_KEY}=2" in message, message


def test_tfds_read_error_is_data_error():
    """A record the TFDS reader cannot decode (fmjax_shapes, catalog datasets) is a DataError too."""
    class Broken:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise OSError("corrupt record")
            return {"image": np.zeros((4, 4, 3), np.uint8), "label": 0}

    source = object.__new__(sources.TfdsSource)
    source.name, source.split, source.data_dir, source._len, source._source = (
        "fmjax_shapes/32", "train", "/data", 3, Broken())
    assert source[0]["label"] == 0
    with pytest.raises(DataError) as excinfo:
        source[1]
    message = _one_line(excinfo)
    assert "example 1" in message and "fmjax_shapes/32" in message and SKIP_KEY in message


# -- 2. Mixed image sizes. ----------------------------------------------------------------------------
def test_mixed_sizes_in_eval_batch(tmp_path):
    _make_folder(tmp_path / "imgs", n=6, split="validation", sizes=[32, 32, 32, 48, 32, 32])
    source = sources.get_source(f"image_folder:{tmp_path / 'imgs'}", "validation")
    it = pipeline.make_eval_iterator(source, global_batch_size=4,
                                     transform="normalize('imagenet')|keep('image', 'label')")
    with pytest.raises(DataError) as excinfo:
        list(it)
    message = _one_line(excinfo)
    for text in ("'image'", "(32, 32, 3)", "(48, 48, 3)", "config.data.pp_eval", "resize("):
        assert text in message, message
    # With a resize in pp_eval every batch has one shape.
    it = pipeline.make_eval_iterator(source, global_batch_size=4,
                                     transform="resize(32)|center_crop(32)|keep('image', 'label')")
    assert [b["image"].shape for b in it] == [(4, 32, 32, 3)] * 2


def test_mixed_sizes_in_train_batch(tmp_path):
    _make_folder(tmp_path / "imgs", n=8, sizes=[32, 32, 48, 32, 32, 32, 32, 32])
    source = sources.get_source(f"image_folder:{tmp_path / 'imgs'}", "train")
    with pytest.raises(DataError) as excinfo:
        _read_all(source, 2)
    message = _one_line(excinfo)
    for text in ("'image'", "(32, 32, 3)", "(48, 48, 3)", "config.data.pp_train", "resize("):
        assert text in message, message
    # Every batch of one size, but not the size the step was compiled for (example_shapes).
    same = _make_folder(tmp_path / "same", n=8, sizes=[32, 48] * 4)  # c0/*: 32x32, then c1/*: 48x48
    assert len(same) == 8
    it = pipeline.make_train_iterator(sources.get_source(f"image_folder:{tmp_path / 'same'}", "train"),
                                      global_batch_size=4, transform="keep('image')", seed=0,
                                      shuffle=False, example_shapes={"image": (32, 32, 3)})
    assert next(it)["image"].shape == (4, 32, 32, 3)
    with pytest.raises(DataError) as excinfo:
        next(it)
    message = _one_line(excinfo)
    assert "(48, 48, 3)" in message and "(32, 32, 3)" in message and "config.data.pp_train" in message


# -- 3. Captions files. -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, lines, fragment", [
    ("captions.jsonl", ['{"image": "c0/000.png", "caption": "ok"}', '{oops'], "captions.jsonl:2: invalid JSON"),
    ("captions.jsonl", ['{"image": "c0/000.png"}'], 'captions.jsonl:1: need keys "image" and "caption"'),
    ("captions.jsonl", ['["c0/000.png", "a caption"]'], "captions.jsonl:1: expected a JSON object"),
    ("captions.jsonl", ['{"image": "c0/000.png", "caption": ["a", "b"]}'], "captions.jsonl:1: the caption"),
    ("captions.jsonl", ['{"image": "c0/000.png", "caption": "ok"}', '{"image": "c1/001.png", "caption": " "}'],
     "captions.jsonl:2: empty caption"),
    ("captions.jsonl", ['{"image": "c0/000.png", "caption": "ok"}', '{"image": "c0/nope.png", "caption": "x"}'],
     "captions.jsonl:2: image 'c0/nope.png' does not exist"),
    ("captions.tsv", ["c0/000.png\tok", "c1/001.png\t"], "captions.tsv:2: empty caption"),
    ("captions.tsv", ["c0/000.png\tok", "c1/001.png"], "captions.tsv:2: expected"),
    ("captions.tsv", ["c0/000.png\tok"], "no caption for image"),
    ("captions.tsv", [b"c0/000.png\tok", b"c1/001.png\t\xff\xfe"], "captions.tsv:2: not UTF-8"),
])
def test_bad_captions_file(tmp_path, name, lines, fragment):
    _make_folder(tmp_path / "imgs", n=2)
    path = tmp_path / "imgs" / "train" / name
    if isinstance(lines[0], bytes):
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as excinfo:
        sources.get_source(f"image_folder:{tmp_path / 'imgs'}", "train")
    message = _one_line(excinfo)
    assert fragment in message and str(path) in message, message
    assert any(fix in message for fix in ("write", "fix", "remove", "add", "save")), message


# -- Through the real CLI. ----------------------------------------------------------------------------
TINY_MAE_FLAGS = [
    "--config.batch_size=16", "--config.log_every=1", "--config.eval_every=0",
    "--config.eval_at_start=False", "--config.optimizer.warmup_steps=2",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
]


class _Positions:
    """A source whose example ``i`` is ``i``: read through the trainer's pipeline, it shows
    which source example lands at which position of the training stream."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": np.int64(i)}


def _stream_order(n, batch_size, seed=0):
    it = pipeline.make_train_iterator(_Positions(n), global_batch_size=batch_size, transform=None,
                                      seed=seed, process_index=0, process_count=1)
    return np.concatenate([next(it)["i"] for _ in range(n // batch_size)])


def _checkpoint_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


@pytest.mark.slow
def test_cli_corrupt_image_mid_epoch_then_resume_skipping_it(tmp_path):
    """Step 3's batch holds a truncated PNG: one line naming it, exit 2, and the checkpoints of
    steps 1-2 survive. A resume with skip_bad_examples=1 restores step 2 and finishes with a
    warning naming the file."""
    root, workdir = tmp_path / "imgs", str(tmp_path / "wd")
    paths = _make_folder(root, n=64)
    order = _stream_order(64, 16)
    bad = paths[order[40]]  # the 9th example of step 3's batch: mid-epoch, after two checkpoints
    assert order[40] != 0  # example 0 is read by the config check
    _corrupt(bad)
    flags = ["--config=configs/mae.py", f"--workdir={workdir}", f"--config.data.name=image_folder:{root}",
             "--config.total_steps=8", "--config.checkpoint_every=1", "--config.keep_checkpoints=5"] + TINY_MAE_FLAGS
    proc = run_cli("train", *flags)
    line = assert_one_line_error(proc, os.path.basename(bad), SKIP_KEY)
    assert bad in line
    assert "[step 2/8]" in proc.stdout and "[step 3/8]" not in proc.stdout, proc.stdout[-2000:]
    steps = _checkpoint_steps(workdir)
    assert 2 in steps, (f"checkpoints {steps}: the step-2 save still in flight when the DataError was "
                        "raised was not finished (the loop's `finally` should wait for pending saves)")
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))

    proc = run_cli("train", *flags, f"--config.data.{SKIP_KEY}=1")
    assert proc.returncode == 0, ("resume with skip_bad_examples=1 failed (is config.data.skip_bad_examples "
                                  f"passed to sources.get_source in the loop?):\n{proc.stderr[-3000:]}")
    assert "resuming from step 2" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("fmjax: warning:") and bad in ln]
    assert len(warnings) == 1, proc.stderr[-3000:]
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        assert json.load(f)["step"] == 8


@pytest.mark.parametrize("lines, fragment", [
    (['{"image": "c0/000.png", "caption": "a red square"}', '{"image": "c1/001.png", "caption": "a blue'],
     "captions.jsonl:2: invalid JSON"),
    (['{"image": "c0/000.png", "caption": "a red square"}', '{"image": "c1/001.png", "caption": ""}'],
     "captions.jsonl:2: empty caption"),
])
def test_cli_bad_captions_file(tmp_path, lines, fragment):
    root, workdir = tmp_path / "imgs", tmp_path / "wd"
    _make_folder(root, n=32)
    rows = [json.dumps({"image": f"c{i % 2}/{i:03d}.png", "caption": f"picture {i}"}) for i in range(2, 32)]
    (root / "train" / "captions.jsonl").write_text("\n".join(lines + rows) + "\n")
    proc = run_cli("train", "--config=configs/mae.py", f"--workdir={workdir}",
                   f"--config.data.name=image_folder:{root}", "--config.total_steps=2", *TINY_MAE_FLAGS)
    assert_one_line_error(proc, fragment, str(root / "train" / "captions.jsonl"))
    assert not os.path.exists(workdir / "checkpoints")

