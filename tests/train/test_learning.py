"""Learning gates on the bundled data: shortened versions of the default configs must learn.

Numbers measured on a 2-core CPU (see the configs' docstrings for the full runs). The runs
use one device: learning does not depend on the mesh (tests/train/test_sharding.py shows the
step is the same on 8 devices), and 8 simulated devices on 2 cores only add overhead. Each
trains in a fresh one-device process (``fmjax.testing.train_in_fresh_process``): in this
process, beside the session's 8 simulated devices, the same run steps 11-16% slower.
"""
import json
import math
import os

import pytest

from fmjax.testing import load_config, train_in_fresh_process
# each gate trains a default preset for minutes on the 2-core machine, with XLA's full optimization
pytestmark = [pytest.mark.slow, pytest.mark.optimized]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _eval_at(rows, step, key):
    vals = [r[key] for r in rows if r["step"] == step and key in r]
    assert vals, f"{key} not logged at step {step}"
    return vals[-1]


def _shorten(c, steps):
    c.total_steps = steps
    c.log_every = 50
    c.eval_every = steps
    c.checkpoint_every = steps
    c.optimizer.warmup_steps = steps // 10
    return c


@pytest.fixture(scope="module")
def shape_classifier(tmp_path_factory, shapes_data_dir):
    """The shortened supervised default run: a learning gate and the diffusion scorer."""
    c = _shorten(load_config("supervised"), 300)
    c.data.data_dir = shapes_data_dir
    workdir = str(tmp_path_factory.mktemp("classifier"))
    train_in_fresh_process(c, workdir)
    return workdir


def test_supervised_default_learns(shape_classifier):
    tmp_path = shape_classifier
    rows = _rows(tmp_path)
    start, end = _eval_at(rows, 0, "eval/val_accuracy"), _eval_at(rows, 300, "eval/val_accuracy")
    print(f"supervised val accuracy: {start:.3f} at init -> {end:.3f} after 300 steps")
    assert start < 0.2            # chance is 1/8
    assert end >= 0.3             # measured 0.445 (8 classes; chance 0.125)


def test_int8_eval_of_the_trained_classifier(shape_classifier, tmp_path):
    """launch/eval.py --quantize=int8 (fmjax.adapt.quantize) on the gate's trained classifier (a
    copy: the eval appends to metrics.jsonl): accuracy within a point of the float model's,
    every dense kernel counted, ~4x fewer bytes; an unknown scheme is a one-line error."""
    import shutil
    from fmjax.testing import run_cli
    workdir = str(tmp_path / "classifier")
    shutil.copytree(shape_classifier, workdir)
    proc = run_cli("eval", f"--workdir={workdir}", "--quantize=int8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _rows(workdir)[-1]
    acc, qacc = last["eval/val_accuracy"], last["int8/eval/val_accuracy"]
    assert acc > 0.3 and abs(acc - qacc) <= 0.01, (acc, qacc)
    n_dense = load_config("supervised").model.depth * 6 + 1  # q k v out fc1 fc2 per block, the head
    assert f"{n_dense} dense projections quantized" in proc.stdout, proc.stdout[-2000:]  # (conv stem excluded)
    ratio = last["int8/int8_kernel_bytes"] / last["int8/kernel_bytes"]
    assert 0.25 < ratio < 0.3, ratio
    proc = run_cli("eval", f"--workdir={workdir}", "--quantize=int4")
    assert proc.returncode == 2 and "quantize" in proc.stderr


def test_mae_default_learns(default_config, tmp_path):
    """Validation reconstruction loss falls to <= 0.6x its initial value; probe numbers reported.

    The linear probe of the trained encoder is reported beside a randomly initialised one
    (the step-0 evaluation of the same run). Only "well above chance" is asserted here: the
    probe's gain over a random encoder needs the full default run and more (see configs/mae.py
    and the note on issue 2), and random encoders alone spread by +-0.03 over init seeds.
    """
    steps = 120
    c = _shorten(default_config("mae"), steps)
    del c.evals["knn"]  # not asserted here; the probe is
    for name in ("val_loss", "probe"):
        c.evals[name].examples = 500
    c.evals.probe.train_examples = 1000
    train_in_fresh_process(c, str(tmp_path))
    rows = _rows(tmp_path)
    start, end = _eval_at(rows, 0, "eval/val_loss"), _eval_at(rows, steps, "eval/val_loss")
    probe_random, probe_trained = (_eval_at(rows, 0, "eval/probe_top1"),
                                   _eval_at(rows, steps, "eval/probe_top1"))
    print(f"MAE val loss {start:.3f} -> {end:.3f}; probe random {probe_random:.3f}, trained {probe_trained:.3f}")
    assert end <= 0.6 * start    # measured 1.742 -> 0.734 at 120 steps (ratio 0.42; 0.727 at 180)
    assert probe_trained > 0.16 and probe_random > 0.16   # chance 0.125; measured 0.222 / 0.258
    assert os.listdir(os.path.join(tmp_path, "images"))   # reconstruction grids were written


def test_clip_default_learns(default_config, tmp_path):
    """A shortened default CLIP run: retrieval recall@5 far above chance, zero-shot above it.

    The full default (configs/clip.py, with hard negatives) is not yet at the issue's 0.8
    zero-shot bar: measured 0.494 validation / 0.257 held-out zero-shot top-1 and recall@5
    0.86 after its 800 steps.
    """
    c = _shorten(default_config("clip"), 150)
    del c.evals["zero_shot_heldout"], c.evals["compositional"]  # not asserted here
    for ev in c.evals.values():
        ev.examples = 500
    train_in_fresh_process(c, str(tmp_path))
    rows = _rows(tmp_path)
    r5 = _eval_at(rows, 150, "eval/retrieval_i2t_r@5")
    zs, zs_start = _eval_at(rows, 150, "eval/zero_shot_top1"), _eval_at(rows, 0, "eval/zero_shot_top1")
    print(f"CLIP recall@5 {r5:.3f} (chance 0.010); zero-shot {zs_start:.3f} -> {zs:.3f} (chance 0.125)")
    assert r5 >= 0.15                # measured 0.308 (chance 0.010)
    assert zs >= zs_start + 0.05     # measured 0.104 -> 0.162


def test_dino_default_learns_without_collapse(default_config, tmp_path):
    """A shortened default DINO run: the collapse monitors stay healthy at every logged step
    and the teacher's attention maps are written; kNN numbers are reported.

    Not yet met (see the note on the DINO issue): the teacher's kNN top-1 does not beat the
    randomly initialised network on the bundled data at CPU budgets (measured 0.16 vs 0.17
    after 300 steps, for every recipe variant tried).
    """
    c = _shorten(default_config("dino"), 60)
    c.log_every = 10
    c.evals.knn.examples, c.evals.knn.train_examples = 400, 800
    del c.evals["fewshot"]  # neither asserted nor reported here (suite time)
    final = train_in_fresh_process(c, str(tmp_path))
    rows = [r for r in _rows(tmp_path) if "train/teacher_entropy" in r]
    ln_k = math.log(c.objective.out_dim)
    for r in rows:
        ent, kl = r["train/teacher_entropy"], r["train/kl"]
        assert 0.3 * ln_k < ent < 0.98 * ln_k, (r["step"], ent)   # measured 0.83-0.90 ln K
        assert kl > 0.05, (r["step"], kl)                         # measured 0.3-1.0
    knn0, knn = _eval_at(_rows(tmp_path), 0, "eval/knn_top1"), final["eval/knn_top1"]
    print(f"DINO teacher kNN top-1: random init {knn0:.3f} -> {knn:.3f} after 60 steps (chance 0.125)")
    assert any(n.startswith("images_attention") for n in os.listdir(os.path.join(tmp_path, "images")))


def test_diffusion_default_learns(default_config, shape_classifier, tmp_path):
    """A shortened default diffusion run: the denoising loss falls far below its start and the
    conditional-generation metric (classifier-scored EMA samples) is computed beside the
    classifier's accuracy on real images.

    Not yet met (see the note on the diffusion issue): the 0.7 conditional-generation bar; at
    CPU budgets the samples are still blobs of the right colours, not clean shapes.
    """
    c = _shorten(default_config("diffusion"), 120)
    c.log_every = 20
    c.evals = dict(gen=dict(type="generation", classifier_workdir=shape_classifier,
                            samples_per_class=4, num_steps=10, every=120, examples=300))
    c.eval_at_start = False
    final = train_in_fresh_process(c, str(tmp_path))
    rows = [r for r in _rows(tmp_path) if "train/mse" in r]
    first, last = rows[0]["train/mse"], final["train/mse"]
    acc, real = final["eval/gen_accuracy"], final["eval/gen_classifier_real_accuracy"]
    print(f"diffusion mse {first:.3f} -> {last:.3f}; generation accuracy {acc:.3f} "
          f"(classifier on real images {real:.3f}, chance 0.125)")
    assert last < 0.25 * first        # measured ~0.8 -> ~0.05
    assert 0.0 <= acc <= 1.0 and real >= 0.25
