"""The eval registry and the config checks of ``config.evals`` (fmjax/evals/registry.py,
common.py; fmjax/train/validate.check_evals): one-line errors before anything is compiled."""
import os
import subprocess
import sys

import jax
import pytest

from fmjax.errors import ConfigError
from fmjax.evals import common, registry
from fmjax.testing import REPO, cli_env
from fmjax.train import loop, setup, validate

ONE_DEVICE = jax.devices()[:1]


def test_get_imports_the_type_module_lazily():
    code = ("import sys; from fmjax.evals import registry; "
            "assert 'fmjax.evals.fewshot' not in sys.modules; cls = registry.get('fewshot'); "
            "assert cls.__module__ == 'fmjax.evals.fewshot' and cls.type_name == 'fewshot'; "
            "assert 'fmjax.evals.zero_shot' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("bad", ["nope", "common", "registry", "attention", None, "../knn", 3])
def test_unknown_type_is_one_line_naming_the_valid_ones(bad):
    with pytest.raises(ConfigError) as e:
        registry.get(bad, "config.evals.x.type")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config.evals.x.type={bad!r}; valid: [")
    for name in ("fewshot", "generation", "images", "knn", "linear_probe", "loss", "metrics",
                 "retrieval", "zero_shot"):
        assert f"'{name}'" in msg
    valid = msg.split("; valid: ", 1)[1]
    assert "'common'" not in valid and "'registry'" not in valid and "'attention'" not in valid


def test_every_registered_type_is_its_module():
    for name in registry.names():
        cls = registry.get(name)
        assert issubclass(cls, common.Evaluator) and cls.__module__ == f"fmjax.evals.{name}"


def _check(config, data_for=None):
    objective, mesh, _ = setup.build(config, ONE_DEVICE)
    with pytest.raises(ConfigError) as e:
        validate.check_evals(config, objective, mesh, data_for)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("ev, expected", [
    (dict(type="knn", kk=3), "config.evals.e: unknown key ['kk'] for type 'knn'; valid: ["),
    (dict(type="loss", train_split="train"), "unknown key ['train_split'] for type 'loss'"),
    (dict(type="knn", k=0), "config.evals.e.k=0; it must be an integer >= 1"),
    (dict(type="knn", temperature=-1.0), "config.evals.e.temperature=-1.0; it must be a finite number > 0"),
    (dict(type="knn", examples=-5), "config.evals.e.examples=-5"),
    (dict(type="knn", every=1.5), "config.evals.e.every=1.5"),
    (dict(type="knn", batch_size=0), "config.evals.e.batch_size=0"),
    (dict(type="knn", pp="resize("), "config.evals.e.pp: cannot parse op 'resize('"),
    (dict(type="fewshot", shots=(1, 0)), "config.evals.e.shots=(1, 0); it must be a non-empty list"),
    (dict(type="fewshot", shots=()), "config.evals.e.shots=()"),
    (dict(type="fewshot", l2_reg=0.0), "config.evals.e.l2_reg=0.0"),
    (dict(type="fewshot", num_seeds=0), "config.evals.e.num_seeds=0"),
    (dict(type="linear_probe", lr="big"), "config.evals.e.lr='big'"),
    (dict(type="zero_shot"), "config.evals.e: objective 'mae' has no text tower."),
    (dict(type="metrics"), "config.evals.e: objective 'mae' has no eval_metrics."),
    (dict(type="generation", classifier_workdir="x"), "type 'generation' needs a class- or text-conditional"),
    # fewer examples than one batch: the loss eval skips the padded tail, so it averaged nothing (0.0)
    (dict(type="loss", examples=3), "config.evals.e: examples=3, fewer than one full batch of 16"),
    (dict(type="loss", examples=40, batch_size=64), "raise config.evals.e.examples to at least 64"),
])
def test_bad_entries(tiny_config, ev, expected):
    c = tiny_config("mae")
    c.evals = dict(e=ev)
    msg = _check(c, data_for=[])
    assert expected in msg, msg


@pytest.mark.parametrize("ev, expected", [
    (dict(type="knn", dataset="fmjax_shapes/65"), "config.evals.e: Unknown fmjax_shapes resolution '65'"),
    (dict(type="knn", split="valid"), "config.evals.e: Unknown split 'valid' for dataset 'fmjax_shapes/32'"),
    (dict(type="fewshot", train_split="training"), "Unknown split 'training'"),
    (dict(type="knn", dataset="mnist"), "mnist"),
])
def test_missing_data(tiny_config, tmp_path, ev, expected):
    c = tiny_config("mae", eval_every=2)
    c.evals = dict(e=ev)
    if ev.get("dataset") == "mnist":
        c.evals.e.data_dir = str(tmp_path / "empty")
    assert expected in _check(c), _check(c)


def test_data_is_checked_only_for_evals_that_run(tiny_config):
    """An entry a training run never reaches (every=0, no eval at start) is checked for its keys
    and values only: MAE's evals on 'validation' while training on an image folder without one."""
    c = tiny_config("mae")
    c.evals = dict(e=dict(type="knn", split="nope", every=0))
    c.eval_at_start = False
    objective, mesh, _ = setup.build(c, ONE_DEVICE)
    validate.check_evals(c, objective, mesh)
    assert validate.evals_that_run(c) == []
    c.evals.e.every = 4
    assert "Unknown split 'nope'" in _check(c)


def test_zero_shot_files_are_checked(tiny_config, tmp_path):
    c = tiny_config("clip", eval_at_start=True)
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("circle\nsquare\n")
    templates.write_text("a photo of a {}.\na drawing\n")
    c.evals = dict(e=dict(type="zero_shot", templates_file=str(templates)))
    assert "config.evals.e.templates_file: template 2 'a drawing' must hold one '{}'" in _check(c)
    c.evals = dict(e=dict(type="zero_shot", classnames_file=str(names)))
    assert "config.evals.e: 2 class names for a dataset of 8 classes" in _check(c)
    c.evals = dict(e=dict(type="zero_shot", classnames_file=str(tmp_path / "none.txt")))
    assert "config.evals.e.classnames_file=" in _check(c) and "none.txt" in _check(c)
    c.evals = dict(e=dict(type="zero_shot", templates=["{}"], templates_file=str(templates)))
    assert "give templates or templates_file, not both" in _check(c)
    c.evals = dict(e=dict(type="zero_shot", templates=["photo of {0} {1}"]))
    assert "template 1 'photo of {0} {1}'" in _check(c)


def test_errors_come_before_anything_is_written(tiny_config, tmp_path):
    c = tiny_config("mae")
    c.evals = dict(few=dict(type="fewshot", shots=(1, 5), l2reg=1.0))
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "wd"), devices=ONE_DEVICE)
    assert "config.evals.few: unknown key ['l2reg'] for type 'fewshot'" in str(e.value)
    assert "'l2_reg'" in str(e.value) and not os.path.exists(tmp_path / "wd")


def test_a_loss_eval_on_a_split_shorter_than_a_batch_is_an_error_not_zero(tiny_config, tmp_path):
    """No full batch in the split (the batch is larger than the whole validation split): the
    loss eval used to report 0.0; it is now a one-line error naming the split's size."""
    from fmjax.data import sources
    c = tiny_config("mae", eval_at_start=True)
    n = len(sources.get_source(c.data.name, "validation", c.data.data_dir))
    c.evals = dict(e=dict(type="loss", batch_size=n + 16))
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "wd"), devices=ONE_DEVICE)
    assert "\n" not in str(e.value)
    assert f"config.evals.e: split 'validation' of 'fmjax_shapes/32' has {n} examples, fewer than one " \
           f"full batch of {n + 16}" in str(e.value), str(e.value)
