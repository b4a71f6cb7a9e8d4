"""``configs/finetune.py``: its default preset loads a MAE workdir's encoder into a ViT.

A tiny MAE workdir (2 steps, via the real loop) is fine-tuned by the preset (shrunk to the
same tiny encoder) through the real loop with the encoder frozen: the run's final encoder
params equal the MAE checkpoint's bit for bit, every MAE encoder array was mapped (the
preset's ``model_init.mapping``), and the head (``dont_load``) trained. Without
``model_init.workdir`` the same preset runs from random init (the from-scratch baseline),
and the CLI's ``--check_only`` accepts the preset with and without a workdir.
"""

import jax
import numpy as np
import pytest

from fmjax.testing import load_config
from fmjax.train import loop
from fmjax.train import model_init as mi_lib
from fmjax.train import restore

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
ENCODER = ("patch_embed", "cls_token", "encoder")


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory, shapes_data_dir):
    c = load_config("mae")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = 2, 16, 2
    c.log_every, c.eval_every, c.eval_at_start = 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(dict(TINY, decoder_width=32, decoder_depth=1, decoder_heads=2))
    c.evals = {}
    wd = str(tmp_path_factory.mktemp("mae"))
    loop.train_and_evaluate(c, wd)
    return wd


def _tiny_finetune(shapes_data_dir, steps=2):
    c = load_config("finetune")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = steps, 16, steps
    c.log_every, c.eval_every, c.eval_at_start = 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(TINY)
    c.evals = {}
    return c


def _params(workdir):
    _, _, _, _, state, _ = restore.load_checkpoint(workdir)
    return mi_lib.flatten(jax.tree.map(np.asarray, state.params))


def test_preset_loads_mae_encoder(mae_workdir, shapes_data_dir, tmp_path, capsys):
    c = _tiny_finetune(shapes_data_dir)
    c.model_init.workdir = mae_workdir
    c.optimizer.frozen = tuple(f"{k}(/.*)?" for k in ENCODER)  # so the end equals the start
    loop.train_and_evaluate(c, str(tmp_path / "ft"))
    out = capsys.readouterr()
    assert "0 missing (fresh init), 0 checkpoint arrays unused" in out.out + out.err
    src, ft = _params(mae_workdir), _params(str(tmp_path / "ft"))
    enc = [k for k in ft if k.split("/")[0] in ENCODER]
    assert len(enc) == len([k for k in src if k.split("/")[0] in ENCODER]) > 10
    for k in enc:
        np.testing.assert_array_equal(ft[k], src[k], err_msg=k)
    assert set(ft) - set(enc) == {"head/kernel", "head/bias"}   # pos embed: fixed sin-cos
    assert np.abs(ft["head/kernel"]).max() > 0                  # zero init, then trained


def test_preset_runs_from_scratch_without_workdir(mae_workdir, shapes_data_dir, tmp_path, capsys):
    c = _tiny_finetune(shapes_data_dir, steps=1)
    assert not mi_lib.is_set(c)
    final = loop.train_and_evaluate(c, str(tmp_path / "scratch"))
    assert final["step"] == 1
    out = capsys.readouterr()
    assert "model_init" not in out.out + out.err
    src, ft = _params(mae_workdir), _params(str(tmp_path / "scratch"))
    assert not np.array_equal(src["encoder/block_0/mlp/fc1/kernel"], ft["encoder/block_0/mlp/fc1/kernel"])


@pytest.mark.parametrize("with_workdir", [True, False])
def test_cli_check_only(mae_workdir, shapes_data_dir, tmp_path, with_workdir):
    from fmjax.testing import run_cli
    args = ["--config=configs/finetune.py", f"--workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={shapes_data_dir}", "--check_only"]
    if with_workdir:  # the tiny MAE encoder: shrink the ViT to match
        args += [f"--config.model_init.workdir={mae_workdir}"] + \
                [f"--config.model.{k}={v}" for k, v in TINY.items()]
    proc = run_cli("train", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== config OK" in proc.stdout


def test_mae_paper_preset_loads_mae_encoder_into_fc_norm_vit(mae_workdir, shapes_data_dir, tmp_path, capsys):
    """``finetune.py:mae_vit_b16_imagenet`` (shrunk to the tiny MAE encoder, on the shapes):
    MAE's global pool (``pool='mean'``, ``fc_norm``) with mixup / CutMix on. Every MAE encoder
    array loads but ``encoder/norm`` (unused, as MAE's fine-tuning drops it); fc_norm and the
    head start fresh."""
    c = load_config("finetune", "mae_vit_b16_imagenet")
    assert c.objective.mixup_alpha == 0.8 and c.objective.cutmix_alpha == 1.0 and c.model.fc_norm
    assert c.model_init.format == "timm_mae" and not mi_lib.is_set(c)
    d = _tiny_finetune(shapes_data_dir, steps=1)   # the shapes data, pp and evals of the default
    c.data, c.evals, c.dtype = d.data, d.evals, "float32"
    c.total_steps, c.batch_size, c.checkpoint_every, c.log_every = 1, 16, 1, 1
    c.eval_every, c.eval_at_start, c.optimizer.warmup_steps = 0, False, 1
    c.model.update(dict(variant="Ti/8", num_classes=d.model.num_classes, **TINY))
    c.model_init.workdir = mae_workdir
    c.optimizer.frozen = tuple(f"{k}(/.*)?" for k in ENCODER)
    loop.train_and_evaluate(c, str(tmp_path / "ft"))
    out = capsys.readouterr()
    assert "2 checkpoint arrays unused" in out.out + out.err   # encoder/norm/{scale,bias}
    src, ft = _params(mae_workdir), _params(str(tmp_path / "ft"))
    assert set(ft) - {k for k in src if k.split("/")[0] in ENCODER} == {
        "fc_norm/scale", "fc_norm/bias", "head/kernel", "head/bias"}
    for k in ft:
        if k.split("/")[0] in ENCODER:
            np.testing.assert_array_equal(ft[k], src[k], err_msg=k)
