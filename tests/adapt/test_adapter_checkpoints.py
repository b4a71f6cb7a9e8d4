"""Adapter-only checkpoints (fmjax.train.adapter_ckpt): a LoRA run on a supervised workdir's
base stores the LoRA pairs and the head alone (every frozen array is a 0-d placeholder),
resumes exactly, evaluates through launch/eval.py's loader with the base put back, and refuses a
base that changed since with one line. ``checkpoint='full'`` stores everything, and either
kind of checkpoint resumes under the other mode."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax import testing
from fmjax.errors import ConfigError
from fmjax.train import checkpoint as ckpt
from fmjax.train import loop
from fmjax.train import restore as restore_lib

ONE = jax.devices()[:1]


def _flat(tree):
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


def _raw(wd, step):
    """The stored arrays of one step, as written (no target: placeholders stay 0-d)."""
    return _flat(jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(str(wd), "checkpoints", str(step), "state"))))


def _meta(wd, step):
    with open(os.path.join(str(wd), "checkpoints", str(step), "meta", "metadata")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory, shapes_data_dir):
    """A tiny supervised run: the pretrained base every adapter run here loads."""
    c = testing.load_config("supervised")
    c.data.data_dir = shapes_data_dir
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 4, 16, 2, 4
    c.eval_every, c.eval_at_start, c.evals = 0, False, {}
    wd = str(tmp_path_factory.mktemp("base"))
    loop.train_and_evaluate(c, wd, devices=ONE)
    return wd, c


def _lora_config(base, mode="adapter", steps=4):
    wd, c = base
    c = c.copy_and_resolve_references()
    c.total_steps, c.log_every, c.checkpoint_every, c.keep_checkpoints = steps, 1, 2, 5
    c.model_init.workdir = wd
    c.adapter.update(dict(name="lora", rank=2, train=("head/.*",), checkpoint=mode))
    return c


def test_only_the_adapter_and_head_are_stored_and_eval_puts_the_base_back(base_workdir, tmp_path):
    c = _lora_config(base_workdir)
    wd = str(tmp_path / "lora")
    loop.train_and_evaluate(c, wd, devices=ONE)
    raw = _raw(wd, 4)
    stored = {k for k, v in raw.items() if k.startswith("params/") and np.ndim(v) > 0}
    assert stored and all(k.endswith(("lora_a", "lora_b")) or k.startswith("params/head/")
                          for k in stored), sorted(stored)
    assert any(k.endswith("lora_b") for k in stored) and "params/head/kernel" in stored
    # The optimizer slots of frozen params are placeholders too: stored floats ~ trained params.
    n_stored = sum(np.size(v) for v in raw.values())
    n_trained = sum(np.size(raw[k]) for k in stored)
    n_arrays = len(raw)  # each frozen array / slot leaves one 0-d placeholder
    assert n_stored <= 3 * n_trained + n_arrays + 8, (n_stored, n_trained)  # Adam: param, mu, nu
    meta = _meta(wd, 4)
    assert meta["stored"] == "adapter" and meta["adapter_base"]["model_init"]["workdir"] == base_workdir[0]
    assert len(meta["adapter_base"]["digest"]) == 20

    # launch/eval.py's loader: the base comes back bit for bit, the adapter as trained.
    _, _, _, _, state, step = restore_lib.load_checkpoint(wd, devices=ONE)
    assert step == 4 and state.opt_state is None
    params = _flat(jax.device_get(state.params))
    _, _, _, _, base_state, _ = restore_lib.load_checkpoint(base_workdir[0], devices=ONE)
    base = _flat(jax.device_get(base_state.params))
    for k, v in params.items():
        if k.endswith(("lora_a", "lora_b")) or k.startswith("head/"):
            np.testing.assert_array_equal(v, raw[f"params/{k}"], err_msg=k)
        else:
            np.testing.assert_array_equal(v, base[k], err_msg=k)


def test_resume_restores_the_adapter_exactly(base_workdir, tmp_path, monkeypatch):
    c = _lora_config(base_workdir)
    resumed, straight = testing.resume_drill(c, tmp_path, monkeypatch, n=2, devices=ONE,
                                             rtol=0)
    a, b = _raw(resumed, 4), _raw(straight, 4)
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_changed_base_is_refused_in_one_line(base_workdir, tmp_path, shapes_data_dir):
    """The adapter's base workdir trained on after the adapter run started: resuming (or
    evaluating) the adapter would put it on other weights, so both refuse, naming the base."""
    wd0, c0 = base_workdir
    moved_base = str(tmp_path / "base")
    import shutil
    shutil.copytree(wd0, moved_base)
    c = _lora_config((moved_base, c0), steps=4)
    c.total_steps = 2
    wd = str(tmp_path / "lora")
    loop.train_and_evaluate(c, wd, devices=ONE)
    more = c0.copy_and_resolve_references()
    more.total_steps, more.checkpoint_every = 6, 6
    loop.train_and_evaluate(more, moved_base, devices=ONE)   # the base's latest step is now 6
    c.total_steps = 4
    with pytest.raises(ckpt.IncompatibleCheckpointError,
                       match="adapter-only checkpoints whose base weights .* differ from the base"):
        loop.train_and_evaluate(c, wd, devices=ONE)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="differ from the base"):
        restore_lib.load_checkpoint(wd, devices=ONE)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]  # nothing lost
    c.model_init.step = 4  # pinned to the step it was trained on: resumes
    assert loop.train_and_evaluate(c, wd, devices=ONE)["step"] == 4


def test_full_mode_stores_everything_and_both_kinds_resume_under_either_mode(base_workdir, tmp_path):
    c = _lora_config(base_workdir, mode="full", steps=2)
    wd = str(tmp_path / "lora")
    loop.train_and_evaluate(c, wd, devices=ONE)
    assert "stored" not in _meta(wd, 2)
    assert all(np.ndim(v) > 0 for k, v in _raw(wd, 2).items() if k.startswith("params/"))
    c.adapter.checkpoint, c.total_steps = "adapter", 4     # a full step resumes in adapter mode
    assert loop.train_and_evaluate(c, wd, devices=ONE)["step"] == 4
    assert _meta(wd, 4)["stored"] == "adapter"
    c.adapter.checkpoint, c.total_steps = "full", 6        # and an adapter-only one in full mode
    assert loop.train_and_evaluate(c, wd, devices=ONE)["step"] == 6
    assert "stored" not in _meta(wd, 6)


def test_a_bad_checkpoint_mode_is_one_line(base_workdir):
    from fmjax.objectives.base import make_objective
    c = _lora_config(base_workdir, mode="adapters")
    with pytest.raises(ConfigError, match=r"config.adapter.checkpoint='adapters'; valid: \['adapter', 'full'\]"):
        make_objective(c)
