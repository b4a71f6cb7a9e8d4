"""config.writers: metrics.jsonl always, TensorBoard and Weights & Biases on request (W&B is
checked with a stand-in module recording the calls: the package is not a dependency)."""
import importlib.machinery
import os
import sys
import types

import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.train.loop import train_and_evaluate


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step=None):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()
    mod.init, mod.Image = init, lambda arr: ("image", np.asarray(arr).shape)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return calls


def test_wandb_writer(fake_wandb, tiny_config, tmp_path):
    workdir = str(tmp_path / "wd")
    config = tiny_config("mae", total_steps=3, writers=("jsonl", "wandb"))
    train_and_evaluate(config, workdir)
    init = [c for c in fake_wandb if c[0] == "init"]
    assert len(init) == 1
    kw = init[0][1]
    assert kw["project"] == "fmjax" and kw["resume"] == "allow" and kw["dir"] == workdir
    assert kw["config"]["total_steps"] == 3
    logged = [c for c in fake_wandb if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2, 3] and all("train/loss" in c[2] for c in logged)
    assert fake_wandb[-1] == ("finish",)
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # always written
    assert not any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))  # no 'tensorboard'

    # A resume continues the same W&B run (the id comes from the workdir).
    config.total_steps = 4
    train_and_evaluate(config, workdir)
    ids = [c[1]["id"] for c in fake_wandb if c[0] == "init"]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_unknown_writer_is_one_line(tiny_config, tmp_path):
    config = tiny_config("mae", writers=("jsonl", "mlflow"))
    with pytest.raises(ConfigError, match=r"unknown writer\(s\) \['mlflow'\]"):
        train_and_evaluate(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


def test_wandb_not_installed_is_one_line(tiny_config, tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        importlib.machinery.PathFinder.find_spec(name))
    config = tiny_config("mae", writers=("jsonl", "tensorboard", "wandb"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        train_and_evaluate(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")
