"""``configs/linear_probe.py`` and ``fmjax/objectives/linear_probe.py``.

- LARS (``optimizer.name='lars'``) steps like facebookresearch/mae's ``util/lars.py`` (commit
  efb2a8062c206524e35e47d04501ed4f544c0ae8), transcribed in tests/reference/mae_util.py, over a warm-up +
  cosine schedule: weight decay and trust ratio on ndim > 1 only, momentum on the unscaled
  update, then the lr.
- The probe head's batch norm (affine=False, eps 1e-6, momentum 0.1) keeps the running
  statistics torch's ``BatchNorm1d`` keeps.
- The default preset loads a MAE workdir's encoder into ``backbone/`` through the real loop;
  the backbone stays bit-identical (``optimizer.frozen``) while the head trains.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.testing import load_config
from fmjax.train import loop
from fmjax.train import model_init as mi_lib
from fmjax.train import optimizer as opt_lib
from fmjax.train import restore

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference"))
from mae_util import LARS  # noqa: E402  (facebookresearch/mae util/lars.py)


def test_lars_matches_mae_util_lars():
    import ml_collections
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
              "bias": rng.normal(size=(4,)).astype(np.float32)}
    opt_cfg = ml_collections.ConfigDict(dict(name="lars", lr=0.5, momentum=0.9, trust_coefficient=0.001,
                                             weight_decay=0.05, warmup_steps=3, decay="cosine",
                                             min_lr=0.0, clip_norm=0.0))
    total = 12
    tx, schedule = opt_lib.make_optimizer(opt_cfg, total, 256)
    state = tx.init(params)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    topt = LARS(tp.values(), lr=0.0, weight_decay=0.05)
    jp = jax.tree.map(jnp.asarray, params)
    for step in range(total):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for g in topt.param_groups:
            g["lr"] = float(schedule(step))
        for k, v in tp.items():
            v.grad = torch.tensor(grads[k])
        topt.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jp)
        jp = jax.tree.map(lambda p, u: p + u, jp, updates)
        for k in params:
            np.testing.assert_allclose(np.asarray(jp[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{k} @ step {step}")


def _objective(**obj):
    from fmjax.objectives.base import make_objective
    c = load_config("linear_probe")
    c.model.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
    c.objective.update(obj)
    return c, make_objective(c)


def test_batch_norm_running_stats_match_torch():
    c, obj = _objective()
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)).astype(np.float32))
    batch = dict(image=images, label=jnp.arange(8) % 8)
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    bn = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6, momentum=0.1)
    feats = torch.tensor(np.asarray(obj.features(params, extra, images)))
    for _ in range(3):
        _, (_, extra) = obj.loss(params, extra, batch, jax.random.PRNGKey(2), 0)
        bn.train()(feats)
    np.testing.assert_allclose(np.asarray(extra["mean"]), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(extra["var"]), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    head = params["head"]
    ref = bn.eval()(feats).numpy() @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(np.asarray(obj.predict(params, extra, images)), ref, rtol=1e-4, atol=1e-5)
    assert 0.005 < float(np.std(np.asarray(head["kernel"]))) < 0.015   # trunc_normal(std=0.01)


def test_check_insists_on_a_frozen_backbone():
    c, obj = _objective()
    c.optimizer.frozen = ()
    with pytest.raises(ConfigError, match=r"optimizer.frozen=\('backbone/\.\*',\)"):
        obj.check(c)


def test_needs_a_pooled_backbone():
    from fmjax.objectives.base import make_objective
    c = load_config("linear_probe")
    c.model = dict(name="mae", variant="S/16")
    with pytest.raises(ValueError, match=r"needs a model with \['pooled'\].*models that fit: \['convnext', 'swin', 'vit'\]"):
        make_objective(c)


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory, shapes_data_dir):
    c = load_config("mae")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = 2, 16, 2
    c.log_every, c.eval_every, c.eval_at_start = 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, decoder_width=32,
                        decoder_depth=1, decoder_heads=2))
    c.evals = {}
    wd = str(tmp_path_factory.mktemp("mae"))
    loop.train_and_evaluate(c, wd)
    return wd


def test_preset_probes_a_mae_encoder_frozen(mae_workdir, shapes_data_dir, tmp_path, capsys):
    c = load_config("linear_probe")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = 3, 16, 3
    c.log_every, c.eval_every = 1, 3
    c.optimizer.warmup_steps = 1
    c.evals.val.update(dict(examples=32, batch_size=16))
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    c.model_init.workdir = mae_workdir
    final = loop.train_and_evaluate(c, str(tmp_path / "lp"))
    out = capsys.readouterr()
    assert "2 missing (fresh init), 0 checkpoint arrays unused" in out.out + out.err   # the head
    assert 0.0 <= final["eval/val_accuracy"] <= 1.0
    _, _, _, _, src, _ = restore.load_checkpoint(mae_workdir)
    _, _, _, _, lp, _ = restore.load_checkpoint(str(tmp_path / "lp"))
    src = mi_lib.flatten(jax.tree.map(np.asarray, src.params))
    lp = mi_lib.flatten(jax.tree.map(np.asarray, lp.params))
    backbone = [k for k in lp if k.startswith("backbone/")]
    assert len(backbone) > 10
    for k in backbone:
        np.testing.assert_array_equal(lp[k], src[k[len("backbone/"):]], err_msg=k)
    assert set(lp) - set(backbone) == {"head/kernel", "head/bias"}
    assert np.abs(lp["head/bias"]).max() > 0   # zero init, then trained
