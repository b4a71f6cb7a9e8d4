"""Workdirs in a bucket: ``gs://`` paths go through etils.epath (our files) and Orbax (the
checkpoints), never through ``os``. The bucket is local-emulated (``fmjax.testing.
install_fake_gcs``: fsspec's gcs protocol and Orbax's GCS kvstore mapped to a folder), so
nothing contacts the network, and a plain ``open('gs://...')`` would fail."""
import json
import os

import jax
import numpy as np
import pytest

from fmjax import testing
from fmjax.train import files
from fmjax.train import workdir as workdir_lib


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket_root"
    undo = testing.install_fake_gcs(str(root))
    monkeypatch.chdir(tmp_path)  # a stray local 'gs:' folder would appear here
    yield root
    undo()


def test_resolve_keeps_urls_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert workdir_lib.resolve("gs://b/wd/") == "gs://b/wd"
    assert workdir_lib.resolve("~/wd") == str(tmp_path / "wd")
    assert files.join("gs://b/wd", "checkpoints", "3") == "gs://b/wd/checkpoints/3"


def test_append_file_buffers_on_a_bucket(bucket):
    f = files.AppendFile("gs://b/m.jsonl", flush_secs=3600)
    files.makedirs("gs://b")
    f.write("1\n")
    assert not files.exists("gs://b/m.jsonl")  # buffered ...
    f.flush()
    f.write("2\n")
    f.close()  # ... and written at flush / close
    assert files.read_text("gs://b/m.jsonl") == "1\n2\n"
    assert (bucket / "b" / "m.jsonl").read_text() == "1\n2\n"


def test_train_and_resume_in_a_bucket(bucket, tiny_config, tmp_path):
    from fmjax.train.loop import train_and_evaluate
    config = tiny_config("mae", total_steps=4, checkpoint_every=2)
    first = train_and_evaluate(config, "gs://fmjax-test/runs/mae")
    local = bucket / "fmjax-test" / "runs" / "mae"
    assert sorted(os.listdir(local / "checkpoints")) == ["2", "4"]
    assert json.loads((local / "config.json").read_text())["total_steps"] == 4
    rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(local))  # staged, then copied up
    assert json.loads((local / "final_metrics.json").read_text())["step"] == 4
    assert not os.path.exists(tmp_path / "gs:")  # nothing took the URL for a local path

    # Resume for 2 more steps from the bucket's checkpoint 4: the same as the same two runs
    # in a local workdir, params included.
    local_first = train_and_evaluate(config, str(tmp_path / "local"))
    assert local_first["train/loss"] == pytest.approx(first["train/loss"], rel=1e-6)
    config.total_steps = 6
    resumed = train_and_evaluate(config, "gs://fmjax-test/runs/mae")
    local_resumed = train_and_evaluate(config, str(tmp_path / "local"))
    assert resumed["step"] == 6
    assert resumed["train/loss"] == pytest.approx(local_resumed["train/loss"], rel=1e-6)
    a, b = testing.checkpoint_params("gs://fmjax-test/runs/mae"), testing.checkpoint_params(str(tmp_path / "local"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert not os.path.exists(tmp_path / "gs:")


def test_bucket_data_dir_is_kept():
    from fmjax.data import sources
    assert sources.default_data_dir("gs://b/tfds/") == "gs://b/tfds"


def test_png_into_a_bucket(bucket):
    import numpy as np
    from fmjax.evals.images import save_png
    save_png("gs://b/samples/x.png", np.zeros((4, 4, 3), np.uint8))
    assert (bucket / "b" / "samples" / "x.png").read_bytes()[:4] == b"\x89PNG"
