"""The reverse process of DDPM (Ho et al., 2020) and DDIM (Song et al., 2021): the float64
posterior coefficients, one DDPM / DDIM step, inference timesteps and the ``lax.scan``
sampling loop. Schedules, the forward process and training targets are in
``fmjax.diffusion.process`` (notation there); its names used here are imported from it.
"""
from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.diffusion.process import (PREDICTION_TYPES, SAMPLERS, SPACINGS, VARIANCE_TYPES, Schedule,
                                     _alpha_cumprod, _bcast, _check, cfg_combine, pred_to_x0_eps)


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
