"""The Gaussian diffusion process of DDPM (Ho et al., 2020) and DDIM (Song et al., 2021).

No networks here: schedules, the forward process, training targets / loss weights, the
DDPM and DDIM reverse steps and a ``lax.scan`` sampling loop. Everything after
``make_schedule`` is pure jax.numpy (jit-able, elementwise on sharded arrays, any layout);
the per-step functions follow diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` formula by
formula (tests/diffusion/test_process_parity.py checks them against diffusers). A
``make_schedule(precision='float64')`` schedule follows facebookresearch/DiT's (guided-diffusion's)
``GaussianDiffusion`` instead: its tables and the DDPM step's posterior coefficients are built
in float64 NumPy on the host (``posterior_coefficients``) and cast to float32 at use
(tests/diffusion/test_posterior_float64.py).

Notation: ``a_t = alphas_cumprod[t]`` (alpha-bar), ``SNR(t) = a_t / (1 - a_t)``.

    forward   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps                      (add_noise)
    velocity  v   = sqrt(a_t) eps - sqrt(1 - a_t) x0                      (Salimans & Ho, 2022)
    inverse   x0  = sqrt(a_t) x_t - sqrt(1 - a_t) v,   eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
              x0  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)

Timesteps ``t`` are integers in [0, T): a scalar or one per example (shape [B]); per-example
coefficients broadcast over the trailing axes of ``x`` (NHWC or NCHW alike).
"""
from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("none", "snr", "min_snr_gamma", "truncated_snr", "snr_plus_one")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim")


def _check(arg: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{arg}={value!r}; valid: {', '.join(map(repr, valid))}.")


# --------------------------------------------------------------------------- schedules

def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded as torch's CPU kernel does (so the tables equal diffusers' bit for bit)."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i))
    return out.astype(np.float32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    """float32 cumprod accumulated in float64, as torch.cumprod on CPU."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def make_betas(schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
    """float32 [T] betas, computed as diffusers does.

    'linear': linspace(beta_start, beta_end); 'scaled_linear' (Stable Diffusion):
    linspace(sqrt(beta_start), sqrt(beta_end))**2; 'cosine' = 'squaredcos_cap_v2' (Nichol &
    Dhariwal, 2021): beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta) with
    f(s) = cos((s + 0.008) / 1.008 * pi/2)**2 (beta_start/end unused); 'sigmoid' (GeoDiff):
    sigmoid(linspace(-6, 6)) * (beta_end - beta_start) + beta_start.
    """
    _check("schedule", schedule, SCHEDULES)
    n = int(num_timesteps)
    if schedule == "linear":
        return _linspace32(beta_start, beta_end, n)
    if schedule == "scaled_linear":
        return _linspace32(beta_start ** 0.5, beta_end ** 0.5, n) ** 2
    if schedule == "sigmoid":
        s = _linspace32(-6, 6, n)
        return (1 / (1 + np.exp(-s)) * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    alpha_bar = [math.cos((s / n + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(n + 1)]
    return np.array([min(1 - alpha_bar[i + 1] / alpha_bar[i], max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Alg. 1: shift/scale sqrt(alpha-bar) so that SNR(T-1) = 0 exactly."""
    betas = np.asarray(betas, np.float32)
    sqrt_ab = np.sqrt(_cumprod32(1.0 - betas))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).astype(np.float32)


class HostTables:
    """float64 NumPy ``betas`` and ``alphas_cumprod`` [T], read-only, kept on the host as static
    (hashable) metadata of a ``Schedule``, so the sampler can build its coefficients in float64
    (``posterior_coefficients``) while jax runs in float32. Hashed and compared by value."""
    __slots__ = ("betas", "alphas_cumprod", "_hash")

    def __init__(self, betas, alphas_cumprod):
        self.betas = np.array(betas, np.float64)
        self.alphas_cumprod = np.array(alphas_cumprod, np.float64)
        for a in (self.betas, self.alphas_cumprod):
            a.setflags(write=False)
        self._hash = hash((self.betas.tobytes(), self.alphas_cumprod.tobytes()))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (isinstance(other, HostTables) and np.array_equal(self.betas, other.betas)
                and np.array_equal(self.alphas_cumprod, other.alphas_cumprod))

    def __repr__(self):
        return f"HostTables(T={len(self.betas)})"


@flax.struct.dataclass
class Schedule:
    """Per-timestep float32 tables, each [T]. A pytree, so it can be a jit argument or a constant.

    ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod``: optional tables of sqrt(a_t)
    and sqrt(1 - a_t) used by the forward process (``add_noise``, ``velocity``) instead of
    ``a_t ** 0.5`` in float32; ``make_schedule(precision='float64')`` sets them, and ``host64``
    (static, not a leaf): the float64 betas and alpha-bar from which the DDPM sampler's posterior
    coefficients are computed (``posterior_coefficients``).
    """
    betas: jax.Array
    alphas: jax.Array            # 1 - betas
    alphas_cumprod: jax.Array    # a_t = prod_{s<=t} alphas[s]
    sqrt_alphas_cumprod: jax.Array | None = None
    sqrt_one_minus_alphas_cumprod: jax.Array | None = None
    host64: HostTables | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


PRECISIONS = ("float32", "float64")


def _betas64(schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """float64 betas as facebookresearch/DiT's (OpenAI's) ``get_beta_schedule`` computes them."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if schedule == "sigmoid":
        s = np.linspace(-6, 6, n, dtype=np.float64)
        return 1 / (1 + np.exp(-s)) * (beta_end - beta_start) + beta_start
    alpha_bar = [math.cos((s / n + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(n + 1)]
    return np.array([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(n)], np.float64)


def make_schedule(schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, *, rescale_zero_snr: bool = False,
                  betas=None, precision: str = "float32") -> Schedule:
    """``Schedule`` from a named beta schedule (see ``make_betas``) or explicit ``betas``.

    ``rescale_zero_snr``: zero terminal SNR (pair it with v-prediction and 'trailing' spacing;
    the epsilon -> x0 conversion divides by sqrt(a_t) = 0 at t = T-1).
    ``precision``: 'float32' (default; diffusers: float32 betas and cumprod, ``a_t ** 0.5`` in
    float32, the DDPM step's coefficients computed from those in float32) or 'float64'
    (facebookresearch/DiT's / OpenAI guided-diffusion's ``GaussianDiffusion``: betas, alpha-bar,
    sqrt(a_t) and sqrt(1 - a_t) computed in float64 with NumPy, then cast to float32, the
    forward process using those sqrt tables; the DDPM step's posterior coefficients are built in
    float64 on the host by ``posterior_coefficients`` and cast at use, see ``ddpm_step``). DDIM
    uses the float32 ``alphas_cumprod`` (for 'float64' the cast float64 values) either way.
    """
    _check("precision", precision, PRECISIONS)
    if precision == "float64":
        _check("schedule", schedule, SCHEDULES)
        b64 = (np.asarray(betas, np.float64) if betas is not None
               else _betas64(schedule, int(num_timesteps), beta_start, beta_end))
        if rescale_zero_snr:
            raise ValueError("precision='float64' does not support rescale_zero_snr.")
        ac64 = np.cumprod(1.0 - b64)
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(np.float32))
        return Schedule(f32(b64), f32(1.0 - b64), f32(ac64), f32(np.sqrt(ac64)),
                        f32(np.sqrt(1.0 - ac64)), HostTables(b64, ac64))
    if betas is None:
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
    betas = np.asarray(betas, np.float32)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = (1.0 - betas).astype(np.float32)
    alphas_cumprod = _cumprod32(alphas)
    return Schedule(jnp.asarray(betas), jnp.asarray(alphas), jnp.asarray(alphas_cumprod))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """[B] (or scalar) per-example values -> broadcastable against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (jnp.ndim(x) - v.ndim))


def _alpha_cumprod(schedule: Schedule, t, x, final=1.0) -> jax.Array:
    """a_t broadcast against x; ``final`` for t < 0 (one step past the end of the chain)."""
    t = jnp.asarray(t, jnp.int32)
    a = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], final)
    return _bcast(a.astype(jnp.float32), x)


def _sqrt_coefs(schedule: Schedule, t, x) -> tuple[jax.Array, jax.Array]:
    """(sqrt(a_t), sqrt(1 - a_t)) broadcast against x: from the schedule's sqrt tables when it
    has them (``precision='float64'``), else ``a_t ** 0.5`` in float32 (diffusers)."""
    if schedule.sqrt_alphas_cumprod is None:
        a = _alpha_cumprod(schedule, t, x)
        return a ** 0.5, (1 - a) ** 0.5
    t = jnp.asarray(t, jnp.int32)
    return (_bcast(schedule.sqrt_alphas_cumprod[t].astype(jnp.float32), x),
            _bcast(schedule.sqrt_one_minus_alphas_cumprod[t].astype(jnp.float32), x))


def snr(schedule: Schedule, t) -> jax.Array:
    """SNR(t) = a_t / (1 - a_t), float32 with the shape of ``t``."""
    a = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return a / (1.0 - a)


# --------------------------------------------------------------------------- forward process, targets

def add_noise(schedule: Schedule, x0, noise, t) -> jax.Array:
    """q_sample: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers ``add_noise``)."""
    sa, sb = _sqrt_coefs(schedule, t, x0)
    out = sa * x0 + sb * noise
    return out.astype(jnp.result_type(x0, noise))


def velocity(schedule: Schedule, x0, noise, t) -> jax.Array:
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers ``get_velocity``)."""
    sa, sb = _sqrt_coefs(schedule, t, x0)
    out = sa * noise - sb * x0
    return out.astype(jnp.result_type(x0, noise))


def training_target(schedule: Schedule, x0, noise, t, prediction_type: str = "epsilon") -> jax.Array:
    """What the network regresses: ``noise`` ('epsilon'), ``velocity`` ('v_prediction') or ``x0`` ('sample')."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def pred_to_x0_eps(schedule: Schedule, x_t, t, model_output, prediction_type: str = "epsilon",
                   final_alpha_cumprod=1.0) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a model output of ``prediction_type`` at x_t (DDIM's formulas).

    ``final_alpha_cumprod`` is a_t used for t < 0 (only the DDIM sampler passes such t).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    a = _alpha_cumprod(schedule, t, x_t, final_alpha_cumprod)
    b = 1 - a
    if prediction_type == "epsilon":
        return (x_t - b ** 0.5 * model_output) / a ** 0.5, model_output
    if prediction_type == "sample":
        return model_output, (x_t - a ** 0.5 * model_output) / b ** 0.5
    return a ** 0.5 * x_t - b ** 0.5 * model_output, a ** 0.5 * model_output + b ** 0.5 * x_t


def convert_prediction(schedule: Schedule, x_t, t, model_output, from_type: str, to_type: str):
    """Re-express a model output as another prediction type (e.g. v -> epsilon for a guidance rule)."""
    x0, eps = pred_to_x0_eps(schedule, x_t, t, model_output, from_type)
    _check("to_type", to_type, PREDICTION_TYPES)
    if to_type == "epsilon":
        return eps
    if to_type == "sample":
        return x0
    a = _alpha_cumprod(schedule, t, x_t)
    return a ** 0.5 * eps - (1 - a) ** 0.5 * x0


def loss_weight(schedule: Schedule, t, prediction_type: str = "epsilon", weighting: str = "none",
                gamma: float = 5.0) -> jax.Array:
    """Per-example multiplier for the MSE between the model output and ``training_target``.

    Each weighting names w(t), the weight of ||x0_hat - x0||^2 (Hang et al., 2023); since
    ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2,
    the returned multiplier is w / SNR ('epsilon'), w / (SNR + 1) ('v_prediction'), w ('sample'):

      'none'           multiplier 1: the plain MSE on the target (for 'epsilon', L_simple, w = SNR)
      'snr'            w = SNR                 (= L_simple in any parameterisation)
      'min_snr_gamma'  w = min(SNR, gamma)     (Min-SNR-gamma, gamma = 5 in the paper)
      'truncated_snr'  w = max(SNR, 1)         (Salimans & Ho, 2022)
      'snr_plus_one'   w = SNR + 1             (= the plain v-prediction loss)

    At SNR = 0 (zero terminal SNR) 'epsilon' with 'min_snr_gamma' gives its limit 1; the other
    weightings divide by SNR = 0 there (epsilon-prediction is ill-posed at SNR 0 anyway).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    _check("weighting", weighting, LOSS_WEIGHTINGS)
    s = snr(schedule, t)
    if weighting == "none":
        return jnp.ones_like(s)
    w = {"snr": s, "min_snr_gamma": jnp.minimum(s, gamma), "truncated_snr": jnp.maximum(s, 1.0),
         "snr_plus_one": s + 1.0}[weighting]
    if prediction_type == "epsilon":
        if weighting == "min_snr_gamma":
            return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 1.0)
        return w / s
    if prediction_type == "v_prediction":
        return w / (s + 1.0)
    return w


def cfg_combine(cond_out, uncond_out, scale) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + scale * (cond - uncond).

    The combination is affine with weights summing to 1, so guiding eps, v or x0 outputs
    gives the same step.
    """
    return uncond_out + scale * (cond_out - uncond_out)


# --------------------------------------------------------------------------- reverse steps

def _process_x0(x0, clip_sample: bool, clip_sample_range: float):
    return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


@flax.struct.dataclass
class Posterior:
    """float32 coefficients of one DDPM step t -> prev_t per entry (shaped like t), built in
    float64 by ``posterior_coefficients``. Names as guided-diffusion's ``GaussianDiffusion``."""
    mean_coef1: jax.Array            # x0's coefficient in the posterior mean
    mean_coef2: jax.Array            # x_t's coefficient
    variance: jax.Array              # posterior variance (0 where prev_t < 0)
    log_variance_clipped: jax.Array  # log variance, the chain's next variance where it is 0
    beta: jax.Array                  # the step's beta 1 - a_t / a_prev ('fixed_large' variance)
    log_beta: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array    # sqrt(1 / a_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / a_t - 1)


def _host_ints(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x).astype(np.int64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            f"{name} is traced: a float64 schedule's DDPM coefficients are built on the host. Pass "
            "ddpm_step(..., posterior=posterior_coefficients(schedule, t, prev_t)) computed outside "
            "jit (sample() does), or leave prev_t=None with a concrete t.") from e


def posterior_coefficients(schedule: Schedule, t, prev_t=None) -> Posterior:
    """The DDPM step's coefficients for host (concrete) timesteps ``t`` -> ``prev_t``, computed in
    float64 and cast to float32, for a ``make_schedule(precision='float64')`` schedule.

    guided-diffusion's / facebookresearch/DiT's ``GaussianDiffusion.__init__`` (float64 NumPy):
      posterior_variance = betas (1 - a_prev) / (1 - a_t),
      posterior_log_variance_clipped = log(posterior_variance), with index 0 (variance 0) taking
        index 1's value,
      posterior_mean_coef1 = betas sqrt(a_prev) / (1 - a_t),
      posterior_mean_coef2 = (1 - a_prev) sqrt(alphas) / (1 - a_t),
      sqrt_recip_alphas_cumprod = sqrt(1 / a_t), sqrt_recipm1_alphas_cumprod = sqrt(1 / a_t - 1).
    ``prev_t=None``: the full chain t -> t - 1 (betas and alphas the schedule's own float64 ones,
    a_prev = 1 at t = 0). Explicit ``prev_t`` (a respaced chain, as ``SpacedDiffusion`` builds it):
    beta = 1 - a_t / a_prev (a_prev = 1 for prev_t < 0), alphas = a_t / a_prev. Where prev_t < 0
    the clipped log variance is that of the entry stepping into t (its prev_t == t) if ``t``
    holds one, else that of the step t + 1 -> t (guided-diffusion's index-1 rule; 1e-20 for
    t = T - 1). ``sample`` and ``ddpm_step`` add no noise at such steps.
    """
    if schedule.host64 is None:
        raise ValueError("posterior_coefficients needs a float64 schedule "
                         "(make_schedule(..., precision='float64')); float32 schedules compute the "
                         "coefficients in ddpm_step as diffusers does.")
    b64, ac = schedule.host64.betas, schedule.host64.alphas_cumprod
    n = len(ac)
    t = _host_ints(t, "t")
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"t must lie in [0, {n}), got {t.min()}..{t.max()}.")
    full_chain = prev_t is None
    prev = t - 1 if full_chain else np.broadcast_to(_host_ints(prev_t, "prev_t"), t.shape)
    if not full_chain and np.any(prev >= t):
        raise ValueError("prev_t must be below t.")

    def step(tt, pp, chain):
        a_t = ac[tt]
        a_p = np.where(pp >= 0, ac[np.maximum(pp, 0)], 1.0)
        if chain:
            beta = b64[tt]
            alpha = 1.0 - beta
        else:
            alpha = a_t / a_p
            beta = 1.0 - alpha
        return a_t, a_p, alpha, beta

    a_t, a_p, alpha, beta = step(t, prev, full_chain)
    variance = beta * (1.0 - a_p) / (1.0 - a_t)
    # Where the variance is 0 (prev_t < 0): the variance of the step into t, from the entry whose
    # prev_t is t if there is one, else from t + 1 (1e-20, diffusers' clamp, if t = T - 1).
    t_next = t + 1
    if not full_chain:
        into = {int(pp): int(tt) for tt, pp in zip(t.ravel(), prev.ravel()) if pp >= 0}
        t_next = np.array([into.get(int(tt), int(tt) + 1) for tt in t.ravel()],
                          np.int64).reshape(t.shape)
    last = prev < 0
    has_next = t_next < n
    tn = np.where(last & has_next, t_next, t)
    pn = np.where(last & has_next, t, prev)
    a_n, a_pn, _, beta_n = step(tn, pn, full_chain)
    next_variance = np.where(has_next, beta_n * (1.0 - a_pn) / (1.0 - a_n), 1e-20)
    log_variance_clipped = np.log(np.where(last, next_variance, np.maximum(variance, 1e-300)))
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(np.float32))
    return Posterior(
        mean_coef1=f32(beta * np.sqrt(a_p) / (1.0 - a_t)),
        mean_coef2=f32((1.0 - a_p) * np.sqrt(alpha) / (1.0 - a_t)),
        variance=f32(variance), log_variance_clipped=f32(log_variance_clipped),
        beta=f32(beta), log_beta=f32(np.log(beta)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / a_t)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / a_t - 1.0)))


def _ddpm_step_posterior(schedule, post: Posterior, model_output, t, prev_t, x_t, noise,
                         prediction_type, variance_type, clip_sample, clip_sample_range,
                         predicted_variance):
    """``ddpm_step`` from precomputed coefficients: guided-diffusion's ``p_sample``."""
    c = lambda v: _bcast(jnp.asarray(v, jnp.float32), x_t)
    if prediction_type == "epsilon":  # _predict_xstart_from_eps
        x0 = c(post.sqrt_recip_alphas_cumprod) * x_t - c(post.sqrt_recipm1_alphas_cumprod) * model_output
    elif prediction_type == "sample":
        x0 = model_output
    else:
        x0, _ = pred_to_x0_eps(schedule, x_t, t, model_output, prediction_type)
    x0 = _process_x0(x0, clip_sample, clip_sample_range)
    mean = c(post.mean_coef1) * x0 + c(post.mean_coef2) * x_t  # q_posterior_mean_variance
    if noise is None:
        return mean, x0
    if variance_type == "fixed_small":
        std = c(post.variance) ** 0.5
    elif variance_type == "fixed_small_log":  # guided-diffusion's FIXED_SMALL
        std = jnp.exp(0.5 * c(post.log_variance_clipped))
    elif variance_type == "fixed_large":
        std = c(post.beta) ** 0.5
    else:
        if predicted_variance is None:
            raise ValueError(f"variance_type={variance_type!r} needs predicted_variance.")
        if variance_type == "learned":
            std = predicted_variance ** 0.5
        else:  # LEARNED_RANGE: frac * log(beta) + (1 - frac) * log_variance_clipped
            frac = (predicted_variance + 1) / 2
            std = jnp.exp(0.5 * (frac * c(post.log_beta) + (1 - frac) * c(post.log_variance_clipped)))
    # guided-diffusion: no noise at the chain's last step (prev_t < 0)
    x_prev = jnp.where(_bcast(prev_t >= 0, x_t), mean + std * noise, mean)
    return x_prev, x0


def ddpm_step(schedule: Schedule, model_output, t, x_t, noise=None, *, prev_t=None,
              prediction_type: str = "epsilon", variance_type: str = "fixed_small",
              clip_sample: bool = True, clip_sample_range: float = 1.0,
              predicted_variance=None, posterior: Posterior | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{prev_t}; returns (x_prev, x0_pred). = ``DDPMScheduler.step``.

    ``prev_t`` defaults to t - 1; with fewer inference steps pass ``previous_timesteps(...,
    'ddpm')`` (-1 after the last). With a_p = a_{prev_t} (1 for prev_t < 0), beta = 1 - a_t/a_p:
      mean = sqrt(a_p) beta / (1 - a_t) * x0 + sqrt(a_t/a_p) (1 - a_p) / (1 - a_t) * x_t,
      x_prev = mean + sigma * noise for t > 0, x_prev = mean at t = 0, with sigma^2
      'fixed_small' = posterior variance (1 - a_p) / (1 - a_t) beta (clamped to 1e-20),
      'fixed_small_log' = the same via exp(0.5 log), 'fixed_large' = beta,
      'learned' = ``predicted_variance``, 'learned_range' (Nichol & Dhariwal) =
      exp(f log beta + (1 - f) log posterior variance), f = (predicted_variance + 1) / 2.
    ``clip_sample`` clips x0_pred to +-clip_sample_range (diffusers' default: on).
    ``noise=None`` returns the mean (no sampling noise at any t).

    A float64 schedule (``make_schedule(precision='float64')``) or an explicit ``posterior``
    takes guided-diffusion's ``p_sample`` instead, with the coefficients of
    ``posterior_coefficients(schedule, t, prev_t)`` (float64, cast; built here when t and prev_t
    are concrete, else pass ``posterior``): x0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps (for
    'epsilon'), mean = coef1 x0 + coef2 x_t, std sqrt(variance) ('fixed_small'),
    exp(0.5 log_variance_clipped) ('fixed_small_log' = guided-diffusion's FIXED_SMALL),
    sqrt(beta) ('fixed_large'), exp(0.5 (f log beta + (1 - f) log_variance_clipped))
    ('learned_range'); no noise where prev_t < 0 (the chain's last step) rather than at t = 0.
    """
    _check("variance_type", variance_type, VARIANCE_TYPES)
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    if posterior is None and schedule.host64 is not None:
        posterior = posterior_coefficients(schedule, t, prev_t)
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - 1 if prev_t is None else jnp.asarray(prev_t, jnp.int32)
    if posterior is not None:
        return _ddpm_step_posterior(schedule, posterior, model_output, t, prev_t, x_t, noise,
                                    prediction_type, variance_type, clip_sample,
                                    clip_sample_range, predicted_variance)
    a_t = _alpha_cumprod(schedule, t, x_t)
    a_prev = _alpha_cumprod(schedule, prev_t, x_t)
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha

    x0, _ = pred_to_x0_eps(schedule, x_t, t, model_output, prediction_type)
    x0 = _process_x0(x0, clip_sample, clip_sample_range)
    x0_coeff = (a_prev ** 0.5 * cur_beta) / beta_prod_t
    xt_coeff = cur_alpha ** 0.5 * beta_prod_prev / beta_prod_t
    mean = x0_coeff * x0 + xt_coeff * x_t
    if noise is None:
        return mean, x0

    variance = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
    if variance_type == "fixed_small":
        std = variance ** 0.5
    elif variance_type == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(variance))
    elif variance_type == "fixed_large":
        std = cur_beta ** 0.5
    else:
        if predicted_variance is None:
            raise ValueError(f"variance_type={variance_type!r} needs predicted_variance.")
        if variance_type == "learned":
            std = predicted_variance ** 0.5
        else:
            frac = (predicted_variance + 1) / 2
            std = jnp.exp(0.5 * (frac * jnp.log(cur_beta) + (1 - frac) * jnp.log(variance)))
    x_prev = jnp.where(_bcast(t > 0, x_t), mean + std * noise, mean)
    return x_prev, x0


def ddim_step(schedule: Schedule, model_output, t, x_t, noise=None, *, prev_t=None, eta=0.0,
              prediction_type: str = "epsilon", clip_sample: bool = True,
              clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
              use_clipped_model_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{prev_t}; returns (x_prev, x0_pred). = ``DDIMScheduler.step``.

    ``prev_t`` defaults to t - 1; diffusers uses t - T // num_inference_steps for every spacing
    (``previous_timesteps(..., 'ddim')``). For prev_t < 0, a_p = 1 (``set_alpha_to_one``) or a_0.
      sigma = eta sqrt((1 - a_p) / (1 - a_t) (1 - a_t / a_p)),
      x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma noise
    (eq. 12 of Song et al.). ``noise`` may be None when eta == 0. With
    ``use_clipped_model_output``, eps is re-derived from the clipped x0.
    """
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - 1 if prev_t is None else jnp.asarray(prev_t, jnp.int32)
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_t = _alpha_cumprod(schedule, t, x_t)
    a_prev = _alpha_cumprod(schedule, prev_t, x_t, final)
    beta_prod_t = 1 - a_t

    x0, eps = pred_to_x0_eps(schedule, x_t, t, model_output, prediction_type)
    x0 = _process_x0(x0, clip_sample, clip_sample_range)
    variance = (1 - a_prev) / beta_prod_t * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    if use_clipped_model_output:
        eps = (x_t - a_t ** 0.5 * x0) / beta_prod_t ** 0.5
    direction = jnp.maximum(1 - a_prev - std ** 2, 0.0) ** 0.5 * eps
    x_prev = a_prev ** 0.5 * x0 + direction
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0


# --------------------------------------------------------------------------- timesteps

def timesteps(schedule_or_T: Schedule | int, num_inference_steps: int, spacing: str = "leading",
              steps_offset: int = 0) -> np.ndarray:
    """Descending int32 timesteps, equal to diffusers' DDPM/DDIM ``set_timesteps`` (Lin et al., Tab. 2).

    'leading': arange(N) * (T // N) + steps_offset; 'trailing': round(arange(T, 0, -T/N)) - 1
    (always starts at T-1); 'linspace': round(linspace(0, T-1, N)). Static host values.
    """
    T = schedule_or_T.num_timesteps if isinstance(schedule_or_T, Schedule) else int(schedule_or_T)
    n = int(num_inference_steps)
    _check("spacing", spacing, SPACINGS)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n}; valid: 1 .. num_timesteps={T}.")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return ts.astype(np.int32)


def previous_timesteps(ts, sampler: str, num_train_timesteps: int,
                       num_inference_steps: int | None = None) -> np.ndarray:
    """The prev_t diffusers steps each of ``ts`` to (negative = past the end of the chain).

    'ddpm': the next entry of ``ts`` and -1 after the last; 'ddim': t - T // num_inference_steps
    (default len(ts)), which for 'trailing' / 'linspace' need not be the next entry.
    """
    _check("sampler", sampler, SAMPLERS)
    ts = np.asarray(ts, np.int32)
    if sampler == "ddpm":
        return np.concatenate([ts[1:], [-1]]).astype(np.int32)
    n = len(ts) if num_inference_steps is None else int(num_inference_steps)
    return (ts - int(num_train_timesteps) // n).astype(np.int32)


# --------------------------------------------------------------------------- sampling loop

def sample(model_fn: Callable, schedule: Schedule, shape, rng, *, sampler: str = "ddim",
           num_steps: int = 50, spacing: str = "leading", steps_offset: int = 0, eta: float = 0.0,
           guidance_scale: float = 1.0, uncond_fn: Callable | None = None,
           prediction_type: str = "epsilon", variance_type: str = "fixed_small",
           clip_sample: bool = True, clip_sample_range: float = 1.0,
           set_alpha_to_one: bool = True, x_T=None, sharding=None) -> jax.Array:
    """Draw samples: x_T ~ N(0, I), then ``num_steps`` DDPM or DDIM steps in one ``lax.scan``.

    ``model_fn(x_t, t) -> model_output`` with ``t`` int32 [B]; close over params and the
    conditioning. Classifier-free guidance: pass ``uncond_fn(x_t, t)`` (the same network with
    the null condition); each step then combines
    ``cfg_combine(model_fn(..), uncond_fn(..), guidance_scale)`` (``guidance_scale`` may be
    traced). For variance_type 'learned' / 'learned_range' the output carries 2C channels on
    the LAST axis (channels-last); guidance applies to the first C, the variance half comes
    from the conditional call. DDIM ignores the variance half.

    Randomness: ``x_T`` from split(rng)[0] unless given; step i draws noise from
    ``fold_in(split(rng)[1], i)`` - deterministic and (partitionable threefry) independent of
    the device count. ``sharding``: optional ``jax.sharding.Sharding`` kept on x every step.
    The remaining arguments are those of ``ddpm_step`` / ``ddim_step`` / ``timesteps``. With a
    float64 schedule the DDPM steps use ``posterior_coefficients(schedule, ts, prev_ts)``.
    Returns x_0 (same dtype as x_T; float32 by default).
    """
    _check("sampler", sampler, SAMPLERS)
    _check("variance_type", variance_type, VARIANCE_TYPES)
    if uncond_fn is None and not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1):
        raise ValueError(f"guidance_scale={guidance_scale!r} needs uncond_fn (classifier-free guidance).")
    T = schedule.num_timesteps
    ts = timesteps(T, num_steps, spacing, steps_offset)
    prev = previous_timesteps(ts, sampler, T, num_steps)
    learned = variance_type in ("learned", "learned_range")
    needs_noise = sampler == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)

    rng_init, rng_steps = jax.random.split(rng)
    x = jax.random.normal(rng_init, shape, jnp.float32) if x_T is None else jnp.asarray(x_T)
    constrain = (lambda y: jax.lax.with_sharding_constraint(y, sharding)) if sharding else (lambda y: y)
    x = constrain(x)
    batch = x.shape[0]

    def split(out):
        return jnp.split(out, 2, axis=-1) if learned else (out, None)

    # A float64 schedule: the DDPM coefficients of the whole chain, built once on the host.
    post = None
    if sampler == "ddpm" and schedule.host64 is not None:
        post = posterior_coefficients(schedule, ts, prev)

    def body(x, inputs):
        i, t, prev_t, post_i = inputs
        tb = jnp.full((batch,), t, jnp.int32)
        out, var = split(model_fn(x, tb))
        if uncond_fn is not None:
            out = cfg_combine(out, split(uncond_fn(x, tb))[0], guidance_scale)
        noise = None
        if needs_noise:
            noise = jax.random.normal(jax.random.fold_in(rng_steps, i), x.shape, x.dtype)
        if sampler == "ddpm":
            x_new, _ = ddpm_step(schedule, out, t, x, noise, prev_t=prev_t,
                                 prediction_type=prediction_type, variance_type=variance_type,
                                 clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                                 predicted_variance=var, posterior=post_i)
        else:
            x_new, _ = ddim_step(schedule, out, t, x, noise, prev_t=prev_t, eta=eta,
                                 prediction_type=prediction_type, clip_sample=clip_sample,
                                 clip_sample_range=clip_sample_range,
                                 set_alpha_to_one=set_alpha_to_one)
        return constrain(x_new.astype(x.dtype)), None

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(prev), post)
    x, _ = jax.lax.scan(body, x, xs)
    return x
