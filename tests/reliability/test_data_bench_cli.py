"""launch/data_bench.py: runs a config's training pipeline on synthetic JPEGs and reports
examples/s and examples per core-second; bad flags are one line."""
import json

import pytest

from fmjax import testing


@pytest.mark.parametrize("config", ["configs/mae.py", "configs/dino.py", "configs/clip.py"])
def test_reports_a_rate(config, tmp_path):
    out = tmp_path / "r.json"
    proc = testing.run_cli("data_bench", f"--config={config}", "--batches=2", "--warmup=1", "--batch_size=4",
                           "--num_images=2", "--image_size=64", f"--out={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["examples_per_s"] > 0 and result["examples_per_s_per_core"] > 0
    assert result["batch_shapes"] and "examples/s" in proc.stdout


def test_bpe_preset_runs_with_a_stand_in(tmp_path):
    proc = testing.run_cli("data_bench", "--config=configs/clip.py:vit_b16", "--batches=1", "--warmup=0",
                           "--batch_size=2", "--num_images=1", "--image_size=64", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'words' tokenizer stands in" in proc.stdout


@pytest.mark.parametrize("flag,text", [("--batches=0", "--batches must be at least 1"),
                                       ("--workers=-1", "--warmup and --workers must be 0 or more"),
                                       ("--out=/no/such/dir/r.json", "does not exist")])
def test_bad_flags_are_one_line(flag, text):
    proc = testing.run_cli("data_bench", "--config=configs/mae.py", flag, timeout=120)
    testing.assert_one_line_error(proc, text)
