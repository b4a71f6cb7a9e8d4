"""The dVAE (DALL-E's discrete VAE): the gumbel-softmax relaxation, the temperature and KL
schedules, the KL to the uniform prior and the logit-Laplace loss against the paper's
formulas (Ramesh et al. 2021, appendix A.2-A.3), the 1-token-per-patch mean baseline, the
loss as a whole, config errors, exact resume, ``load_tokenizer`` (from a trained workdir and
a random init) and a shortened learning gate."""
import json
import math
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax.errors import ConfigError
from fmjax.models import dvae as dvae_lib
from fmjax.objectives import dvae as obj_lib
from fmjax.objectives.base import make_objective
from fmjax.testing import load_config
from fmjax.train import loop

ONE_DEVICE = jax.devices()[:1]
TINY_MODEL = dict(name="dvae", group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32, n_init=8,
                  output="logit_laplace")


def _tiny(shapes_data_dir, **overrides):
    """configs/dvae.py shrunk to seconds: a 3-group dVAE of width 8 and 32 codes."""
    c = load_config("dvae")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size = 4, 16
    c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
    c.eval_at_start = False
    c.optimizer.warmup_steps = 2
    c.model = dict(TINY_MODEL)
    c.objective.update(dict(kl_warmup_steps=3, ema_decay=0.9))
    c.evals = {}
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


# -- formulas -------------------------------------------------------------------------------------

def test_schedules_match_the_formulas():
    t = np.arange(0, 1300, 7)
    T, W = 1000, 300
    cos_tau = 1 / 16 + (1 - 1 / 16) * 0.5 * (1 + np.cos(np.pi * np.minimum(t / T, 1)))
    np.testing.assert_allclose(obj_lib.temperature(t, 1.0, 1 / 16, T, "cosine"), cos_tau, rtol=1e-6)
    np.testing.assert_allclose(obj_lib.temperature(t, 1.0, 1 / 16, T, "exponential"),
                               (1 / 16) ** np.minimum(t / T, 1), rtol=1e-5)
    assert float(obj_lib.temperature(0, 1.0, 1 / 16, T)) == 1.0
    np.testing.assert_allclose(float(obj_lib.temperature(T // 2, 1.0, 1 / 16, T)), (1 + 1 / 16) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(obj_lib.temperature(5 * T, 1.0, 1 / 16, T)), 1 / 16, rtol=1e-6)
    np.testing.assert_allclose(float(obj_lib.temperature(T // 2, 1.0, 1 / 16, T, "exponential")), 0.25, rtol=1e-6)
    beta = 6.6 * 0.5 * (1 - np.cos(np.pi * np.minimum(t / W, 1)))
    np.testing.assert_allclose(obj_lib.kl_weight(t, 6.6, W), beta, rtol=1e-5, atol=1e-6)
    assert float(obj_lib.kl_weight(0, 6.6, W)) == 0.0 and float(obj_lib.kl_weight(W, 6.6, W)) == pytest.approx(6.6)
    assert float(obj_lib.kl_weight(0, 6.6, 0)) == pytest.approx(6.6)   # no warm-up: constant


def test_gumbel_softmax_relaxation():
    logits = jnp.asarray([[1.0, 0.0, -1.0, 2.0, 0.5]])
    key = jax.random.PRNGKey(3)
    # The formula, with the same Gumbel draws.
    g = np.asarray(jax.random.gumbel(key, (1, 5)))
    for tau in (1.0, 0.3, 1 / 16):
        y = (np.asarray(logits) + g) / tau
        ref = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
        np.testing.assert_allclose(np.asarray(obj_lib.gumbel_softmax(key, logits, tau)), ref, rtol=1e-5, atol=1e-7)
    # Distribution: the relaxed sample's argmax is a draw of softmax(logits) (the Gumbel-max
    # trick), and at a low temperature the sample is nearly one-hot.
    keys = jax.random.split(jax.random.PRNGKey(0), 40000)
    z = jax.vmap(lambda k: obj_lib.gumbel_softmax(k, logits[0], 1 / 16))(keys)
    freq = np.bincount(np.asarray(z.argmax(-1)), minlength=5) / len(keys)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.01)
    np.testing.assert_allclose(np.asarray(z.sum(-1)), 1.0, rtol=1e-5)
    assert float(jnp.median(z.max(-1))) > 0.99
    z1 = jax.vmap(lambda k: obj_lib.gumbel_softmax(k, logits[0], 1.0))(keys)
    assert float(jnp.median(z1.max(-1))) < 0.9   # tau = 1 is far from one-hot


def test_kl_to_uniform_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(3, 4, 4, 50)).astype(np.float32) * 2
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    ref = np.sum(q * np.log(q / (1.0 / 50)), axis=-1)
    np.testing.assert_allclose(np.asarray(obj_lib.kl_to_uniform(jnp.asarray(logits))), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(obj_lib.kl_to_uniform(jnp.zeros((2, 50)))), 0.0, atol=1e-5)
    one_hot = jnp.asarray(np.eye(50)[:2] * 100.0)
    np.testing.assert_allclose(np.asarray(obj_lib.kl_to_uniform(one_hot)), math.log(50), rtol=1e-5)


def test_logit_laplace_matches_the_paper():
    """A.3: f(x | mu, b) = 1 / (2 b x (1 - x)) exp(-|logit(x) - mu| / b) on the mapped pixels
    x = (1 - 2 eps) p + eps (dall_e.utils.map_pixels, eps 0.1); the NLL is -ln f."""
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    p[0, 0, 0] = (0.0, 1.0, 0.5)
    mu, ln_b = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3)) * 0.5
    x = 0.8 * p.astype(np.float64) + 0.1
    b = np.exp(ln_b)
    f = 1.0 / (2 * b * x * (1 - x)) * np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b)
    stats = jnp.asarray(np.concatenate([mu, ln_b], -1), jnp.float32)
    np.testing.assert_allclose(np.asarray(obj_lib.logit_laplace_nll(jnp.asarray(p), stats)), -np.log(f),
                               rtol=1e-5, atol=1e-5)
    # A proper density on (0, 1): it integrates to 1 (substituting x = sigmoid(u)).
    u = np.linspace(-30, 30, 300001)
    x_1mx = 1 / ((1 + np.exp(-u)) * (1 + np.exp(u)))   # x (1 - x) = dx / du
    dens = 1.0 / (2 * 0.7 * x_1mx) * np.exp(-np.abs(u - 0.3) / 0.7) * x_1mx
    assert abs(np.trapezoid(dens, u) - 1.0) < 1e-4
    # The reconstruction is unmap_pixels(sigmoid(mu)) (dall_e's usage notebook).
    rec = np.clip((1 / (1 + np.exp(-mu)) - 0.1) / 0.8, 0, 1)
    np.testing.assert_allclose(np.asarray(dvae_lib.reconstruction(stats)), rec, rtol=1e-5, atol=1e-6)


def test_patch_mean_baseline():
    x = np.random.default_rng(2).uniform(size=(2, 8, 12, 3)).astype(np.float32)
    ours = np.asarray(obj_lib.patch_mean_baseline(jnp.asarray(x), 4))
    ref = np.empty_like(x)
    for i in range(0, 8, 4):
        for j in range(0, 12, 4):
            ref[:, i:i + 4, j:j + 4] = x[:, i:i + 4, j:j + 4].mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # Its MSE is the mean within-patch variance; a patch-constant image has none.
    np.testing.assert_allclose(float(np.mean((ours - x) ** 2)),
                               x.reshape(2, 2, 4, 3, 4, 3).var(axis=(2, 4)).mean(), rtol=1e-5)
    flat = np.repeat(np.repeat(x[:, ::4, ::4], 4, 1), 4, 2)
    assert float(np.abs(np.asarray(obj_lib.patch_mean_baseline(jnp.asarray(flat), 4)) - flat).max()) < 1e-6


def _loss_inputs(c):
    """(objective, 3 random 16 px images, unboxed params, extra, rng, step 5) for one loss call."""
    obj = make_objective(c)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 16, 16, 3)), jnp.float32)
    params, extra = obj.init(jax.random.PRNGKey(0), {"image": x})
    return obj, x, flax.linen.meta.unbox(params), extra, jax.random.PRNGKey(5), 5


def test_loss_is_the_scaled_elbo(shapes_data_dir):
    """loss = mean_x[mean_values(NLL of the decoded relaxed sample) + beta(t) sum_pos KL / (H W C)],
    recomputed here from the model's pieces; the relaxed sample carries gradients to the encoder."""
    c = _tiny(shapes_data_dir)
    c.objective.update(dict(kl_weight=2.0, kl_warmup_steps=10, temp_steps=20))
    obj, x, params, extra, rng, step = _loss_inputs(c)
    loss, (metrics, _) = obj.loss(params, extra, {"image": x}, rng, step)
    m = obj.model
    logits = m.apply({"params": params}, x, method=m.encode)
    tau = 1 / 16 + (15 / 16) * 0.5 * (1 + np.cos(np.pi * 5 / 20))
    beta = 2.0 * 0.5 * (1 - np.cos(np.pi * 5 / 10))
    g = np.asarray(jax.random.gumbel(rng, logits.shape))
    y = (np.asarray(logits, np.float64) + g) / tau
    z = np.exp(y - y.max(-1, keepdims=True))
    z /= z.sum(-1, keepdims=True)
    stats = np.asarray(m.apply({"params": params}, jnp.asarray(z, jnp.float32), method=m.decode), np.float64)
    xm = 0.8 * np.asarray(x, np.float64) + 0.1
    mu, ln_b = stats[..., :3], stats[..., 3:]
    nll = np.log(2) + ln_b + np.log(xm * (1 - xm)) + np.abs(np.log(xm / (1 - xm)) - mu) / np.exp(ln_b)
    q = np.exp(np.asarray(logits, np.float64))
    q /= q.sum(-1, keepdims=True)
    kl = np.sum(q * np.log(q * 32), axis=(1, 2, 3))
    ref = np.mean(nll.mean(axis=(1, 2, 3)) + beta * kl / (16 * 16 * 3))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["temperature"]), tau, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl_weight"]), beta, rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: obj.loss(p, extra, {"image": x}, rng, step)[0]))(params)
    assert float(jnp.abs(grads["encoder"]["input"]["w"]).max()) > 0


def test_mse_variant_and_eval_metrics(shapes_data_dir):
    c = _tiny(shapes_data_dir, **{"model.output": "mse"})
    obj = make_objective(c)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
    params, extra = flax.linen.meta.unbox(obj.init(jax.random.PRNGKey(0), {"image": x}))
    assert params["decoder"]["output"]["conv"]["b"].shape == (3,)
    loss, (metrics, _) = obj.loss(params, extra, {"image": x}, jax.random.PRNGKey(1), 0)
    assert float(loss) == pytest.approx(float(metrics["nll"]), rel=1e-6)   # beta(0) = 0: the MSE alone
    out = obj.eval_metrics(params, extra, {"image": x}, None)
    codes = obj.model.apply({"params": extra["ema"]}, x, method=obj.model.tokens)
    stats = obj.model.apply({"params": extra["ema"]}, codes, method=obj.model.decode_tokens)
    np.testing.assert_allclose(np.asarray(out["recon_mse"]),
                               np.mean((np.clip(np.asarray(stats), 0, 1) - np.asarray(x)) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)
    base = np.asarray(obj_lib.patch_mean_baseline(x, 4))
    np.testing.assert_allclose(np.asarray(out["baseline_mse"]), np.mean((base - np.asarray(x)) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)
    assert obj.features(params, extra, x).shape == (2, 32)
    np.testing.assert_allclose(np.asarray(obj.features(params, extra, x).sum(-1)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode, diversity_of", [("argmax", "q"), ("sample", "q"), ("argmax", "sharp")])
def test_straight_through_decodes_a_hard_code_and_diversity_is_the_batch_kl(shapes_data_dir, mode, diversity_of):
    """straight_through: the decoder reads one_hot(argmax(logits)) ('argmax': the codes a
    tokenizer hands on) or one_hot(argmax(logits + g)) ('sample': the Gumbel-max draw of the
    relaxed sample), and the gradients are the relaxed sample's; diversity_weight w adds
    w * KL(mean_{batch, positions} q || uniform), with q = softmax(logits) ('q') or
    softmax(logits / temperature) ('sharp')."""
    c = _tiny(shapes_data_dir)
    c.objective.update(dict(kl_weight=2.0, kl_warmup_steps=0, temp_steps=10, straight_through=mode,
                            diversity_weight=0.3, diversity_of=diversity_of))
    obj, x, params, extra, rng, step = _loss_inputs(c)
    loss, (metrics, _) = obj.loss(params, extra, {"image": x}, rng, step)
    m = obj.model
    logits = np.asarray(m.apply({"params": params}, x, method=m.encode), np.float64)
    pick = logits + (np.asarray(jax.random.gumbel(rng, logits.shape)) if mode == "sample" else 0.0)
    codes = jnp.asarray(pick.argmax(-1))
    stats = m.apply({"params": params}, codes, method=m.decode_tokens)
    recon = dvae_lib.reconstruction(stats, "logit_laplace")
    np.testing.assert_allclose(float(metrics["soft_recon_mse"]),
                               float(jnp.mean(jnp.square(recon - x))), rtol=1e-5)
    nll = obj_lib.logit_laplace_nll(x, stats).mean(axis=(1, 2, 3))
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = np.sum(q * np.log(q * 32), axis=(1, 2, 3))
    tau = float(obj.schedules(step)[0])
    assert tau < 0.9   # the step is past the anneal's start, so 'sharp' differs from 'q'
    sharp = np.exp((logits - logits.max(-1, keepdims=True)) / tau)
    sharp /= sharp.sum(-1, keepdims=True)
    mean_q = (sharp if diversity_of == "sharp" else q).mean(axis=(0, 1, 2))
    diversity = np.sum(mean_q * np.log(mean_q * 32))
    ref = np.mean(np.asarray(nll, np.float64) + 2.0 * kl / (16 * 16 * 3)) + 0.3 * diversity
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    grads = jax.jit(jax.grad(lambda p: obj.loss(p, extra, {"image": x}, rng, step)[0]))(params)
    assert float(jnp.abs(grads["encoder"]["input"]["w"]).max()) > 0   # through the relaxed sample


# -- config errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ({"objective.temp_end": 2.0}, "temp_end <= temp_start"),
    ({"objective.temp_schedule": "linear"}, "temp_schedule='linear'"),
    ({"objective.kl_weight": -1.0}, "must be >= 0"),
    ({"objective.ema_decay": 1.0}, r"ema_decay=1.0 must be in \[0, 1\)"),
    ({"objective.beta": 1.0}, r"unknown keys \['beta'\]"),
    ({"data.image_size": 30}, "image_size=30 must be a multiple of the dVAE's downsampling 4"),
    ({"data.pp_train": "normalize('imagenet')|keep('image')"}, r"reads images in \[0, 1\]"),
    ({"model.output": "gaussian"}, "config.model.output='gaussian'"),
    ({"model.n_hid": 10}, "n_hid=10 must be a positive multiple of 4"),
    ({"objective.straight_through": "hard"}, "straight_through='hard'; valid"),
    ({"objective.diversity_weight": -0.1}, "diversity_weight=-0.1 must be >= 0"),
    ({"objective.diversity_of": "z"}, "diversity_of='z'; valid"),
])
def test_config_errors(shapes_data_dir, override, match):
    config = _tiny(shapes_data_dir, **override)
    with pytest.raises(ConfigError, match=match):
        make_objective(config).check(config)


def test_objective_needs_a_tokenizer_model(shapes_data_dir):
    config = _tiny(shapes_data_dir)
    config.model = dict(name="vit", variant="Ti/4")
    with pytest.raises(ValueError, match=r"objective 'dvae' needs a model with \['tokenizer'\].*models that fit: \['dvae'\]"):
        make_objective(config)


# -- resume ---------------------------------------------------------------------------------------

def _metric_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _saved_state(workdir, step):
    return jax.device_get(ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state")))


def test_interrupted_and_resumed_equals_uninterrupted(shapes_data_dir, tmp_path, monkeypatch):
    """3 steps, stop, resume to 6 == 6 straight: losses (temperature / KL schedules and gumbel
    draws by step), params, optimizer state and the EMA params in extra."""
    n = 3
    config = _tiny(shapes_data_dir, total_steps=2 * n, checkpoint_every=4)
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")

    class StopAfter(loop._Preemption):
        calls = 0

        def sync(self, step=None):
            StopAfter.calls += 1
            return StopAfter.calls >= n

    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", StopAfter)
        assert loop.train_and_evaluate(config, resumed, devices=ONE_DEVICE)["step"] == n
    final_r = loop.train_and_evaluate(config, resumed, devices=ONE_DEVICE)
    final_s = loop.train_and_evaluate(config, straight, devices=ONE_DEVICE)
    assert final_r["step"] == final_s["step"] == 2 * n
    rows_r, rows_s = _metric_rows(resumed), _metric_rows(straight)
    assert sorted(rows_r) == sorted(rows_s) == list(range(1, 2 * n + 1))
    for step in rows_s:
        for key in ("train/loss", "train/nll", "train/kl", "train/temperature", "train/kl_weight", "train/grad_norm"):
            np.testing.assert_allclose(rows_r[step][key], rows_s[step][key], rtol=1e-6, err_msg=f"{key} @ {step}")
    a, b = _saved_state(resumed, 2 * n), _saved_state(straight, 2 * n)
    assert "ema" in a["extra"]
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7, err_msg=jax.tree_util.keystr(path))


# -- load_tokenizer -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory, shapes_data_dir):
    """A just-trained tiny dVAE (4 steps, EMA kept) with the recon metrics and pictures."""
    config = _tiny(shapes_data_dir)
    config.evals = dict(recon=dict(type="metrics", split="validation", examples=64),
                        images=dict(type="images", split="validation"))
    config.eval_every = 4
    workdir = str(tmp_path_factory.mktemp("dvae_tiny"))
    loop.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
    return workdir


def test_recon_metrics_and_pictures(tiny_workdir):
    with open(os.path.join(tiny_workdir, "metrics.jsonl")) as f:
        row = [json.loads(line) for line in f if "eval/recon_recon_mse" in line][-1]
    assert row["eval/recon_recon_ratio"] == pytest.approx(row["eval/recon_recon_mse"] / row["eval/recon_baseline_mse"])
    assert 0 < row["eval/recon_baseline_mse"] < 0.02
    pngs = os.listdir(os.path.join(tiny_workdir, "images"))
    assert any("images_reconstruction" in p for p in pngs), pngs


def test_load_tokenizer_from_a_workdir(tiny_workdir):
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 24, 24, 3)), jnp.float32)
    module, params = dvae_lib.load_tokenizer({"workdir": tiny_workdir}, 24)
    assert isinstance(module, dvae_lib.DVAE) and module.vocab_size == 32 and module.downsample == 4
    state = _saved_state(tiny_workdir, 4)
    codes = module.apply({"params": params}, x, method=dvae_lib.DVAE.tokens)
    assert codes.shape == (2, 6, 6) and codes.dtype == jnp.int32
    logits = module.apply({"params": state["extra"]["ema"]}, x, method=dvae_lib.DVAE.encode)  # EMA by default
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(logits.argmax(-1)))
    _, raw = dvae_lib.load_tokenizer({"workdir": tiny_workdir, "ema": False, "step": 2}, 24)
    np.testing.assert_array_equal(np.asarray(raw["encoder"]["input"]["w"]),
                                  _saved_state(tiny_workdir, 2)["params"]["encoder"]["input"]["w"])
    with pytest.raises(ValueError, match=r"no checkpoint at step 3; available: \[2, 4\]"):
        dvae_lib.load_tokenizer({"workdir": tiny_workdir, "step": 3}, 24)
    with pytest.raises(ValueError, match="image_size=30 must be a positive multiple of its downsampling 4"):
        dvae_lib.load_tokenizer({"workdir": tiny_workdir}, 30)


def test_load_tokenizer_random_and_errors(tmp_path):
    spec = {"init": "random", "seed": 3, "model": dict(TINY_MODEL)}
    m1, p1 = dvae_lib.load_tokenizer(spec, 16)
    _, p2 = dvae_lib.load_tokenizer(dict(spec), 16)
    _, p3 = dvae_lib.load_tokenizer(dict(spec, seed=4), 16)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p1, p2))
    assert not np.array_equal(p1["encoder"]["input"]["w"], p3["encoder"]["input"]["w"])
    codes = m1.apply({"params": p1}, jnp.ones((1, 16, 16, 3)) * 0.5, method=dvae_lib.DVAE.tokens)
    assert codes.shape == (1, 4, 4) and int(codes.max()) < 32
    default, _ = dvae_lib.load_tokenizer({"init": "random"}, 16)   # the published architecture
    assert (default.vocab_size, default.group_count, default.n_hid) == (8192, 4, 256)
    with pytest.raises(ValueError, match="exactly one of workdir=DIR, torch=FILE or init='random'"):
        dvae_lib.load_tokenizer({"init": "random", "workdir": "/x"}, 16)
    with pytest.raises(ValueError, match=r"unknown keys \['path'\]"):
        dvae_lib.load_tokenizer({"path": "/x"}, 16)
    with pytest.raises(ValueError, match="no config.json"):
        dvae_lib.load_tokenizer({"workdir": str(tmp_path)}, 16)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "vit"}, "objective": {"name": "mae"}}))
    with pytest.raises(ValueError, match="a tokenizer needs a dvae run"):
        dvae_lib.load_tokenizer({"workdir": str(tmp_path)}, 16)
    with pytest.raises(ValueError, match="torch=/nonexistent.pt: no such file"):
        dvae_lib.load_tokenizer({"torch": "/nonexistent.pt"}, 16)


# -- learning -------------------------------------------------------------------------------------

@pytest.mark.optimized
@pytest.mark.slow
def test_default_learns(tmp_path, shapes_data_dir):
    """A shortened default run from the command line (so the preset's config.xla_flags apply):
    the hard-token reconstruction MSE falls well below its initial value and the NLL falls
    (200 steps: measured 8.45 -> 3.30 on 2026-12-02 in-process; 8.45 -> 3.37 with the flags, 79 s)."""
    from fmjax.testing import run_cli
    steps = 200
    proc = run_cli("train", "--config=configs/dvae.py", f"--workdir={tmp_path}",
                   f"--config.data.data_dir={shapes_data_dir}", f"--config.total_steps={steps}",
                   f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
                   "--config.log_every=10", "--config.objective.kl_warmup_steps=30",
                   "--config.evals.recon.examples=500", "--config.evals.val_loss.examples=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ynn_fusion_type=reduce" in proc.stdout + proc.stderr  # the preset's flags were applied
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in rows if "eval/recon_recon_mse" in r}
    train = [r for r in rows if "train/nll" in r]
    start, end = evals[0]["eval/recon_recon_ratio"], evals[steps]["eval/recon_recon_ratio"]
    print(f"dvae recon ratio {start:.3f} -> {end:.3f}; nll {train[0]['train/nll']:.3f} -> {train[-1]['train/nll']:.3f}")
    assert end < 0.5 * start
    assert train[-1]["train/nll"] < train[0]["train/nll"] - 0.1
    assert os.listdir(os.path.join(tmp_path, "images"))


def test_beit_random_init_baseline_loads_the_tokenizer_workdir(tiny_workdir, shapes_data_dir):
    """launch/eval.py --random_init_seeds on BEiT with a trained tokenizer: the tokenizer is
    read on the host by the objective's check, not inside the jitted init (it failed there)."""
    from fmjax.testing import load_config
    from fmjax.train import eval_only
    c = load_config("beit")
    c.data.data_dir = shapes_data_dir
    c.batch_size = 8
    c.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    c.objective.update(dict(vocab_size=32))
    c.objective.tokenizer = dict(workdir=tiny_workdir)
    c.evals = dict(knn=dict(type="knn", split="validation", examples=64, train_split="train",
                            train_examples=64))
    out = eval_only.evaluate_random_inits(c, 1, devices=ONE_DEVICE)
    assert len(out["eval/knn_top1"]) == 1
