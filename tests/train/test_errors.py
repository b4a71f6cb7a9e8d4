"""Every bad-input case ends with one clear line naming the problem and the fix, before compiling."""
import os
import subprocess
import sys

import pytest

from fmjax.train import loop
from fmjax.train.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _error(config, workdir) -> str:
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(config, str(workdir))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_model(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"model.name": "vitt"}), tmp_path)
    assert "Unknown model 'vitt'" in msg and "'mae'" in msg and "'vit'" in msg


def test_unknown_objective(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"objective.name": "maee"}), tmp_path)
    assert "Unknown objective 'maee'" in msg and "'mae'" in msg and "'supervised'" in msg


def test_unknown_variant(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"model.variant": "Q/16"}), tmp_path)
    assert "Q/16" in msg and "B/<patch>" in msg


def test_unknown_mae_feature(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"objective.feature": "pooled"}), tmp_path)
    assert "config.objective.feature='pooled'" in msg and "valid: gap, mean, cls" in msg


def test_unknown_dataset(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"data.name": "fmjax_shapez"}), tmp_path)
    assert "fmjax_shapez" in msg and "fmjax_shapes" in msg


def test_missing_tfds_dataset_says_how_to_prepare(tiny_config, tmp_path):
    c = tiny_config("mae", **{"data.name": "mnist"})
    c.data.data_dir = str(tmp_path / "empty_tfds")
    msg = _error(c, tmp_path / "wd")
    assert "mnist" in msg and "tfds build mnist" in msg and "not prepared" in msg


def test_image_size_not_divisible_by_patch(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", **{"data.image_size": 30}), tmp_path)
    assert "30" in msg and "patch size 8" in msg


def test_batch_not_divisible_by_data_parallel(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", batch_size=12, mesh={"data": 8, "fsdp": 1, "tensor": 1}), tmp_path)
    assert "batch_size=12" in msg and "data-parallel size 8" in msg


def test_tokenizer_vocab_larger_than_the_text_tower(tiny_config, tmp_path):
    msg = _error(tiny_config("clip", **{"model.vocab_size": 1000}), tmp_path)
    assert "WordHashTokenizer(vocab_size=2048)" in msg and "vocab_size is 1000" in msg
    assert "set the model's vocab_size to 2048" in msg
    msg = _error(tiny_config("clip", **{"data.tokenize.tokenizer": "clip_bpe",
                                         "data.tokenize.bpe_path": str(tmp_path / "no.txt.gz")}),
                 tmp_path / "wd")
    assert msg.startswith("config.data.tokenize:") and "no.txt.gz" in msg


def test_pipeline_missing_a_batch_key(tiny_config, tmp_path):
    c = tiny_config("clip")
    c.data.pp_train = c.data.pp_train.replace(", 'neg_tokens', 'neg_valid'", "")
    msg = _error(c, tmp_path)
    assert "gives ['image', 'tokens']" in msg and "add ['neg_tokens', 'neg_valid']" in msg
    assert "swap_words" in msg and not os.listdir(tmp_path)


@pytest.mark.parametrize("key, value, expected", [
    ("evals.bad", dict(type="nope"), "config.evals.bad.type='nope'; valid: ['amg_recall', 'box_ap', 'captioning', 'fewshot', 'generation', 'images', 'itm', 'knn'"),
    ("data.pp_train", "resize(32)|nosuchop", "config.data.pp_train: unknown op 'nosuchop'"),
    ("data.pp_eval", "resize(", "config.data.pp_eval: cannot parse op 'resize('"),
    ("data.pp_train", "keep('nope')", "config.data.pp_train fails on the first training example"),
])
def test_bad_evals_and_pp_strings(tiny_config, tmp_path, key, value, expected):
    c = tiny_config("mae")
    section, name = key.split(".")
    c[section][name] = value
    msg = _error(c, tmp_path)
    assert expected in msg, msg
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)


def test_impossible_mesh(tiny_config, tmp_path):
    msg = _error(tiny_config("mae", mesh={"data": 3, "fsdp": 1, "tensor": 1}), tmp_path)
    assert "config.mesh" in msg


def test_cli_prints_one_line_and_exits_nonzero(shapes_data_dir, tmp_path):
    """The launcher turns the error into one stderr line and exit code 2 (no traceback)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/mae.py", f"--workdir={tmp_path}",
         "--config.objective.name=nope", f"--config.data.data_dir={shapes_data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fmjax: error:")]
    assert len(errors) == 1 and "Unknown objective 'nope'" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/mae.py", "--config.keep=3"],
     ["unknown config key 'config.keep'", "keep_checkpoints"]),
    (["--config=configs/mae.py", "--config.model.widht=64"],
     ["unknown config key 'config.model.widht'", "valid keys of config.model:", "width"]),
    (["--config=configs/mae.py", "--config.total_steps=ten"],
     ["--config.total_steps=ten", "invalid literal for int()"]),
    (["--config=configs/nosuch.py"], ["config file 'configs/nosuch.py' not found"]),
    (["--config=configs/mae.py:nope"], ["Unknown configs/mae.py preset 'nope'", "valid: default"]),
    (["--config=configs/mae.py", "--no_such_flag=1"], ["Unknown command line flag 'no_such_flag'"]),
])
@pytest.mark.parametrize("script", ["train", "eval"])
def test_cli_bad_flags_one_line(script, args, expected, tmp_path):
    """Bad flags or config overrides: one line and exit code 2, before jax is imported."""
    proc = subprocess.run([sys.executable, f"launch/{script}.py", f"--workdir={tmp_path}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmjax: error:"), proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert not os.listdir(tmp_path)
