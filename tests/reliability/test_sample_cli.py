"""Drill (issue 11, items 9 and 11): ``launch/sample.py`` on bad flags and NaN checkpoints.

Every case ends in one ``fmjax: error:`` line with exit code 2 and writes no PNG. Flag
errors come before the checkpoint is restored or anything compiled: they are also raised
for a workdir that holds only a config.json. A tiny class-conditional workdir is trained
once per module; a copy of it gets a later checkpoint whose params are NaN.
"""
import importlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from fmjax.errors import ConfigError, NonFiniteError
from fmjax.testing import REPO, assert_one_line_error, run_cli

_WORKDIRS = {}
STEP = 2        # the trained checkpoint
NAN_STEP = 3    # the NaN copy's checkpoint


def _tiny_config(data_dir):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    c = importlib.import_module("configs.diffusion").get_config("default")
    c.data.data_dir = data_dir
    c.total_steps, c.batch_size = STEP, 8
    c.log_every, c.eval_every, c.checkpoint_every = 1, 0, STEP
    c.eval_at_start = False
    c.optimizer.warmup_steps = 1
    c.model = dict(name="unet", channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(16,), num_groups=4, dropout=0.0,
                   num_classes=c.model.num_classes, sample_size=32)
    c.objective.sample.update(dict(num_steps=2))
    c.evals = {}
    return c


def _write_nan_checkpoint(workdir: str, step: int, new_step: int) -> None:
    """Restores ``step`` with Orbax, sets every float of params and EMA to NaN and saves it
    as ``new_step`` (bypassing fmjax's save path, which refuses non-finite state)."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        state, meta = dict(restored["state"]), dict(restored["meta"])
        nan = lambda x: (np.full_like(x, np.nan)  # noqa: E731
                         if np.issubdtype(np.asarray(x).dtype, np.floating) else x)
        state["params"] = jax.tree.map(nan, state["params"])
        state["extra"] = jax.tree.map(nan, state["extra"])
        state["step"] = np.asarray(new_step, np.asarray(state["step"]).dtype)
        meta["step"] = new_step
        manager.save(new_step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    finally:
        manager.close()


def _config_only(root, config) -> dict:
    """'class_cfg' / 'text' / 'none': workdirs holding only a config.json (class-, text-
    conditional, unconditional) and no checkpoint, so only errors raised before anything is
    restored can pass there."""
    saved = json.loads(config.to_json_best_effort())
    out = {}
    for kind in ("class", "text", "none"):
        cfg = json.loads(json.dumps(saved))
        if kind != "class":
            cfg["objective"]["conditioning"] = kind
            cfg["model"]["num_classes"] = 0
        if kind == "text":
            cfg["objective"]["text"] = dict(vocab_size=259, context_length=32, width=16, depth=1,
                                            num_heads=2, mlp_dim=32, embed_dim=16)
            cfg["data"]["tokenize"] = dict(context_length=32, tokenizer="bytes")
        name = "class_cfg" if kind == "class" else kind
        os.makedirs(root / name)
        with open(root / name / "config.json", "w") as f:
            json.dump(cfg, f)
        out[name] = str(root / name)
    return out


@pytest.fixture
def workdirs(shapes_data_dir, tmp_path_factory):
    """The config-only workdirs (no training; built once per module)."""
    if "class_cfg" not in _WORKDIRS:
        _WORKDIRS.update(_config_only(tmp_path_factory.mktemp("sample_cfg"), _tiny_config(shapes_data_dir)))
    return _WORKDIRS


@pytest.fixture
def trained(workdirs, shapes_data_dir, tmp_path_factory):
    """Also 'class': a trained tiny class-conditional workdir, and 'nan': its copy with a later
    checkpoint (step 3) whose params are NaN. Trained once per module (~30 s)."""
    if "class" not in _WORKDIRS:
        from fmjax.train import loop
        root = tmp_path_factory.mktemp("sample_trained")
        loop.train_and_evaluate(_tiny_config(shapes_data_dir), str(root / "class"), devices=jax.devices()[:1])
        shutil.copytree(root / "class", root / "nan")
        _write_nan_checkpoint(str(root / "nan"), STEP, NAN_STEP)
        _WORKDIRS.update({k: str(root / k) for k in ("class", "nan")})
    return _WORKDIRS


def _pngs(*dirs) -> list:
    return [os.path.join(r, f) for d in dirs if os.path.isdir(d)
            for r, _, fs in os.walk(d) for f in fs if f.endswith(".png")]


# (workdir kind, flags, texts the error line must contain). Each was silently accepted
# (PNGs written, exit 0) or a traceback before the fix.
FLAG_CASES = {
    "guidance_nan": ("class", ["--guidance_scale=nan"], ["guidance_scale=nan", "finite"]),
    "guidance_inf": ("class", ["--guidance_scale=inf"], ["guidance_scale=inf", "finite"]),
    "eta_nan": ("class", ["--eta=nan"], ["eta=nan", "finite"]),
    "eta_negative": ("class", ["--eta=-0.5"], ["eta=-0.5", ">= 0"]),
    "num_steps_zero": ("class", ["--num_steps=0"], ["num_steps=0", "1 .. num_timesteps=1000"]),
    "num_steps_too_many": ("class", ["--num_steps=5000"], ["num_steps=5000", "1 .. num_timesteps=1000"]),
    "batch_negative": ("class", ["--batch_size=-4"], ["batch_size=-4", "at least 1"]),
    "batch_zero": ("class", ["--batch_size=0"], ["batch_size=0", "at least 1"]),
    "num_per_class_zero": ("class", ["--num_per_class=0"], ["num_per_class=0", "at least 1"]),
    "classes_out_of_range": ("class", ["--classes=1,9"], ["--classes", "9", "0 .. 7"]),
    "classes_not_int": ("class", ["--classes=1,circle"], ["--classes", "circle", "integer"]),
    "prompts_on_class_model": ("class", ["--prompts=a red circle"],
                               ["--prompts", "class-conditional", "--classes"]),
    "prompts_on_unconditional": ("none", ["--prompts=a red circle"], ["--prompts", "unconditional"]),
    "classes_on_text_model": ("text", ["--classes=0,1"], ["--classes", "text-conditional", "--prompts"]),
    "classes_on_unconditional": ("none", ["--classes=0"], ["--classes", "unconditional"]),
    "empty_prompts": ("text", ["--prompts=;;; ;"], ["--prompts", "no prompt"]),
}
# The ones also run through the real command line (each ~5 s); all run in-process.
CLI_CASES = ["guidance_nan", "eta_negative", "num_steps_zero", "batch_negative", "classes_out_of_range",
             "prompts_on_class_model", "classes_on_text_model", "empty_prompts"]


def _kwargs(flag_list) -> dict:
    """--name=value flags -> sample_checkpoint keyword arguments (as launch/sample.py parses them)."""
    kinds = dict(guidance_scale=float, eta=float, num_steps=int, batch_size=int, num_per_class=int,
                 classes=lambda v: v.split(","), prompts=str)
    out = {}
    for f in flag_list:
        name, value = f[2:].split("=", 1)
        out[name] = kinds[name](value)
    return out


def _cfg(kind: str) -> str:
    return "class_cfg" if kind == "class" else kind


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_sample_flag_is_one_line_error_before_loading(workdirs, tmp_path, case):
    """On a workdir without a checkpoint: the flag error comes before anything is restored."""
    kind, flag_list, texts = FLAG_CASES[case]
    outdir = tmp_path / "out"
    proc = run_cli("sample", f"--workdir={workdirs[_cfg(kind)]}", f"--outdir={outdir}", *flag_list)
    assert_one_line_error(proc, *texts)
    assert not os.path.exists(outdir)


def test_bad_sample_settings_raise_before_the_checkpoint_is_read(workdirs, tmp_path):
    """Every case, in-process, on workdirs that hold only a config.json: a ConfigError naming
    the setting, so it is raised before anything is restored or compiled."""
    from fmjax.train.sample import sample_checkpoint
    for case, (kind, flag_list, texts) in FLAG_CASES.items():
        outdir = tmp_path / case
        with pytest.raises(ConfigError) as e:
            sample_checkpoint(workdirs[_cfg(kind)], outdir=str(outdir),
                              **_kwargs(flag_list))
        msg = str(e.value)
        assert "\n" not in msg and all(t in msg for t in texts), (case, msg)
        assert not os.path.exists(outdir), case
    # These workdirs have no checkpoint: a valid request gets that far.
    for kind, kw in (("class_cfg", dict(classes=["0", "7"])), ("text", dict(prompts="a red circle")),
                     ("none", {})):
        with pytest.raises(ConfigError, match="no checkpoint"):
            sample_checkpoint(workdirs[kind], outdir=str(tmp_path / "ok"), num_steps=1000, eta=1.0,
                              guidance_scale=3.0, batch_size=1, num_per_class=1, **kw)
    assert not _pngs(*(workdirs[k] for k in workdirs), str(tmp_path))


@pytest.mark.slow
def test_nan_checkpoint_is_an_error_naming_the_step_and_writes_nothing(trained, tmp_path):
    """A checkpoint whose params are NaN gave grey PNGs and exit 0. (fmjax's loader may refuse
    the NaN params before sampling; either way one line naming the step, nothing written.)
    Also on a trained workdir, bad flags (which wrote PNGs and exited 0) write nothing."""
    workdirs, outdir = trained, tmp_path / "out"
    for case in ("guidance_nan", "prompts_on_class_model"):
        _, flag_list, texts = FLAG_CASES[case]
        assert_one_line_error(run_cli("sample", f"--workdir={workdirs['class']}", "--num_per_class=1",
                                      "--num_steps=2", *flag_list), *texts)
        assert not _pngs(workdirs["class"])
    proc = run_cli("sample", f"--workdir={workdirs['nan']}", f"--outdir={outdir}", "--num_per_class=1",
                   "--num_steps=2", "--batch_size=8")
    line = assert_one_line_error(proc, str(NAN_STEP))
    assert "nan" in line.lower() or "non-finite" in line.lower(), line
    assert not _pngs(str(outdir), workdirs["nan"])
    # The good step of the same workdir still samples.
    proc = run_cli("sample", f"--workdir={workdirs['nan']}", f"--step={STEP}", f"--outdir={outdir}",
                   "--num_per_class=1", "--num_steps=2", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_pngs(str(outdir))) == 9


@pytest.mark.slow
def test_non_finite_samples_raise_in_the_generator(trained, tmp_path, monkeypatch):
    """``generation.Generator`` (the sample CLI's and the ``generation`` evaluator's sampler)
    refuses non-finite samples instead of turning them into grey pixels, and
    ``sample_checkpoint`` then writes nothing (also when the loader lets NaN params through)."""
    import dataclasses
    from fmjax.evals import generation as gen_lib
    from fmjax.train import sample as sample_lib
    workdirs, devices = trained, jax.devices()[:1]
    config, objective, mesh, rules, state, step = sample_lib.load_checkpoint(workdirs["class"],
                                                                             devices=devices)
    generator = gen_lib.Generator(objective, mesh, rules, 8, num_steps=2)
    labels = {"label": np.arange(8, dtype=np.int32)}
    images = generator(state.params, state.extra, labels, step=step)
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    nan_state = dataclasses.replace(state, extra=jax.tree.map(lambda x: x * np.nan, state.extra))
    with pytest.raises(NonFiniteError, match=f"8 of 8 samples.*at step {step}") as e:
        generator(nan_state.params, nan_state.extra, labels, step=step)
    assert "\n" not in str(e.value)

    monkeypatch.setattr(sample_lib, "load_checkpoint",
                        lambda *a, **k: (config, objective, mesh, rules, nan_state, step))
    outdir = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=f"at step {step}.*Nothing was written") as e:
        sample_lib.sample_checkpoint(workdirs["class"], outdir=str(outdir), num_per_class=1,
                                     num_steps=2, batch_size=8, devices=devices)
    assert "\n" not in str(e.value) and not _pngs(str(outdir), workdirs["class"])
