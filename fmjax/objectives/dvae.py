"""DALL-E's discrete VAE (Ramesh et al. 2021, appendix A): the visual tokenizer of BEiT.

The model is ``fmjax.models.dvae.DVAE`` (openai/DALL-E's Encoder / Decoder). Training
maximises the evidence lower bound with the gumbel-softmax relaxation, as the paper's A.2:

- the encoder's logits over ``vocab_size`` codes at each position of the h x w grid give
  q(z | x) = softmax(logits); the decoder reads a relaxed sample
  ``softmax((logits + g) / tau)``, g ~ Gumbel(0, 1) i.i.d. (Jang et al. 2016; Maddison et al. 2016);
- the reconstruction term is the logit-Laplace negative log-likelihood of the mapped pixels
  ``y = map_pixels(x)`` (eps 0.1) under the decoder's ``mu`` and ``ln b`` (``model.output=
  'logit_laplace'``): ``-ln f(y | mu, b) = ln(2 b) + ln(y (1 - y)) + |logit(y) - mu| / b``,
  or the squared error of the decoded image (``model.output='mse'``);
- the KL term is KL(q(z | x) || uniform) = ``sum_k q_k ln q_k + ln K``, summed over the grid
  positions (the prior is uniform over the codes, as the paper's dVAE stage);
- both are divided by the number of pixel values H W C (the paper: "we divide the overall loss
  by 256 x 256 x 3, so that the weight of the KL term becomes beta / 192"):
  ``loss = mean_x[ mean_values(NLL) + beta(t) * sum_positions(KL) / (H W C) ]``.

Two options beyond the paper (off by default; ``configs/dvae.py:cpu`` uses both):
``straight_through='argmax'`` makes the decoder read the encoder's argmax code, one-hot, with
the relaxed sample's gradients (``hard + z - stop_gradient(z)``; ``'sample'``: the Gumbel-max
draw ``argmax(logits + g)`` instead). Without it the relaxed sample leaks information through
its non-argmax tail: at a low KL weight the argmax codes collapse onto one code while the
relaxed reconstructions still improve. ``diversity_weight`` w adds ``w * KL(mean q || uniform)``
with q averaged over the batch and the grid (wav2vec 2.0's codebook-diversity term), which
keeps the argmax codes spread over the vocabulary; ``diversity_of='sharp'`` averages
``softmax(logits / tau)`` instead, at the relaxation's temperature, which nears the histogram
of the argmax codes as tau anneals.

Schedules (A.2 says all of them are cosine): the temperature ``tau`` goes from ``temp_start``
(1) to ``temp_end`` (1/16) over ``temp_steps`` updates (paper: 150,000; 0: the whole run)
``tau(t) = end + (start - end) (1 + cos(pi min(t / T, 1))) / 2`` (``temp_schedule='cosine'``;
``'exponential'``: ``start (end / start)^min(t / T, 1)``, the geometric interpolation); the KL
weight rises from 0 to ``kl_weight`` (6.6) over ``kl_warmup_steps`` (5000):
``beta(t) = kl_weight (1 - cos(pi min(t / W, 1))) / 2`` (W = 0: constant). ``ema_decay`` > 0
keeps the paper's iterate average (0.999) in ``extra['ema']``; evaluations, pictures,
features and ``load_tokenizer`` then use it.

Evaluation (``eval_metrics``, the ``metrics`` eval type): ``recon_mse`` is the per-pixel
squared error, in [0, 1] pixel units, of the reconstruction decoded from the HARD tokens
(one-hot argmax codes: what a tokenizer hands on, no relaxation); ``baseline_mse`` is the
1-token-per-patch mean baseline: every ``d x d`` patch (the pixels one token stands for,
``d = model.downsample``) replaced by its own mean colour - the best any code could do that
only says "this patch's average colour", with the colour not even quantised; and
``recon_ratio = recon_mse / baseline_mse`` (ratio of the split means). The issue's gate is
``recon_ratio <= 0.5``: the tokens must carry the patch's structure (edges, shape), not just its
colour. ``codes_used`` (fraction of the vocabulary among the hard tokens of a batch) shows
codebook usage.

``features`` (kNN / linear probe): the mean over the grid of the code distribution q(z | x),
[B, vocab_size] - a soft bag of visual words.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import transforms as transforms_lib
from fmjax.errors import ConfigError
from fmjax.evals import images as image_lib
from fmjax.models import dvae as dvae_lib
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective

TEMP_SCHEDULES = ("cosine", "exponential")
STRAIGHT_THROUGH = ("", "argmax", "sample")
DIVERSITY_OF = ("q", "sharp")
OPTIONS = ("name", "kl_weight", "kl_warmup_steps", "temp_start", "temp_end", "temp_steps",
           "temp_schedule", "ema_decay", "straight_through", "diversity_weight", "diversity_of")


# -- The paper's formulas. ------------------------------------------------------------------------
def temperature(step, start: float, end: float, steps: int, schedule: str = "cosine"):
    """The relaxation temperature at ``step``: ``start`` -> ``end`` over ``steps``, then ``end``."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(int(steps), 1), 1.0)
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if schedule == "exponential":
        return start * (end / start) ** frac
    raise ValueError(f"temp_schedule={schedule!r}; valid: {list(TEMP_SCHEDULES)}.")


def kl_weight(step, beta: float, warmup_steps: int):
    """The KL weight at ``step``: a cosine from 0 to ``beta`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return beta * 0.5 * (1.0 - jnp.cos(jnp.pi * frac))


def gumbel_softmax(rng, logits, tau):
    """A relaxed sample ``softmax((logits + g) / tau)`` over the last axis, g ~ Gumbel(0, 1)."""
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax((logits.astype(jnp.float32) + g) / tau, axis=-1)


def kl_to_uniform(logits):
    """KL(softmax(logits) || uniform) per position, [..., K] -> [...] (nats)."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logq) * logq, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(x01, stats, eps: float = dvae_lib.LOGIT_LAPLACE_EPS):
    """-ln f(map_pixels(x) | mu, b) per pixel value: [B, H, W, C] images in [0, 1] and the
    decoder's [B, H, W, 2C] (``mu``, ``ln b``) -> [B, H, W, C]."""
    y = dvae_lib.map_pixels(x01.astype(jnp.float32), eps)
    stats = stats.astype(jnp.float32)
    c = y.shape[-1]
    mu, ln_b = stats[..., :c], stats[..., c:]
    logit_y = jnp.log(y) - jnp.log1p(-y)
    return math.log(2.0) + ln_b + jnp.log(y) + jnp.log1p(-y) + jnp.abs(logit_y - mu) * jnp.exp(-ln_b)


def patch_mean_baseline(x01, patch: int):
    """Every ``patch x patch`` block of [B, H, W, C] images replaced by its mean colour."""
    b, h, w, c = x01.shape
    blocks = x01.reshape(b, h // patch, patch, w // patch, patch, c)
    mean = jnp.broadcast_to(blocks.mean(axis=(2, 4), keepdims=True), blocks.shape)
    return mean.reshape(b, h, w, c)


def per_example_mse(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))


def _code_colours(vocab: int) -> np.ndarray:
    """A fixed random colour per code (for the token-map picture)."""
    return np.random.default_rng(0).uniform(0.1, 0.9, (vocab, 3)).astype(np.float32)


class DVAEObjective(Objective):
    batch_keys = ("image",)

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("tokenizer",), "objective 'dvae'", config.model.name)
        self.output = getattr(self.model, "output", "logit_laplace")
        self.beta = float(o.get("kl_weight", 6.6))
        self.kl_warmup_steps = int(o.get("kl_warmup_steps", 5000))
        self.temp_start = float(o.get("temp_start", 1.0))
        self.temp_end = float(o.get("temp_end", 1.0 / 16))
        self.temp_steps = int(o.get("temp_steps", 0) or 0) or int(config.total_steps)
        self.temp_schedule = o.get("temp_schedule", "cosine")
        self.ema_decay = float(o.get("ema_decay", 0.0))
        self.straight_through = o.get("straight_through", "") or ""
        self.diversity_weight = float(o.get("diversity_weight", 0.0))
        self.diversity_of = o.get("diversity_of", "q") or "q"

    # -- config ----------------------------------------------------------------------------------
    def check(self, config):
        o = config.objective
        unknown = sorted(set(o.keys()) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"config.objective has unknown keys {unknown} for objective 'dvae'; "
                              f"valid: {list(OPTIONS)}.")
        problem = dvae_lib.config_problem(self.model)
        if problem:
            raise ConfigError(problem)
        if self.beta < 0 or self.kl_warmup_steps < 0:
            raise ConfigError(f"config.objective.kl_weight={self.beta} and kl_warmup_steps="
                              f"{self.kl_warmup_steps} must be >= 0.")
        if not 0 < self.temp_end <= self.temp_start:
            raise ConfigError(f"config.objective.temp_start={self.temp_start}, temp_end={self.temp_end}: "
                              "need 0 < temp_end <= temp_start (the paper anneals 1 -> 1/16).")
        if int(o.get("temp_steps", 0) or 0) < 0:
            raise ConfigError(f"config.objective.temp_steps={o.get('temp_steps')} must be >= 0 "
                              "(0: anneal over the whole run).")
        if self.temp_schedule not in TEMP_SCHEDULES:
            raise ConfigError(f"config.objective.temp_schedule={self.temp_schedule!r}; "
                              f"valid: {list(TEMP_SCHEDULES)}.")
        if self.straight_through not in STRAIGHT_THROUGH:
            raise ConfigError(f"config.objective.straight_through={self.straight_through!r}; valid: "
                              f"{list(STRAIGHT_THROUGH)} ('': the paper's relaxed sample).")
        if self.diversity_weight < 0:
            raise ConfigError(f"config.objective.diversity_weight={self.diversity_weight} must be >= 0 "
                              "(0: no codebook-usage term).")
        if self.diversity_of not in DIVERSITY_OF:
            raise ConfigError(f"config.objective.diversity_of={self.diversity_of!r}; valid: {list(DIVERSITY_OF)} "
                              "('q': the encoder's softmax(logits), 'sharp': softmax(logits / temperature)).")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"config.objective.ema_decay={self.ema_decay} must be in [0, 1) (0: no EMA).")
        size = int(config.data.get("image_size", 0) or 0)
        d = self.model.downsample
        if size and size % d:
            raise ConfigError(f"config.data.image_size={size} must be a multiple of the dVAE's downsampling "
                              f"{d} (2^(group_count - 1), group_count={self.model.group_count}).")
        for key in ("pp_train", "pp_eval"):
            pp = config.data.get(key, "")
            for op in transforms_lib.parse_pp(pp, f"config.data.{key}").transforms if pp else ():
                if type(op).__name__ == "normalize" and (any(m != 0.0 for m in op.mean)
                                                         or any(s != 1.0 for s in op.std)):
                    raise ConfigError(
                        f"config.data.{key}: the dVAE reads images in [0, 1] (it applies DALL-E's "
                        f"map_pixels itself); use normalize((0, 0, 0), (1, 1, 1)), not mean {op.mean} "
                        f"std {op.std}.")

    def health(self, metrics):
        """A warning when a training batch's hard tokens use a single code (the encoder
        ignores its input: the decoder can only draw one average picture)."""
        used = metrics.get("train/codes_used")
        if used is not None and used * self.model.vocab_size < 1.5:
            return (f"dVAE codebook collapse: the batch's hard tokens use 1 of {self.model.vocab_size} codes; "
                    "lower objective.kl_weight or the learning rate.")
        return None

    # -- model -----------------------------------------------------------------------------------
    def _apply(self, params, x, method):
        return self.model.apply({"params": params}, x, method=method)

    def _eval_params(self, params, extra):
        return extra["ema"] if self.ema_decay > 0 else params

    def init(self, rng, batch):
        params = self.model.init({"params": rng}, batch["image"].astype(jnp.float32))["params"]
        return params, ({"ema": params} if self.ema_decay > 0 else {})

    def after_model_init(self, params, extra):
        return {**extra, "ema": params} if self.ema_decay > 0 else extra

    def after_update(self, params, extra, step):
        if self.ema_decay <= 0:
            return extra
        d = self.ema_decay
        return dict(extra, ema=jax.tree.map(lambda e, p: e * d + p * (1 - d), extra["ema"], params))

    def schedules(self, step):
        """(temperature, KL weight) at ``step``."""
        return (temperature(step, self.temp_start, self.temp_end, self.temp_steps, self.temp_schedule),
                kl_weight(step, self.beta, self.kl_warmup_steps))

    def recon_nll(self, x01, stats):
        """Per pixel value: the logit-Laplace NLL, or the squared error ('mse')."""
        if self.output == "logit_laplace":
            return logit_laplace_nll(x01, stats)
        return jnp.square(stats.astype(jnp.float32) - x01.astype(jnp.float32))

    def loss(self, params, extra, batch, rng, step):
        x = batch["image"].astype(jnp.float32)
        logits = self._apply(params, x, self.model.encode)
        tau, beta = self.schedules(step)
        z = gumbel_softmax(rng, logits, tau)
        if self.straight_through:  # the decoder reads a hard one-hot code; gradients of the soft sample
            pick = z if self.straight_through == "sample" else logits
            hard = jax.nn.one_hot(jnp.argmax(pick, axis=-1), z.shape[-1], dtype=z.dtype)
            z = hard + z - jax.lax.stop_gradient(z)
        stats = self._apply(params, z, self.model.decode)
        nll = jnp.mean(self.recon_nll(x, stats), axis=(1, 2, 3))
        kl = jnp.sum(kl_to_uniform(logits), axis=(1, 2))
        n_values = x.shape[1] * x.shape[2] * x.shape[3]
        loss = jnp.mean(nll + beta * kl / n_values)
        if self.diversity_weight:
            sharpen = tau if self.diversity_of == "sharp" else 1.0
            q = jax.nn.softmax(logits.astype(jnp.float32) / sharpen, axis=-1)
            mean_q = jnp.mean(q, axis=(0, 1, 2))
            # log(mean q) as its own logits; the floor keeps a code whose sharpened q underflows finite.
            loss = loss + self.diversity_weight * kl_to_uniform(jnp.log(jnp.maximum(mean_q, 1e-30)))
        recon = dvae_lib.reconstruction(stats, self.output)
        counts = jnp.zeros((logits.shape[-1],), jnp.int32).at[jnp.argmax(logits, -1).ravel()].add(1)
        metrics = {"nll": nll.mean(), "kl": kl.mean() / (logits.shape[1] * logits.shape[2]),
                   "temperature": tau, "kl_weight": beta, "soft_recon_mse": per_example_mse(recon, x).mean(),
                   "codes_used": jnp.mean(counts > 0)}
        return loss, (metrics, extra)

    def reconstruct_hard(self, params, x01):
        """(hard-token reconstruction in [0, 1], codes [B, h, w])."""
        codes = self._apply(params, x01, self.model.tokens)
        stats = self._apply(params, codes, self.model.decode_tokens)
        return dvae_lib.reconstruction(stats, self.output), codes

    def eval_metrics(self, params, extra, batch, rng):
        x = batch["image"].astype(jnp.float32)
        recon, codes = self.reconstruct_hard(self._eval_params(params, extra), x)
        base = patch_mean_baseline(x, self.model.downsample)
        return {"recon_mse": per_example_mse(recon, x), "baseline_mse": per_example_mse(base, x)}

    # The metrics evaluator's ratios of split means: eval/<name>_recon_ratio.
    eval_metric_ratios = {"recon_ratio": ("recon_mse", "baseline_mse")}

    def features(self, params, extra, images):
        logits = self._apply(self._eval_params(params, extra), images, self.model.encode)
        return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(1, 2))

    def visualize(self, params, extra, batch, rng):
        """Rows: the images, their reconstruction from the hard tokens, the patch-mean
        baseline, and the token map (a fixed random colour per code); images under 64 px are
        drawn enlarged."""
        x = jnp.asarray(batch["image"][:8], jnp.float32)
        recon, codes = self.reconstruct_hard(self._eval_params(params, extra), x)
        d = self.model.downsample
        base = patch_mean_baseline(x, d)
        colours = _code_colours(self.model.vocab_size)[np.asarray(codes)]
        colours = np.repeat(np.repeat(colours, d, axis=1), d, axis=2)
        rows = [np.asarray(x), np.asarray(recon), np.asarray(base), colours]
        up = max(1, 64 // x.shape[1])   # small images drawn at >= 64 px (nearest neighbour)
        return {"reconstruction": image_lib.image_grid(
            [np.repeat(np.repeat(r, up, axis=1), up, axis=2) for r in rows])}


def make(config) -> DVAEObjective:
    return DVAEObjective(config)
