"""Training-trajectory parity of CoCa with open_clip.

fmjax's real jitted train step (``configs/coca.py:vit_b32`` -> ``make_objective``,
``make_optimizer``, ``make_train_step``, ``create_state``; a 1-device mesh) beside a PyTorch
transcription of open_clip's CoCa training step, from the same converted weights on the same
30 batches (8 random images, token rows sot + random ids + eot + zero padding of random
lengths), float32, schedules compressed to 8 warm-up + 22 cosine steps: the loss at every step,
the logit scale at every step and the final params (rtol 1e-5 / atol 1e-6, widened by the
reference's own float32 error exactly as tests/reference/test_clip_trajectory.py ``_compare``
does; attention key biases, whose gradient is exactly 0, are not compared).

The model and loss are tests/reference/open_clip_coca_model.py (open_clip commit
89fb801f1e6087880e951fc8354b8a2077b79c6d; open_clip's default, shifted text padding mask:
``model.legacy_cls_mask=True`` in the preset). The step is open_clip's, as in the CLIP test
(tag v3.3.0 = commit 30573618fc375b12f094ef64cb3a1391cf611c45):
``src/open_clip_train/main.py`` weight-decay groups (``p.ndim < 2 or 'bn'/'ln'/'bias'/
'logit_scale' in n`` -> no decay: on open_clip's CoCa names the pooler queries, position and
token embeddings decay, ``cls_emb`` and ``class_embedding`` do not), AdamW, ``scheduler.py``
``cosine_lr`` (warm-up ``base_lr * (step + 1) / warmup``), ``train.py``: scheduler, zero_grad,
``CoCaLoss`` (``CoCaTask``: ``logits[:, :-1]`` vs ``text[:, 1:]``; caption weight 2, contrastive
1), backward, step, ``logit_scale.clamp_(0, ln 100)``.
"""
import copy
import importlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")  # the shared CLIP trajectory helpers import it

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import open_clip_coca_model as oc  # noqa: E402
import test_clip_trajectory as clip_t  # noqa: E402
from test_clip_trajectory import _compare, _fmjax_run, _open_clip_cosine_lr  # noqa: E402
from fmjax.interop import open_clip_coca  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
STEPS, BATCH = 30, 8
# The CLIP test's jitted-step runner is shared: its batch spec is these shapes.
assert (clip_t.STEPS, clip_t.BATCH, clip_t.IMAGE, clip_t.CONTEXT) == (STEPS, BATCH, oc.IMAGE, oc.CTX)
LR, WD, WARMUP, LOGIT_SCALE = 2e-3, 0.2, 8, 4.7


def _reference_model():
    torch.manual_seed(0)
    model = oc.CoCa(correct_cls_mask=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(LOGIT_SCALE)  # above ln 100: the clamp bites at step 1
    return model.train()


def _batches():
    g = np.random.default_rng(0)
    images = g.normal(size=(STEPS, BATCH, 3, oc.IMAGE, oc.IMAGE)).astype(np.float32)
    tokens = np.zeros((STEPS, BATCH, oc.CTX), np.int64)
    for s in range(STEPS):
        for i in range(BATCH):
            n = g.integers(1, oc.CTX - 1)
            tokens[s, i, 0], tokens[s, i, n + 1] = 1, oc.VOCAB - 1
            tokens[s, i, 1:n + 1] = g.integers(2, oc.VOCAB - 1, n)
    return images, tokens


def _convert(state_dict):
    return open_clip_coca.convert_open_clip_coca(
        {k: v.float() for k, v in state_dict.items()}, num_heads=oc.HEADS, text_heads=oc.HEADS,
        decoder_heads=oc.HEADS, pooler_heads=oc.HEADS)


def _config(sd):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    c = importlib.import_module("configs.coca").get_config("vit_b32")
    kwargs = open_clip_coca.coca_kwargs_from_open_clip(sd, pooler_heads=oc.HEADS,
                                                       legacy_cls_mask=True)
    kwargs.update(num_heads=oc.HEADS, text_heads=oc.HEADS, decoder_heads=oc.HEADS)
    assert c.model.patch_bias is False and c.model.legacy_cls_mask is True
    c.model = dict(name="coca", **kwargs)
    c.dtype = "float32"
    c.total_steps, c.batch_size = STEPS, BATCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.data.tokenize = dict(context_length=oc.CTX, tokenizer="words", vocab_size=oc.VOCAB)
    c.optimizer.update(lr=LR, weight_decay=WD, warmup_steps=WARMUP)
    return c


def _open_clip_train(model, images, tokens, dtype):
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E501,E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
        lr=LR, betas=(0.9, 0.98), eps=1e-6)
    scheduler = _open_clip_cosine_lr(optimizer, LR, WARMUP, STEPS)
    losses, scales = [], []
    for step in range(STEPS):
        scheduler(step)
        optimizer.zero_grad()
        text = torch.as_tensor(tokens[step])
        out = model(torch.as_tensor(images[step]).to(dtype), text)
        clip, caption = oc.coca_loss(out["image_features"], out["text_features"],
                                     out["logits"][:, :-1], text[:, 1:], out["logit_scale"])
        total = clip + caption
        total.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(total.item())
        scales.append(model.logit_scale.item())
    return np.array(losses), np.array(scales)


def test_coca_matches_open_clip_training():
    model = _reference_model()
    sd = model.state_dict()
    params = jax.tree.map(jnp.asarray, _convert(sd))
    c = _config(sd)
    images, tokens = _batches()
    run = dict(zip(("losses", "scales", "final"), _fmjax_run(c, params, images, tokens)))
    for name, dtype in (("ref", torch.float32), ("ref64", torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        losses, scales = _open_clip_train(m, images, tokens, dtype)
        final = _convert(m.state_dict())
        final["image"]["patch_embed"]["proj"]["bias"] = np.zeros(oc.WIDTH, np.float32)  # no conv1 bias
        run[name] = dict(losses=losses, scales=scales, final=final)
    ref = run["ref"]
    assert ref["scales"][0] == np.float32(math.log(100))  # the clamp bit
    assert ref["losses"][-1] < ref["losses"][0] - 0.5      # it trains
    _compare(run)
