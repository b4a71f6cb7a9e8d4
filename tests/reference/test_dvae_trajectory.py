"""The dVAE: fmjax's jitted training step against DALL-E's dVAE training step, step by step.

OpenAI published the dVAE's model (openai/DALL-E at commit
5be4b236bc3ade6943662354117a0e83752cc322: ``dall_e/encoder.py``, ``decoder.py``, ``utils.py``,
transcribed in tests/reference/dall_e_model.py) but no training code. The training step below is
therefore transcribed from the paper (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation",
arXiv:2102.12092, section 2.1 and appendix A.2), in PyTorch, as a user of ``dall_e`` would write
it, independently of fmjax's formulas:
  - the encoder reads ``map_pixels(x)`` and gives logits over K codes at each grid position;
    q(z | x) = softmax(logits);
  - the gumbel-softmax relaxation: the decoder reads ``softmax((logits + g) / tau, dim=1)``,
    g ~ Gumbel(0, 1) (the same draws as fmjax's step, computed by jax from the state's key);
  - the logit-Laplace likelihood of the mapped pixels y = map_pixels(x) under the decoder's
    (mu, ln b): f(y | mu, b) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)), the NLL written as
    ``log(2 b y (1 - y)) + |logit(y) - mu| / b`` (torch.logit, not fmjax's log-difference);
  - the KL of q to the uniform prior summed over the grid; "we divide the overall loss by
    256 x 256 x 3, so that the weight of the KL term becomes beta / 192": the loss per image is
    mean(NLL over the H W C values) + beta * KL / (H W C), averaged over the batch;
  - the schedules, all cosine: temperature 1 -> 1/16 over the first 150,000 updates, KL weight
    0 -> 6.6 over the first 5000, step size 1e-4 -> 1.25e-6 (the value at update t is used for
    update t, t = 0, 1, ...);
  - ``torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)`` over every
    parameter (the paper names no parameter groups; fmjax's presets for the paper therefore set
    ``optimizer.decay_all=True``);
  - iterate averaging with decay 0.999 after each update (fmjax's ``extra['ema']``).

Protocol: the tiny dVAEs of tests/interop/test_dall_e_parity.py (the published 4-group, 2-block
pattern; the CPU preset's 3-group, 1-block pattern) with dall_e's init plus noise on every bias,
converted to fmjax params by ``fmjax/interop/dall_e.py`` (the converter users load OpenAI's
weights with). Both sides take 30 steps on the same batches (B = 4, uniform images in [0, 1],
16 px), float32, from ``configs/dvae.py``'s default preset shrunk to these sizes, with the
paper's schedules compressed: the temperature anneals over 20 steps, the KL weight warms up
over 10, the step size runs 2e-3 -> 2e-5 over the 30; weight decay 0.1 (the paper's 1e-4 at
these step sizes would move nothing in 30 steps) and iterate averaging 0.9 (0.999 likewise),
so the decay groups and the average show.

Asserted: the loss, the step size, the temperature and the KL weight at every step within
rtol 1e-5 (atol 1e-6); every final param and iterate-averaged param within rtol 5e-5 (atol
5e-6). Why 5e-5: at the temperature's 1/16 the relaxed sample multiplies the logits' rounding
by 16, so float32 rounding alone moves this trajectory by about 1e-5: the reference against
itself, on 1 and on 2 torch threads, ends 0.95e-5 apart (3-group pattern, measured at rtol
1e-5, atol 1e-6). Measured (torch 2.13 CPU, jax 0.10.2, the suite's settings): worst max |err| /
(atol/rtol + |ref|) 4e-7 (the per-step values) and 2.1e-5 (params and average) for the 3-group
pattern, 3e-7 and 4e-6 for the 4-group one.

``test_other_choices_are_detected`` changes one option at a time and checks that the test
above would fail; measured worst relative errors in its docstring.
"""
import math
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fmjax.interop import dall_e as interop  # noqa: E402
from fmjax.testing import load_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dall_e_model import Decoder, Encoder, map_pixels, perturbed  # noqa: E402
from fmjax_step import flat, rel_err, run_steps  # noqa: E402

STEPS, B, SIZE, SEED = 30, 4, 16, 0
LR, MIN_LR, WD, EMA = 2e-3, 2e-5, 0.1, 0.9
BETA, KL_WARMUP, TAU_START, TAU_END, TAU_STEPS = 6.6, 10, 1.0, 1.0 / 16, 20
RTOL, ATOL = 1e-5, 1e-6
# The final params and their average: 5x (see the module docstring: the reference against
# itself on 1 vs 2 torch threads already differs by 0.95e-5).
PARAM_RTOL, PARAM_ATOL = 5e-5, 5e-6
ARCHS = {
    "published_pattern": dict(group_count=4, n_hid=8, n_blk_per_group=2, vocab_size=32, n_init=8),
    "cpu_pattern": dict(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32, n_init=12),
}


def grid(arch):
    return SIZE // 2 ** (arch["group_count"] - 1)


def make_batches(seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(size=(B, SIZE, SIZE, 3)).astype(np.float32)} for _ in range(STEPS)]


def gumbel_draws(arch, seed=SEED):
    """The Gumbel noise fmjax's step t draws: ``jax.random.gumbel(fold_in(state.rng, t), ...)``
    with ``state.rng = split(PRNGKey(seed))[1]`` (fmjax/train/state.py, step.py)."""
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    h = grid(arch)
    return [np.asarray(jax.random.gumbel(jax.random.fold_in(state_rng, t), (B, h, h, arch["vocab_size"]),
                                         np.float32)) for t in range(STEPS)]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


# -- the reference step (the paper, in torch, on dall_e's modules) -----------------------------
def cosine(start, end, t, steps):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t / steps, 1.0)))


def reference_models(arch, seed=0):
    torch.manual_seed(seed)
    enc = perturbed(Encoder(arch["group_count"], arch["n_hid"], arch["n_blk_per_group"], 3, arch["vocab_size"]),
                    seed + 1)
    dec = perturbed(Decoder(arch["group_count"], arch["n_init"], arch["n_hid"], arch["n_blk_per_group"], 3,
                            arch["vocab_size"]), seed + 2)
    return enc, dec


def run_reference(enc, dec, batches, gumbels):
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(LR, MIN_LR, t, STEPS) / LR)
    ema = [p.detach().clone() for p in params]
    out = {"loss": [], "lr": [], "temperature": [], "kl_weight": []}
    for t, (batch, g) in enumerate(zip(batches, gumbels)):
        tau = cosine(TAU_START, TAU_END, t, TAU_STEPS)
        beta = BETA - cosine(BETA, 0.0, t, KL_WARMUP)   # 0 -> BETA, cosine
        x = nchw(batch["image"])
        y = map_pixels(x)
        logits = enc(y)
        z = F.softmax((logits + nchw(g)) / tau, dim=1)
        stats = dec(z)
        mu, b = stats[:, :3], torch.exp(stats[:, 3:])
        nll = torch.log(2 * b * y * (1 - y)) + torch.abs(torch.logit(y) - mu) / b
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * logq).sum(1) + math.log(logits.shape[1])
        n_values = x.shape[1] * x.shape[2] * x.shape[3]
        loss = (nll.mean((1, 2, 3)) + beta * kl.sum((1, 2)) / n_values).mean()
        out["lr"].append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(EMA).add_(p, alpha=1 - EMA)
        out["loss"].append(loss.item())
        out["temperature"].append(tau)
        out["kl_weight"].append(beta)
    n_enc = len(list(enc.parameters()))   # no buffers: state_dict() lists the parameters in order
    ema_enc, ema_dec = dict(zip(enc.state_dict(), ema[:n_enc])), dict(zip(dec.state_dict(), ema[n_enc:]))
    return ({k: np.array(v) for k, v in out.items()}, to_fmjax(enc.state_dict(), dec.state_dict()),
            to_fmjax(ema_enc, ema_dec))


def to_fmjax(enc_sd, dec_sd):
    return interop.convert_dall_e(enc_sd, dec_sd)[0]   # copies: later torch steps do not reach them


# -- fmjax -------------------------------------------------------------------------------------
def dvae_config(arch, **overrides):
    c = load_config("dvae")   # the default preset, shrunk; its reference options set below
    c.seed = SEED
    c.total_steps, c.batch_size = STEPS, B
    c.data.image_size = SIZE
    c.model = dict(name="dvae", output="logit_laplace", **arch)
    c.objective.update(dict(kl_weight=BETA, kl_warmup_steps=KL_WARMUP, temp_start=TAU_START, temp_end=TAU_END,
                            temp_steps=TAU_STEPS, temp_schedule="cosine", ema_decay=EMA, straight_through="",
                            diversity_weight=0.0))
    c.optimizer.update(dict(name="adamw", lr=LR, min_lr=MIN_LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD,
                            warmup_steps=0, decay="cosine", decay_all=True, clip_norm=0.0))
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def run_fmjax(config, init_params, batches):
    metrics, params, extra, _ = run_steps(config, init_params, batches, extra0={"ema": init_params},
                                          record=("loss", "lr", "temperature", "kl_weight"))
    return metrics, params, extra["ema"]


def worst_errors(ref, got):
    """(worst per-step metric error, worst final-param error, worst EMA error), each in units
    of the tolerance (<= 1 passes)."""
    (ref_m, ref_p, ref_e), (got_m, got_p, got_e) = ref, got
    m = max(rel_err(got_m[k], ref_m[k], RTOL, ATOL) for k in ref_m)
    fp, fr = flat(got_p), flat(ref_p)
    p = max(rel_err(fp[k], fr[k], PARAM_RTOL, PARAM_ATOL) for k in fr)
    fe, fre = flat(got_e), flat(ref_e)
    e = max(rel_err(fe[k], fre[k], PARAM_RTOL, PARAM_ATOL) for k in fre)
    return m / RTOL, p / PARAM_RTOL, e / PARAM_RTOL


_CACHE = {}


def reference_run(name):
    if name not in _CACHE:
        arch = ARCHS[name]
        enc, dec = reference_models(arch)
        init = to_fmjax(enc.state_dict(), dec.state_dict())
        batches = make_batches()
        ref = run_reference(enc, dec, batches, gumbel_draws(arch))
        _CACHE[name] = (init, batches, ref)
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_dvae_trajectory_matches_the_papers_step(name):
    init, batches, ref = reference_run(name)
    got = run_fmjax(dvae_config(ARCHS[name]), init, batches)
    ref_m, got_m = ref[0], got[0]
    # The schedules crossed what they should: the KL warm-up ended, the temperature reached 1/16.
    assert ref_m["kl_weight"][0] == 0.0 and ref_m["kl_weight"][-1] == BETA
    assert ref_m["temperature"][0] == 1.0 and ref_m["temperature"][-1] == TAU_END
    for k in ref_m:
        np.testing.assert_allclose(got_m[k], ref_m[k], rtol=RTOL, atol=ATOL, err_msg=k)
    m, p, e = worst_errors(ref, got)
    print(f"{name}: worst error / tolerance: metrics {m:.2f}, params {p:.2f}, iterate average {e:.2f}")
    assert m <= 1.0 and p <= 1.0 and e <= 1.0, (m, p, e)   # in units of the tolerance
    # The run moved every param well beyond the tolerance (the test can see a wrong step).
    moved = min(rel_err(a, b, RTOL, ATOL) for a, b in zip(flat(ref[1]).values(), flat(init).values())) / RTOL
    assert moved > 10.0, moved


@pytest.mark.parametrize("key, value", [
    ("optimizer.decay_all", False),             # fmjax's default groups: biases undecayed
    ("objective.temp_schedule", "exponential"),
    ("objective.kl_warmup_steps", 11),          # a warm-up one step longer
])
def test_other_choices_are_detected(key, value):
    """Each change alone makes the trajectory test fail by a wide margin (worst error over the
    loss, the schedules, the params and the iterate average, in units of the tolerance;
    measured: fmjax's default decay groups 1.3e3, an exponential temperature 4.5e4, the
    longer warm-up 1.5e4)."""
    name = "cpu_pattern"
    init, batches, ref = reference_run(name)
    got = run_fmjax(dvae_config(ARCHS[name], **{key: value}), init, batches)
    worst = max(worst_errors(ref, got))
    print(f"{key}={value}: worst error {worst:.1e} x tolerance")
    assert worst > 10.0, worst
