"""DALL-E's transformer: fmjax's jitted training step against the paper's, step by step.

OpenAI published the dVAE (tests/reference/dall_e_model.py) but neither DALL-E's transformer nor
its training code, so, as in test_dvae_trajectory.py, the reference is a minimal PyTorch
transcription of the paper (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation",
arXiv:2102.12092), written as a user of ``dall_e`` would write it, independently of fmjax's code:
  - the sequence (section 2.2): the caption's text tokens, every position past the caption
    holding that position's own learned padding token ("we learn a special padding token
    separately for each of the 256 text positions", used "only when no text token is
    available"), followed by the image's 32x32 (here 8x8) dVAE codes in raster order, "obtained
    by argmax sampling from the dVAE encoder logits, without adding any gumbel noise"; the codes
    are computed here by dall_e's Encoder (the transcription in dall_e_model.py) from the same
    weights fmjax loads through ``objective.tokenizer.torch=FILE`` (the user path), and the
    test asserts both sides tokenized every image identically;
  - the transformer (section 2.2, appendix B.1): decoder-only, every image token attends to
    all text tokens, the text uses the standard causal mask, the image tokens row, column or
    convolutional sparse masks by layer (figure 11; here ("row", "column", "row", "conv"),
    fmjax's default preset; the masks are built in ``attention_mask`` below, and compared with
    ``fmjax.models.dalle.attention_pattern`` only as an extra check);
  - the loss (section 2.2): the cross-entropy of the text targets and of the image targets,
    each normalised by the number of targets of its kind in the batch, weighted 1/8 and 7/8;
  - the optimizer (appendix B.2): AdamW, beta1 0.9, beta2 0.96, eps 1e-8, weight decay 4.5e-2,
    gradient norm clipped to 4, the step size warmed up linearly from 0 then constant (the
    paper's by-hand halvings on loss plateaus are not part of a step).

Where the paper is silent, the reference takes fmjax's documented choice, named here:
  - the blocks: GPT-2 style pre-LN (LayerNorm eps 1e-5, biases on every projection, attention
    scale head_dim^-1/2, a tanh-GELU MLP of 4x the width; fmjax's ``Decoder``) in float32, no
    dropout; the paper's mixed-precision machinery (section 2.4) is not transcribed;
  - positions: one learned embedding per sequence position (``DalleTransformer``). NOT the
    paper's scheme: its figure 10 (as we read it) adds a row and a column embedding to each
    image token; a per-position table can hold that sum but trains differently. Untested here;
  - the output layer is untied from the token embedding (``tie_embeddings=False``, fmjax's
    default); the weights cross via ``fmjax.interop.hf_gpt2.convert_hf_gpt2`` with
    ``tie_word_embeddings=False`` (the torch model keeps HF GPT-2's parameter names and
    ``Conv1D`` layout; ``convert_nanogpt`` always ties);
  - each position's logits are restricted to the vocabulary it predicts, text before position
    n - 1 and image codes from it (fmjax's and DALLE-pytorch's ``logits_mask``): -inf here,
    -1e9 in fmjax, the same softmax in float32;
  - the targets: the caption's first token (sot) is not predicted; the n - 1 text targets
    include the padding tokens; the first code is predicted from the last text position;
  - the warm-up: ``LambdaLR(opt, lambda t: min(t / W, 1))`` stepped after each update, so
    update t uses peak * t / W (0 at the first): fmjax's ``warmup_mode='linear'`` with
    ``decay='constant'``;
  - the clip: ``torch.nn.utils.clip_grad_norm_`` (coefficient max / (norm + 1e-6)): fmjax's
    ``clip_eps=1e-6``;
  - the paper names no weight-decay groups: ``torch.optim.AdamW(model.parameters())``, every
    param decays (fmjax ``optimizer.decay_all=True``, which ``configs/dalle.py:paper_12b`` now
    sets, as ``configs/dvae.py:openai_8192``);
  - the sparse masks follow fmjax's reading, "the earlier image tokens of its row / column /
    causal 3x3 window". Figure 11's caption, as we recall it (not checkable offline; a
    third-party summary agrees on (a)), draws the row mask as the previous g + 1 tokens in
    raster order (reaching the same column of the previous row), the conv mask with
    wraparound, and gives the 12B model an 11x11 conv kernel (``DALLE_PRESETS['12B']`` keeps
    3x3). If so, fmjax's 'row' and 'conv' are DALLE-pytorch-style approximations: this test
    pins fmjax's reading, not the paper's figure, on that point. A third-party summary of the
    paper confirms (a): on a 4x4 grid the 8th image token reads the 4th to the 8th; fmjax has
    that mask as 'paper_row' (configs/dalle.py:paper_12b's rows), checked below against the
    rule written here.

Protocol: a 4-layer width-32, 2-head transformer over 8 caption positions ('words' tokenizer,
32 ids; 8 padding tokens; 40 text ids) and an 8x8 grid of 16 codes (dall_e's Encoder with 2
groups on 16 px images; dall_e's init plus noise on the biases), 72 positions; GPT-2 style init
with noise on biases and LayerNorms. 30 steps of B = 8 (images: a 4x4 colour pattern plus noise,
redrawn where a code's top-2 logits lie within 1e-4, ~3e3 float32 ulps, so rounding cannot flip
a code; captions of 0 - 6 words, so the padding varies), float32, from ``configs/dalle.py``'s
default preset shrunk to these sizes, on fmjax's real jitted step (``fmjax_step.run_steps``).
Compressed schedule: peak lr 3e-3 after a 10-step warm-up; the clip at 1.5 (not the paper's 4:
the tiny model's gradient norms run 3.9 -> 0.6, so it acts on the first ~20 steps only); weight
decay the paper's 4.5e-2 (it shrinks every param by ~3e-3 over the 30 steps, ~300x the tolerance).

Asserted: the image codes equal; the loss, the text and image losses and the lr at every step
within rtol 1e-5 (atol 1e-6); every final param within rtol 1e-5 (atol 1e-6), but the attention
key biases, whose gradient is exactly 0 (softmax) so that only float32 noise normalised by Adam
moves them (as test_lm_trajectory's NOISE_ONLY). Measured (torch 2.13 CPU, jax 0.10.2):
worst error 0.05x the tolerance (per-step values) and 0.10x (params; 0.17x with the
reference on 2 torch threads): no float64 run needed. The file runs in 17-32 s with jax's
compilation cache warm (5 compiled steps), ~60 s cold, on a busy 2-core CPU.

``test_other_choices_are_detected`` changes one option at a time; measured worst errors in
units of the tolerance: fmjax's default decay groups (``decay_all=False``) 3.1e2, a warm-up one
step ahead (``warmup_mode='plus_one'``) 4.3e4, one pad id (``unique_pad_tokens=False``) 1.0e5,
full attention 8.4e4 (and ``text_loss_weight=0.5``, not kept for time, 9.5e4).
"""
import functools
import os
import re
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fmjax.interop import hf_gpt2  # noqa: E402
from fmjax.models import dalle as fm_dalle  # noqa: E402
from fmjax.testing import load_config, one_torch_thread  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dall_e_model import Encoder, map_pixels, perturbed  # noqa: E402
from fmjax_step import flat, rel_err, run_steps  # noqa: E402

STEPS, B, SEED = 30, 8, 0
# The caption: fmjax's 'words' tokenizer with 32 ids (pad 0, words 1 .. 29, sot 30, eot 31), 8 positions.
WORDS, TEXT_LEN = 32, 8
PAD, SOT, EOT = 0, WORDS - 2, WORDS - 1
# The dVAE: dall_e's Encoder with 2 groups (one 2x2 max-pool): 16 px -> an 8x8 grid of 16 codes.
SIZE, DVAE = 16, dict(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16)
GRID, CODES = SIZE // 2, 16
TEXT_VOCAB = WORDS + TEXT_LEN          # + one learned padding token per text position
VOCAB = TEXT_VOCAB + CODES             # the joint vocabulary: text ids, then the image codes
LENGTH = TEXT_LEN + GRID * GRID        # 72: the model reads 71 tokens and predicts 71
WIDTH, DEPTH, HEADS, MLP_DIM = 32, 4, 2, 128
TYPES = ("row", "column", "row", "conv")
TEXT_WEIGHT = 1.0 / 8
LR, WARMUP, WD, CLIP = 3e-3, 10, 4.5e-2, 1.5
MARGIN = 1e-4
RTOL, ATOL = 1e-5, 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
# Attention key biases get a gradient of exactly 0 (softmax is invariant to them): their
# float32 rounding noise, normalised by Adam, is all that moves them (as in test_lm_trajectory).
NOISE_ONLY = re.compile(r"\['attn'\]\['key'\]\['bias'\]$")


# -- the data ------------------------------------------------------------------------------------
def encode(encoder, images):
    """(B, K, g, g) dVAE encoder logits of NHWC images in [0, 1] (dall_e's usage: map_pixels first)."""
    with torch.no_grad():
        return encoder(map_pixels(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))))


def margin(logits):
    """The smallest gap between the largest and second-largest code logit at any grid position."""
    top2 = logits.topk(2, dim=1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def make_batches(encoder, seed=0):
    """STEPS batches: images in [0, 1] (a 4x4 colour pattern plus noise) and caption rows
    ``sot, words, eot, pad ...`` of random lengths (2 .. TEXT_LEN real tokens). An image whose
    code argmax is a near-tie (top-2 logit gap < MARGIN; the logits' std is ~0.4) is drawn
    again, so that float32 rounding cannot flip a code between torch's and XLA's convolutions.
    Returns (the batches as fmjax reads them, the number of real tokens of every row)."""
    rng = np.random.default_rng(seed)
    batches, lengths = [], []
    for _ in range(STEPS):
        image = np.zeros((B, SIZE, SIZE, 3), np.float32)
        for b in range(B):
            while True:
                coarse = np.repeat(np.repeat(rng.uniform(size=(4, 4, 3)), SIZE // 4, 0), SIZE // 4, 1)
                image[b] = 0.8 * coarse + 0.2 * rng.uniform(size=(SIZE, SIZE, 3))
                if margin(encode(encoder, image[b:b + 1])) > MARGIN:
                    break
        tokens = np.full((B, TEXT_LEN), PAD, np.int32)
        n = rng.integers(2, TEXT_LEN + 1, B)
        for b in range(B):
            tokens[b, 0], tokens[b, n[b] - 1] = SOT, EOT
            tokens[b, 1:n[b] - 1] = rng.integers(1, WORDS - 2, n[b] - 2)
        batches.append({"image": image, "tokens": tokens})
        lengths.append(n)
    return batches, lengths


# -- the reference: the paper's transformer and step, in torch ------------------------------------
class Conv1D(torch.nn.Module):
    """x @ weight + bias, weight (in, out): GPT-2's layout, so the state dict has HF GPT-2's keys."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = torch.nn.Parameter(torch.randn(n_out) * 0.02)

    def forward(self, x):
        return x @ self.weight + self.bias


class LayerNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(WIDTH, 3 * WIDTH), Conv1D(WIDTH, WIDTH)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in self.c_attn(x).split(d, -1))
        scores = (q @ k.transpose(-1, -2)) / (d // HEADS) ** 0.5
        y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(WIDTH, MLP_DIM), Conv1D(MLP_DIM, WIDTH)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = LayerNorm(WIDTH), Attention(), LayerNorm(WIDTH), MLP()

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


@functools.lru_cache(maxsize=None)
def attention_mask(kind, n=TEXT_LEN, g=GRID):
    """(L, L) bool, [q, k] True when query position q may read key position k (figure 11, as the
    module docstring reads it): causal; every query reads the text before it; an image query
    reads the earlier image tokens of its row / its column / its causal 3x3 window; 'paper_row'
    (the paper preset's): the previous g image tokens in raster order."""
    length = n + g * g
    m = np.zeros((length, length), bool)
    for q in range(length):
        for k in range(q + 1):
            if k < n:
                m[q, k] = True
                continue
            (rq, cq), (rk, ck) = divmod(q - n, g), divmod(k - n, g)
            m[q, k] = {"full": True, "row": rq == rk, "column": cq == ck, "paper_row": q - k <= g,
                       "conv": rq - rk <= 1 and abs(cq - ck) <= 1}[kind]
    return m


class Transformer(torch.nn.Module):
    """Decoder-only, pre-LN: token embedding + one learned embedding per position, DEPTH blocks
    (layer i reads with the mask of ``types[i]``), a final LayerNorm, an untied output layer."""

    def __init__(self, types=TYPES):
        super().__init__()
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(VOCAB, WIDTH), wpe=torch.nn.Embedding(LENGTH, WIDTH),
            h=torch.nn.ModuleList([Block() for _ in range(DEPTH)]), ln_f=LayerNorm(WIDTH)))
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        with torch.no_grad():
            self.transformer.wte.weight.normal_(0, 0.02)
            self.transformer.wpe.weight.normal_(0, 0.01)
            self.lm_head.weight.normal_(0, 0.02)
        self.types = types

    def forward(self, seq):
        t = seq.shape[1]
        x = self.transformer.wte(seq) + self.transformer.wpe(torch.arange(t))
        for block, kind in zip(self.transformer.h, self.types):
            x = block(x, torch.from_numpy(attention_mask(kind)[:t, :t]))
        logits = self.lm_head(self.transformer.ln_f(x))
        # Each position predicts from its own vocabulary: text before position n - 1, image from it.
        predicts_image = torch.arange(t)[:, None] >= TEXT_LEN - 1
        is_image = torch.arange(VOCAB)[None, :] >= TEXT_VOCAB
        return logits.masked_fill(predicts_image != is_image, float("-inf"))


def reference_sequence(encoder, batch, lengths):
    """(B, LENGTH) joint ids: the caption with every position past its last real token replaced
    by that position's own padding token (id WORDS + position), then the image's dVAE codes (the
    argmax of the encoder's logits, no gumbel noise, raster order) shifted past the text
    vocabulary; and the codes' smallest top-2 logit gap."""
    text = torch.as_tensor(batch["tokens"], dtype=torch.long).clone()
    pos = torch.arange(TEXT_LEN)[None].expand(B, -1)
    pad = pos >= torch.as_tensor(lengths)[:, None]
    text[pad] = (WORDS + pos)[pad]
    logits = encode(encoder, batch["image"])
    codes = logits.argmax(1).reshape(B, -1)
    return torch.cat([text, codes + TEXT_VOCAB], 1), margin(logits)


def run_reference(model, encoder, batches, lengths):
    """The paper's step, STEPS times. Returns per-step arrays and the trained model."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.96), eps=1e-8, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(t / WARMUP, 1.0))
    out = {k: [] for k in ("loss", "lr", "text_loss", "image_loss", "grad_norm", "margin", "codes")}
    for batch, n in zip(batches, lengths):
        seq, gap = reference_sequence(encoder, batch, n)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        nll = -F.log_softmax(model(inputs), -1).gather(-1, targets[..., None])[..., 0]
        cut = TEXT_LEN - 1     # inputs 0 .. n - 2 predict text tokens 1 .. n - 1, the rest the codes
        text_loss = nll[:, :cut].sum() / nll[:, :cut].numel()     # / the batch's text targets
        image_loss = nll[:, cut:].sum() / nll[:, cut:].numel()    # / the batch's image targets
        loss = TEXT_WEIGHT * text_loss + (1 - TEXT_WEIGHT) * image_loss
        out["lr"].append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        loss.backward()
        out["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        for k, v in (("loss", loss), ("text_loss", text_loss), ("image_loss", image_loss)):
            out[k].append(float(v.detach()))
        out["margin"].append(gap)
        out["codes"].append(seq[:, TEXT_LEN:].numpy() - TEXT_VOCAB)
    return {k: np.array(v) for k, v in out.items()}, model


def to_fmjax(model):
    """The torch model's weights as fmjax DalleTransformer params (HF GPT-2 keys, untied head:
    ``fmjax.interop.hf_gpt2.convert_hf_gpt2``; copies)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"decoder": hf_gpt2.convert_hf_gpt2(sd, dict(n_head=HEADS, n_embd=WIDTH, n_layer=DEPTH,
                                                        tie_word_embeddings=False))}


def without_pad_rows(params):
    """The params of a model without the padding tokens (unique_pad_tokens=False): the joint
    vocabulary loses the TEXT_LEN rows WORDS .. TEXT_VOCAB - 1."""
    keep = np.r_[0:WORDS, TEXT_VOCAB:VOCAB]
    out = jax.tree.map(np.asarray, params)
    d = dict(out["decoder"])
    d["token_embed"] = {"embedding": d["token_embed"]["embedding"][keep]}
    d["lm_head"] = {"kernel": d["lm_head"]["kernel"][:, keep]}
    return {"decoder": d}


# -- fmjax ---------------------------------------------------------------------------------------
def dalle_config(encoder_file, **overrides):
    c = load_config("dalle")      # the default preset, shrunk; the paper's options set below
    c.seed = SEED
    c.total_steps, c.batch_size = STEPS, B
    c.data.image_size = SIZE
    c.data.tokenize = dict(context_length=TEXT_LEN, tokenizer="words", vocab_size=WORDS)
    c.objective.update(dict(text_loss_weight=TEXT_WEIGHT, unique_pad_tokens=True, caption_drop_prob=0.0))
    c.objective.tokenizer = dict(torch=str(encoder_file))
    c.model = dict(name="dalle", width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP_DIM, attention_types=TYPES)
    c.optimizer.update(dict(name="adamw", lr=LR, b1=0.9, b2=0.96, eps=1e-8, weight_decay=WD,
                            warmup_steps=WARMUP, warmup_mode="linear", decay="constant",
                            clip_norm=CLIP, clip_eps=1e-6, decay_all=True))
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def run_fmjax(config, params0, batches):
    """fmjax's jitted train step on every batch: (per-step metrics, final params, the image
    codes fmjax's frozen tokenizer gives every batch's images)."""
    metrics, params, extra, objective = run_steps(config, params0, batches,
                                                  record=("loss", "lr", "text_loss", "image_loss"))
    images = np.concatenate([b["image"] for b in batches])
    codes = np.asarray(jax.jit(objective.image_codes)(extra, images)).reshape(STEPS, B, -1)
    return metrics, params, codes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # One torch thread, as conftest's function-scoped _one_torch_thread (which a module fixture
    # runs before): torch's spinning OpenMP workers beside a busy core cost 10x here.
    with one_torch_thread():
        return _reference(tmp_path_factory)


def _reference(tmp_path_factory):
    torch.manual_seed(SEED)
    encoder = perturbed(Encoder(DVAE["group_count"], DVAE["n_hid"], DVAE["n_blk_per_group"], 3,
                                DVAE["vocab_size"]), SEED + 1).eval()
    path = tmp_path_factory.mktemp("dalle") / "encoder.pt"
    torch.save(encoder.state_dict(), path)      # what fmjax loads: tokenizer.torch=FILE
    model = Transformer()
    init = to_fmjax(model)
    batches, lengths = make_batches(encoder)
    ref, final = run_reference(model, encoder, batches, lengths)
    return dict(path=path, init=init, batches=batches, ref=ref, final=to_fmjax(final))


METRICS = ("loss", "text_loss", "image_loss", "lr")


def worst_errors(ref, final, metrics, params):
    """(worst per-step metric error, worst final-param error), in units of the tolerance."""
    m = max(rel_err(metrics[k], ref[k], RTOL, ATOL) for k in METRICS) / RTOL
    got, want = flat(params), flat(final)
    assert got.keys() == want.keys()
    p = max(rel_err(got[k], want[k], PARAM_RTOL, PARAM_ATOL) for k in want if not NOISE_ONLY.search(k))
    return m, p / PARAM_RTOL


def test_reference_masks_are_fmjax_patterns():
    """The masks written above from figure 11 equal fmjax's ``attention_pattern`` (an extra
    check: the reference never reads fmjax's)."""
    for kind in ("full", "row", "paper_row", "column", "conv"):
        np.testing.assert_array_equal(attention_mask(kind), fm_dalle.attention_pattern(kind, TEXT_LEN, GRID, 3),
                                      err_msg=kind)
    assert fm_dalle.layer_types(TYPES, DEPTH) == TYPES


def test_dalle_trajectory_matches_the_papers_step(reference):
    r, ref = reference, reference["ref"]
    metrics, params, codes = run_fmjax(dalle_config(r["path"]), r["init"], r["batches"])
    # Both sides tokenized every image identically (the encoder file through the user path).
    np.testing.assert_array_equal(codes, ref["codes"])
    assert ref["margin"].min() > MARGIN
    assert len(np.unique(np.concatenate(ref["codes"]))) >= 4
    # The warm-up was crossed (0 at step 0, the peak from step WARMUP); the clip acted on some
    # steps only; it trained.
    assert ref["lr"][0] == 0.0 and ref["lr"][WARMUP - 1] < LR and (ref["lr"][WARMUP:] == LR).all()
    assert (ref["grad_norm"] > CLIP).sum() >= 5 and (ref["grad_norm"] < CLIP).sum() >= 5, ref["grad_norm"]
    assert ref["image_loss"][-1] < 0.5 * ref["image_loss"][0] and ref["text_loss"][-1] < ref["text_loss"][0]
    for k in METRICS:
        np.testing.assert_allclose(metrics[k], ref[k], rtol=RTOL, atol=ATOL, err_msg=k)
    m, p = worst_errors(ref, r["final"], metrics, params)
    print(f"\nDALL-E vs the paper's step: worst error / tolerance: per-step metrics {m:.3f}, final params {p:.3f} "
          f"(clip acted on {(ref['grad_norm'] > CLIP).sum()}/{STEPS} steps; loss {ref['loss'][0]:.3f} -> "
          f"{ref['loss'][-1]:.3f}; smallest code logit gap {ref['margin'].min():.1e})")
    assert m <= 1.0 and p <= 1.0, (m, p)
    # Every param moved well beyond the tolerance (the test can see a wrong step).
    init, final = flat(r["init"]), flat(r["final"])
    moved = min(rel_err(final[k], init[k], PARAM_RTOL, PARAM_ATOL) for k in init if not NOISE_ONLY.search(k))
    assert moved / PARAM_RTOL > 10.0, moved


@pytest.mark.parametrize("key, value", [
    ("optimizer.decay_all", False),             # fmjax's default groups: biases, norms, embeddings undecayed
    ("optimizer.warmup_mode", "plus_one"),      # the warm-up one step ahead: peak * (t + 1) / W
    ("objective.unique_pad_tokens", False),     # the tokenizer's one pad id at every padded position
    ("model.attention_types", ("full",)),       # dense causal attention, no sparse masks
])
def test_other_choices_are_detected(reference, key, value):
    """Each change alone leaves the paper's trajectory by a wide margin (worst error over the
    per-step metrics and the final params, in units of the tolerance; measured in the module
    docstring)."""
    r = reference
    init, final = r["init"], r["final"]
    if key == "objective.unique_pad_tokens":
        init, final = without_pad_rows(init), without_pad_rows(final)
    metrics, params, _ = run_fmjax(dalle_config(r["path"], **{key: value}), init, r["batches"])
    m, p = worst_errors(r["ref"], final, metrics, params)
    print(f"\n{key}={value}: worst error {max(m, p):.1e} x tolerance (metrics {m:.1e}, params {p:.1e})")
    assert max(m, p) > 100.0, (m, p)
