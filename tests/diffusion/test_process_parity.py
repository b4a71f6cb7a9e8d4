"""fmjax.diffusion.process against diffusers' DDPMScheduler / DDIMScheduler (float32, CPU).

Tables, forward process, one reverse step per configuration (same explicit noise on both
sides), the inference timestep sequences, and the ``sample`` loop: a DDIM run against the
diffusers loop with the same x_T, determinism across calls and device counts, and oracle
models that must recover a known x0.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.diffusion import process
from fmjax.diffusion import sampling

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

RTOL = 1e-5
SHAPE = (4, 3, 8, 8)  # the process is elementwise: torch's NCHW arrays are used as they are
NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
         "sigmoid": "sigmoid"}


def _close(actual, expected, rtol=RTOL):
    """rtol relative to the array's own scale (values near 0 get the same absolute slack)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
    return np.abs(actual - expected).max() / scale


def _randn(seed, shape=SHAPE, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", list(NAMES))
def test_schedule_tables(name, rescale):
    ref = DDPMScheduler(beta_schedule=NAMES[name], rescale_betas_zero_snr=rescale)
    sched = process.make_schedule(name, 1000, rescale_zero_snr=rescale)
    # alphas / alphas_cumprod are within 1 ulp (bit-exact for linear, scaled_linear, cosine);
    # betas = 1 - alphas after the zero-SNR rescale inherit that absolute error. The rescale
    # takes sqrt(alpha-bar): torch 2.13's float32 sqrt is 1 ulp off the correctly rounded one
    # (NumPy's) for some inputs, and alphas = ab[t] / ab[t-1] of the small alpha-bars near T
    # amplify that to up to 1.5e-5 relative (measured, sigmoid t=998), hence 3e-5 there.
    rtol = 3e-5 if rescale else 1e-6
    for field in ("alphas", "alphas_cumprod"):
        np.testing.assert_allclose(np.asarray(getattr(sched, field)), getattr(ref, field).numpy(),
                                   rtol=rtol, atol=0)
    np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), rtol=rtol, atol=1e-6)
    if not rescale and name != "sigmoid":
        np.testing.assert_array_equal(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert sched.num_timesteps == 1000


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="valid: 'linear'"):
        process.make_betas("quadratic")
    with pytest.raises(ValueError, match="prediction_type"):
        process.training_target(process.make_schedule(), 0.0, 0.0, 0, "score")
    with pytest.raises(ValueError, match="spacing"):
        sampling.timesteps(1000, 10, "uniform")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_add_noise_and_velocity(name):
    ref = DDPMScheduler(beta_schedule=NAMES[name])
    sched = process.make_schedule(name)
    x0, noise = _randn(0), _randn(1)
    t = np.array([0, 1, 500, 999])
    tt = torch.from_numpy(t)
    _close(process.add_noise(sched, x0, noise, t),
           ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy())
    _close(process.velocity(sched, x0, noise, t),
           ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy())
    assert process.training_target(sched, x0, noise, t, "epsilon") is noise
    _close(process.training_target(sched, x0, noise, t, "v_prediction"),
           process.velocity(sched, x0, noise, t))


def _ddpm_ref_step(ref, out, t, x, seed):
    gen = torch.Generator().manual_seed(seed)
    res = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=gen)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).numpy()  # = randn_tensor's draw
    return res.prev_sample.numpy(), res.pred_original_sample.numpy(), noise


@pytest.mark.parametrize("prediction_type", process.PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log"])
def test_ddpm_step(variance_type, prediction_type):
    ref = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type, clip_sample=True,
                        clip_sample_range=1.5)
    sched = process.make_schedule("linear")
    x = _randn(2)
    for t in (999, 500, 20, 0):
        out = _randn(t + 3, scale=1.0 if prediction_type != "sample" else 2.0)
        want, want_x0, noise = _ddpm_ref_step(ref, out, t, x, seed=t)
        got, got_x0 = sampling.ddpm_step(sched, out, t, x, noise, prediction_type=prediction_type,
                                        variance_type=variance_type, clip_sample=True,
                                        clip_sample_range=1.5)
        _close(got, want)
        _close(got_x0, want_x0)


@pytest.mark.parametrize("spacing", process.SPACINGS)
def test_ddpm_step_fewer_inference_steps(spacing):
    """set_timesteps(N < T): prev_t is the next timestep of the sequence (-1 after the last)."""
    n = 7
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
                        prediction_type="v_prediction", clip_sample=False, timestep_spacing=spacing)
    ref.set_timesteps(n)
    sched = process.make_schedule("cosine")
    ts = sampling.timesteps(sched, n, spacing)
    prev = sampling.previous_timesteps(ts, "ddpm", 1000)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    x = _randn(4)
    for i in (0, 3, n - 1):
        t = int(ts[i])
        assert int(ref.previous_timestep(t)) == prev[i]
        out = _randn(10 + i)
        want, want_x0, noise = _ddpm_ref_step(ref, out, t, x, seed=i)
        got, got_x0 = sampling.ddpm_step(sched, out, t, x, noise, prev_t=prev[i],
                                        prediction_type="v_prediction", variance_type="fixed_large",
                                        clip_sample=False)
        _close(got, want)
        _close(got_x0, want_x0)


def test_ddpm_step_learned_range():
    """DiT / improved-DDPM: the variance half of a 2C-channel output interpolates log-variances."""
    ref = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    sched = process.make_schedule("linear")
    x = _randn(5)
    out = np.concatenate([_randn(6), np.tanh(_randn(7))], axis=1)  # NCHW, 2C channels
    for t in (700, 1):
        want, want_x0, noise = _ddpm_ref_step(ref, out, t, x, seed=t)
        got, got_x0 = sampling.ddpm_step(sched, out[:, :3], t, x, noise, clip_sample=False,
                                        variance_type="learned_range", predicted_variance=out[:, 3:])
        _close(got, want)
        _close(got_x0, want_x0)


def test_steps_per_example_timesteps():
    """A [B] vector of timesteps (and prev_t) equals B scalar steps, also under jit."""
    sched = process.make_schedule("linear")
    x, out, noise = _randn(30), _randn(31), _randn(32)
    t, prev = np.array([999, 400, 3, 0]), np.array([979, 380, -17, -20])
    for step, kw in [(sampling.ddpm_step, dict(variance_type="fixed_large")), (sampling.ddim_step, dict(eta=0.5))]:
        got = jax.jit(lambda o, t, x, n, p: step(sched, o, t, x, n, prev_t=p, **kw)[0])(out, t, x, noise, prev)
        for b in range(4):
            want = step(sched, out[b], int(t[b]), x[b], noise[b], prev_t=int(prev[b]), **kw)[0]
            np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", process.SPACINGS)
def test_ddim_step(spacing, eta):
    n = 50
    sched = process.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = _randn(8)
    configs = [dict(prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True, steps_offset=0),
               dict(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
               dict(prediction_type="sample", clip_sample=True, set_alpha_to_one=False, steps_offset=0)]
    for k, cfg in enumerate(configs):
        ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            timestep_spacing=spacing, **cfg)
        ref.set_timesteps(n)
        ts = sampling.timesteps(sched, n, spacing, steps_offset=cfg["steps_offset"])
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
        prev = sampling.previous_timesteps(ts, "ddim", 1000)
        for i in (0, n // 2, n - 1):
            t, out, noise = int(ts[i]), _randn(20 + i + k), _randn(40 + i + k)
            res = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                           use_clipped_model_output=cfg["clip_sample"],
                           variance_noise=torch.from_numpy(noise))
            got, got_x0 = sampling.ddim_step(sched, out, t, x, noise, prev_t=prev[i], eta=eta,
                                            prediction_type=cfg["prediction_type"],
                                            clip_sample=cfg["clip_sample"],
                                            set_alpha_to_one=cfg["set_alpha_to_one"],
                                            use_clipped_model_output=cfg["clip_sample"])
            _close(got, res.prev_sample.numpy())
            _close(got_x0, res.pred_original_sample.numpy())


def test_timestep_sequences():
    for T in (1000, 10):
        for n in (1, 3, 7, 10, 50, 999, 1000):
            if n > T:
                continue
            for spacing in process.SPACINGS:
                for offset in (0, 1):
                    for cls in (DDPMScheduler, DDIMScheduler):
                        ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                        ref.set_timesteps(n)
                        ts = sampling.timesteps(T, n, spacing, steps_offset=offset)
                        np.testing.assert_array_equal(ts, ref.timesteps.numpy(), err_msg=f"{T} {n} {spacing}")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling.timesteps(10, 11)


def test_conversions_and_loss_weights():
    sched = process.make_schedule("cosine")
    x0, noise = _randn(11), _randn(12)
    t = np.array([0, 10, 600, 999])
    x_t = process.add_noise(sched, x0, noise, t)
    snr = np.asarray(process.snr(sched, t))
    from diffusers.training_utils import compute_snr
    _close(snr, compute_snr(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), torch.from_numpy(t)).numpy())
    pred_x0 = _randn(13)  # an imperfect model, expressed in each parameterisation
    x0_err = ((pred_x0 - x0) ** 2).mean(axis=(1, 2, 3))
    for ptype in process.PREDICTION_TYPES:
        target = process.training_target(sched, x0, noise, t, ptype)
        got_x0, got_eps = process.pred_to_x0_eps(sched, x_t, t, target, ptype)  # exact target -> (x0, eps)
        _close(got_x0, x0, rtol=1e-3)  # /sqrt(a_999) amplifies float32 rounding
        _close(got_eps, noise, rtol=1e-3)
        out = process.convert_prediction(sched, x_t, t, pred_x0, "sample", ptype)
        pred_err = ((out - np.asarray(target)) ** 2).mean(axis=(1, 2, 3))
        for weighting, w in [("snr", snr), ("min_snr_gamma", np.minimum(snr, 5.0)),
                             ("truncated_snr", np.maximum(snr, 1.0)), ("snr_plus_one", snr + 1)]:
            mult = np.asarray(process.loss_weight(sched, t, ptype, weighting))
            _close(mult * pred_err, w * x0_err, rtol=2e-3)  # the same loss in x0 space
    # Hang et al. / diffusers' train_text_to_image: min(SNR, 5) / SNR (eps), / (SNR + 1) (v)
    _close(process.loss_weight(sched, t, "epsilon", "min_snr_gamma"), np.minimum(snr, 5) / snr)
    _close(process.loss_weight(sched, t, "v_prediction", "min_snr_gamma"), np.minimum(snr, 5) / (snr + 1))
    zsnr = process.make_schedule("linear", rescale_zero_snr=True)
    assert float(process.loss_weight(zsnr, 999, "epsilon", "min_snr_gamma")) == 1.0
    assert float(process.loss_weight(zsnr, 999, "v_prediction", "min_snr_gamma")) == 0.0
    np.testing.assert_allclose(process.cfg_combine(2.0, 1.0, 3.0), 4.0)


# --------------------------------------------------------------------------- the sampling loop

def _linear_model(x, t):
    return 0.3 * x + 1e-3 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def test_sample_ddim_matches_diffusers_loop():
    """eta = 0 is deterministic given x_T: the whole 10-step loop equals diffusers'."""
    sched = process.make_schedule("linear")
    x_T = _randn(15)
    ref = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(10)
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        out = 0.3 * x + 1e-3 * t.float()
        x = ref.step(out, t, x).prev_sample
    got = sampling.sample(_linear_model, sched, SHAPE, jax.random.key(0), num_steps=10,
                         spacing="trailing", clip_sample=False, x_T=x_T)
    print("ddim loop max rel err", _close(got, x.numpy()))


@functools.lru_cache(maxsize=None)
def _trivial_sampler(sampler, sharded):
    sched = process.make_schedule("linear")
    sharding = None
    if sharded:
        sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:8]), ("data",)), P("data"))

    def run(rng):
        return sampling.sample(_linear_model, sched, (8, 4, 4, 3), rng, sampler=sampler, num_steps=5,
                              eta=1.0, sharding=sharding)
    return jax.jit(run)


@pytest.mark.parametrize("sampler", process.SAMPLERS)
def test_sample_deterministic(sampler):
    a = _trivial_sampler(sampler, False)(jax.random.key(1))
    b = _trivial_sampler(sampler, False)(jax.random.key(1))
    c = _trivial_sampler(sampler, False)(jax.random.key(2))
    d = _trivial_sampler(sampler, True)(jax.random.key(1))  # batch sharded over 8 devices
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert len(d.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(d), np.asarray(a), rtol=1e-6, atol=1e-6)


def _oracle(sched, x0, prediction_type):
    """The exact model output for a data distribution that is a single point x0."""
    def model_fn(x_t, t):
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
        return eps if prediction_type == "epsilon" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    return model_fn


@pytest.mark.parametrize("sampler,prediction_type,spacing", [
    ("ddim", "epsilon", "leading"), ("ddim", "v_prediction", "trailing"), ("ddpm", "epsilon", "linspace")])
def test_sample_oracle_recovers_x0(sampler, prediction_type, spacing):
    sched = process.make_schedule("cosine")
    x0 = jnp.tanh(jnp.asarray(_randn(16, (2, 8, 8, 3))))
    got = sampling.sample(_oracle(sched, x0, prediction_type), sched, x0.shape, jax.random.key(3),
                         sampler=sampler, num_steps=20, spacing=spacing, prediction_type=prediction_type,
                         variance_type="fixed_small")
    _close(got, x0, rtol=1e-4)


def test_sample_guidance_extrapolates():
    """CFG of two oracles: every x0 prediction, hence the DDIM result, is x0_u + s (x0_c - x0_u)."""
    sched = process.make_schedule("linear")
    x0_c = 0.5 * jnp.tanh(jnp.asarray(_randn(17, (2, 4, 4, 3))))
    x0_u = 0.5 * jnp.tanh(jnp.asarray(_randn(18, (2, 4, 4, 3))))
    got = sampling.sample(_oracle(sched, x0_c, "epsilon"), sched, x0_c.shape, jax.random.key(4),
                         num_steps=10, guidance_scale=2.5, uncond_fn=_oracle(sched, x0_u, "epsilon"),
                         clip_sample=False)
    _close(got, x0_u + 2.5 * (x0_c - x0_u), rtol=1e-4)
    with pytest.raises(ValueError, match="uncond_fn"):
        sampling.sample(_linear_model, sched, (1, 2), jax.random.key(0), guidance_scale=2.0)
