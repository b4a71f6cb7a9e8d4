"""The Gaussian diffusion process of DDPM (Ho et al., 2020) and DDIM (Song et al., 2021).

No networks here: schedules, the forward process, training targets / loss weights and
classifier-free guidance; the DDPM and DDIM reverse steps and the ``lax.scan`` sampling loop
are in ``fmjax.diffusion.sampling``. Everything after
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

