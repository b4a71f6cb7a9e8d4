"""``objective.schedule_precision='float64'`` in sampling: the DDPM posterior coefficients.

The reference is facebookresearch/DiT at commit ed81ce2229091fd4ecc9a223645f95cf379d582b
(OpenAI guided-diffusion's code): ``diffusion/gaussian_diffusion.py`` ``GaussianDiffusion.__init__``
builds ``posterior_variance``, ``posterior_log_variance_clipped``, ``posterior_mean_coef1/2``,
``sqrt_recip(m1)_alphas_cumprod`` in float64 NumPy from float64 betas, and ``_extract_into_tensor``
casts an entry to float32 at use; ``p_mean_variance`` / ``p_sample`` (x0 from eps, clip, posterior
mean, ``mean + (t != 0) exp(0.5 log_variance) noise``); ``diffusion/respace.py`` ``SpacedDiffusion``
(``new_betas = 1 - a_t / a_prev`` over the kept timesteps). Transcribed below (``GaussianDiffusion``,
``p_sample``), in float64 NumPy for the tables and float32 torch for the step, as the original.

fmjax: ``make_schedule(precision='float64')`` keeps the float64 betas / alpha-bar on the host
(``Schedule.host64``); ``posterior_coefficients`` builds the tables from them and ``ddpm_step`` /
``sample`` use those (float32 schedules keep diffusers' float32 formulas, checked against
diffusers in test_process_parity.py). Measured: the float64 tables equal the transcription's
cast to float32 (max relative error 5.9e-8, float32 rounding); the float32 default's effective
coefficients differ from them by up to 4.4e-4 (coef1), 1.6e-4 (coef2), 1.9e-4 (std) relative,
largest at t <= 10.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.diffusion import process
from fmjax.diffusion import sampling

torch = pytest.importorskip("torch")

T = 1000
FIELDS = {  # Posterior field -> GaussianDiffusion attribute
    "mean_coef1": "posterior_mean_coef1", "mean_coef2": "posterior_mean_coef2",
    "variance": "posterior_variance", "log_variance_clipped": "posterior_log_variance_clipped",
    "beta": "betas", "log_beta": "log_betas",
    "sqrt_recip_alphas_cumprod": "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod": "sqrt_recipm1_alphas_cumprod",
}


class GaussianDiffusion:
    """gaussian_diffusion.py ``GaussianDiffusion.__init__``: the float64 tables."""
    def __init__(self, betas):
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.log_betas = np.log(betas)
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)


def spaced_diffusion(betas, use_timesteps):
    """respace.py ``SpacedDiffusion.__init__``: the kept timesteps' betas, and the map index -> t."""
    base = GaussianDiffusion(betas)
    last, new_betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(base.alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    return GaussianDiffusion(np.array(new_betas)), timestep_map


def _extract(arr, t, shape):
    res = torch.from_numpy(arr)[t].float()
    while res.dim() < len(shape):
        res = res[..., None]
    return res + torch.zeros(shape)


def p_sample(diffusion, eps, x, t, noise, var_type="fixed_small", clip_denoised=True, var_values=None):
    """p_mean_variance + p_sample for an eps model (FIXED_SMALL / FIXED_LARGE / LEARNED_RANGE);
    ``t`` the diffusion's own indices (a SpacedDiffusion's respaced ones)."""
    d = diffusion
    if var_type == "learned_range":
        min_log = _extract(d.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract(np.log(d.betas), t, x.shape)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
    else:
        table = {"fixed_large": np.log(np.append(d.posterior_variance[1], d.betas[1:])),
                 "fixed_small": d.posterior_log_variance_clipped}[var_type]
        log_var = _extract(table, t, x.shape)
    x0 = _extract(d.sqrt_recip_alphas_cumprod, t, x.shape) * x - _extract(d.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean = _extract(d.posterior_mean_coef1, t, x.shape) * x0 + _extract(d.posterior_mean_coef2, t, x.shape) * x
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
    return mean + nonzero_mask * torch.exp(0.5 * log_var) * noise


def _betas64(name):
    sched = process.make_schedule(name, T, precision="float64")
    return sched, sched.host64.betas


def _effective(schedule, t, variance_type="fixed_small"):
    """The coefficients ``ddpm_step`` applies at (t, t - 1), read off its output: x0 prediction
    given ('sample', no clipping), so mean = coef1 x0 + coef2 x_t and x_prev = mean + std noise."""
    t = np.asarray(t)
    one, zero = jnp.ones(t.shape), jnp.zeros(t.shape)
    kw = dict(prediction_type="sample", clip_sample=False, variance_type=variance_type)
    c1 = sampling.ddpm_step(schedule, one, t, zero, **kw)[0]
    c2 = sampling.ddpm_step(schedule, zero, t, one, **kw)[0]
    std = sampling.ddpm_step(schedule, zero, t, zero, one, **kw)[0]
    return np.asarray(c1), np.asarray(c2), np.asarray(std)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float64_tables_are_guided_diffusions(name):
    """posterior_coefficients(float64 schedule, arange(T)) = GaussianDiffusion's tables cast to
    float32, for t <= 10 and every t: 1e-7 relative (float32 rounding is <= 6e-8)."""
    sched, betas = _betas64(name)
    ref = GaussianDiffusion(betas)
    if name == "linear":  # DiT's get_named_beta_schedule('linear', 1000)
        np.testing.assert_array_equal(betas, np.linspace(1e-4, 0.02, T, dtype=np.float64))
    post = sampling.posterior_coefficients(sched, np.arange(T))
    worst = {}
    for field, attr in FIELDS.items():
        got, want = np.asarray(getattr(post, field)), getattr(ref, attr)
        assert got.dtype == np.float32 and got.shape == (T,)
        for ts in (slice(0, 11), slice(0, T)):
            np.testing.assert_allclose(got[ts], want[ts], rtol=1e-7, atol=0, err_msg=f"{field}[{ts}]")
        worst[field] = _rel(got, want).max()
    assert post.variance[0] == 0 and post.log_variance_clipped[0] == np.float32(ref.posterior_log_variance_clipped[0])
    print(name, {k: f"{v:.1e}" for k, v in worst.items()})


def test_float32_default_differs_at_small_t():
    """What ddpm_step applies: with the float64 schedule, guided-diffusion's coefficients (1e-7);
    with the float32 default (diffusers: float32 alpha-bar, float32 arithmetic), off by more than
    1e-6 relative at t <= 10 (measured up to 4.4e-4), so the two conventions really differ."""
    t = np.arange(1, T)
    ref = GaussianDiffusion(np.linspace(1e-4, 0.02, T, dtype=np.float64))
    want = (ref.posterior_mean_coef1[t], ref.posterior_mean_coef2[t], np.sqrt(ref.posterior_variance[t]))
    sched64 = process.make_schedule("linear", T, precision="float64")
    for got, w, name in zip(_effective(sched64, t), want, ("coef1", "coef2", "std")):
        np.testing.assert_allclose(got, w, rtol=2e-7, atol=0, err_msg=name)
    large = _effective(sched64, t, "fixed_large")[2]
    np.testing.assert_allclose(large, np.sqrt(ref.betas[t]), rtol=2e-7)
    sched32 = process.make_schedule("linear", T)
    errs = [_rel(got, w) for got, w in zip(_effective(sched32, t), want)]
    small = t <= 10
    worst_small = max(e[small].max() for e in errs)
    assert worst_small > 1e-6, worst_small
    print(f"float32 default vs float64 tables, t <= 10: coef1 {errs[0][small].max():.1e}, "
          f"coef2 {errs[1][small].max():.1e}, std {errs[2][small].max():.1e}; all t: "
          f"{max(e.max() for e in errs):.1e}")


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_is_p_sample(var_type):
    """One ddpm_step of an eps model with the float64 schedule = p_sample (float32 torch on the
    cast float64 tables) at t in {0, 1, 2, 5, 10, 500, 999}, clipping on and off (1e-6).
    guided-diffusion's FIXED_SMALL is fmjax's 'fixed_small_log' (std exp(0.5 log variance))."""
    sched = process.make_schedule("linear", T, precision="float64")
    ref = GaussianDiffusion(sched.host64.betas)
    rng = np.random.default_rng(0)
    t = np.array([0, 1, 2, 5, 10, 500, 999])
    shape = (len(t), 4, 4, 3)
    x, eps, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    var_values = rng.uniform(-1, 1, shape).astype(np.float32)
    fm_type = {"fixed_small": "fixed_small_log"}.get(var_type, var_type)
    for clip in (True, False):
        want = p_sample(ref, torch.from_numpy(eps), torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(noise),
                        var_type, clip, torch.from_numpy(var_values)).numpy()
        got, _ = sampling.ddpm_step(sched, jnp.asarray(eps), t, jnp.asarray(x), jnp.asarray(noise),
                                   variance_type=fm_type, clip_sample=clip,
                                   predicted_variance=jnp.asarray(var_values))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_respaced_sample_is_spaced_diffusion():
    """sample(sampler='ddpm', num_steps=10) with the float64 schedule = SpacedDiffusion over the
    same 10 timesteps, p_sample at each (same x_T and noises, eps model 0.4 x + 0.001 t), for
    FIXED_SMALL and FIXED_LARGE, to 1e-6 after 10 steps (measured 3.6e-7; sampling with the
    float32 schedule is 2.0e-6 off, the clipped x0 and coef1 = 1 at t = 0 hide most of its
    4e-4); and the chain's coefficients = the respaced GaussianDiffusion's tables cast (1e-7)."""
    sched = process.make_schedule("linear", T, precision="float64")
    shape = (2, 4, 4, 3)
    rng = jax.random.PRNGKey(3)
    ts = sampling.timesteps(T, 10, "leading")
    model = lambda x, t: 0.4 * x + 0.001 * t.reshape(-1, 1, 1, 1).astype(jnp.float32)
    x_T = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
    noises = [np.array(jax.random.normal(jax.random.fold_in(jax.random.split(rng)[1], i), shape, jnp.float32))
              for i in range(len(ts))]
    spaced, timestep_map = spaced_diffusion(sched.host64.betas, set(ts.tolist()))
    assert timestep_map == sorted(ts.tolist())
    for var_type, fm_type in (("fixed_small", "fixed_small_log"), ("fixed_large", "fixed_large")):
        got = sampling.sample(model, sched, shape, rng, sampler="ddpm", num_steps=10, variance_type=fm_type)
        x = torch.from_numpy(np.array(x_T))
        for i, t in enumerate(ts):
            idx = torch.full((shape[0],), timestep_map.index(int(t)))
            eps = 0.4 * x + 0.001 * float(t)
            x = p_sample(spaced, eps, x, idx, torch.from_numpy(noises[i]), var_type)
        np.testing.assert_allclose(np.asarray(got), x.numpy(), rtol=1e-6, atol=1e-6)
    post = sampling.posterior_coefficients(sched, ts, sampling.previous_timesteps(ts, "ddpm", T))
    for field, attr in FIELDS.items():
        want = getattr(spaced, attr)[[timestep_map.index(int(t)) for t in ts]]
        np.testing.assert_allclose(np.asarray(getattr(post, field)), want, rtol=1e-7, err_msg=field)


def test_schedule_pytree_and_errors():
    """host64 is static metadata (hashable by value: a float64 schedule can be a jit argument and
    hits the cache), not a leaf; float32 schedules have none. Traced timesteps need the
    coefficients precomputed; float32 schedules have no posterior_coefficients."""
    s64 = process.make_schedule("linear", T, precision="float64")
    s32 = process.make_schedule("linear", T)
    assert s32.host64 is None and len(jax.tree.leaves(s64)) == 5
    assert process.make_schedule("linear", T, precision="float64").host64 == s64.host64
    assert hash(process.make_schedule("linear", T, precision="float64").host64) == hash(s64.host64)
    traces = []

    def noisy(s, x, t):
        traces.append(1)   # runs once per trace: a second trace would be a cache miss
        return process.add_noise(s, x, x, t)
    f = jax.jit(noisy)
    x = jnp.ones((2, 3))
    f(s64, x, jnp.array([1, 2]))
    f(process.make_schedule("linear", T, precision="float64"), x, jnp.array([1, 2]))
    assert len(traces) == 1
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda t: sampling.ddpm_step(s64, x, t, x)[0])(jnp.array([1, 2]))
    post = sampling.posterior_coefficients(s64, np.array([1, 2]))
    jitted = jax.jit(lambda t, p: sampling.ddpm_step(s64, x, t, x, posterior=p)[0])
    np.testing.assert_allclose(np.asarray(jitted(jnp.array([1, 2]), post)),
                               np.asarray(sampling.ddpm_step(s64, x, np.array([1, 2]), x)[0]), rtol=1e-7)
    with pytest.raises(ValueError, match="float64 schedule"):
        sampling.posterior_coefficients(s32, np.arange(3))
    with pytest.raises(ValueError, match="prev_t must be below t"):
        sampling.posterior_coefficients(s64, np.array([5]), np.array([5]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        sampling.posterior_coefficients(s64, np.array([1000]))
