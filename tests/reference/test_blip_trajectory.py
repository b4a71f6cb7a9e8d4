"""Training-trajectory parity of BLIP pre-training with salesforce/BLIP.

fmjax's real jitted train step (``configs/blip.py:base`` -> ``make_objective``,
``make_optimizer``, ``make_train_step``, ``create_state``; a 1-device mesh) beside a PyTorch
transcription of BLIP's pre-training step (tests/reference/blip_pretrain_model.py, salesforce/BLIP
commit 056a169437371659074aa2732649d5de3bffb4a8: ``BLIP_Pretrain.forward`` and ``pretrain.py``
``train``), from the same weights (the reference's state dict through
``fmjax.interop.blip.convert_blip``; its momentum model and queues through ``momentum_state``),
on the same 30 batches (8 random images, token rows [CLS] + random ids + [SEP] + zero padding
of random lengths), with the same ITM negative draws (the reference's ``torch.multinomial``
replayed as the Gumbel-max draw of fmjax's noise), float32:

* ``pretrain.py``: AdamW over ``model.parameters()`` in one group (wd 0.05 on every param, the
  temperature included; the momentum copies have no gradient), ``warmup_lr_schedule`` from
  1e-6 over the first 8 steps of epoch 0, then ``step_lr_schedule`` x0.9 per epoch (an epoch
  is 20 steps here), ``alpha = 0.4 * min(1, i / (2 x 6))`` (2 "epochs" of 6 steps), ``loss =
  loss_ita + loss_itm + loss_lm``;
* ``BLIP_Pretrain.forward``: ``temp.clamp_(0.001, 0.5)`` first (the temperature starts at
  0.499 and the clamp bites), the momentum update (m = 0.9 here, 0.995 in the paper) before
  the momentum features, the queues (16 = 2 batches), momentum distillation, ITM with hard
  negatives, LM with label smoothing 0.1.

Compared: the loss and the temperature at every step, the final params (as the CLIP test's
``_compare``: rtol 1e-5 / atol 1e-6 widened by the reference's own float32 error, measured by a
float64 rerun), the final momentum model and both queues.
"""
import copy
import importlib
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
import blip_pretrain_model as bp  # noqa: E402
from test_clip_trajectory import _compare  # noqa: E402
from fmjax.interop import blip as blip_interop  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402
from fmjax.parallel import mesh as mesh_lib  # noqa: E402
from fmjax.parallel import rules as rules_lib  # noqa: E402
from fmjax.train import optimizer as opt_lib  # noqa: E402
from fmjax.train import state as state_lib  # noqa: E402
from fmjax.train import step as step_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
STEPS, BATCH, IMAGE, PATCH, CTX = 30, 8, 16, 8, 12
VOCAB, HEADS, QUEUE, EPOCH = 40, 4, 16, 20
LR, WD, WARMUP, WARMUP_LR, ALPHA, RAMP, MOMENTUM = 1e-3, 0.05, 8, 1e-6, 0.4, 12, 0.9
BERT = bp.Cfg(vocab_size=VOCAB, hidden_size=32, num_attention_heads=HEADS, intermediate_size=64,
              num_hidden_layers=2, max_position_embeddings=16, layer_norm_eps=1e-12,
              pad_token_id=0, encoder_width=48)


def _reference_model():
    torch.manual_seed(0)
    model = bp.BLIPPretrain(IMAGE, PATCH, 48, 2, HEADS, BERT, embed_dim=16, queue_size=QUEUE,
                            momentum=MOMENTUM, temp=0.499)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.copy_params()
    return model.train()


def _batches():
    g = np.random.default_rng(0)
    images = g.normal(size=(STEPS, BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    tokens = np.zeros((STEPS, BATCH, CTX), np.int64)
    for s in range(STEPS):
        for i in range(BATCH):
            n = g.integers(1, CTX - 1)
            tokens[s, i, 0], tokens[s, i, n + 1] = 1, 2
            tokens[s, i, 1:n + 1] = g.integers(3, VOCAB - 2, n)
    return images, tokens


def _config():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    c = importlib.import_module("configs.blip").get_config("base")
    assert c.optimizer.decay_all and c.optimizer.decay == "multistep" and c.optimizer.warmup_init
    c.dtype = "float32"
    c.total_steps, c.batch_size = STEPS, BATCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.data.tokenize = dict(context_length=CTX, tokenizer="words", vocab_size=VOCAB - 2)
    c.optimizer.update(lr=LR, weight_decay=WD, warmup_steps=WARMUP, warmup_init=WARMUP_LR,
                       milestones=(EPOCH,))
    c.objective.update(queue_size=QUEUE, momentum=MOMENTUM, alpha=ALPHA, alpha_ramp_steps=RAMP)
    return c


def _fmjax_run(c, params, extra, images, tokens):
    """fmjax's jitted step; per-step losses and temperatures, the final state, and the Gumbel
    noise of each step's ITM draws (the objective's keys 5 and 6 of ``split(rng, 7)``)."""
    objective = make_objective(c)
    objective.check(c)
    tx, schedule = opt_lib.make_optimizer(c.optimizer, c.total_steps, c.batch_size)
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    rules = rules_lib.get_rules(c.sharding)
    spec = {"image": jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((BATCH, CTX), jnp.int32)}
    state, shardings = state_lib.create_state(objective, tx, spec, mesh, rules, c.seed)
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    assert jax.tree.structure(state.extra) == jax.tree.structure(extra)
    params = jax.device_put(params, shardings.params)
    state = state.replace(params=params, extra=jax.device_put(extra, shardings.extra),
                          opt_state=jax.device_put(tx.init(params), shardings.opt_state))
    step_fn = step_lib.make_train_step(objective, tx, schedule, rules)
    batch_sh = mesh_lib.batch_sharding(mesh)
    jitted = step_lib.jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sh, spec))
    noise = []
    for s in range(STEPS):
        keys = jax.random.split(jax.random.fold_in(state.rng, s), 7)
        noise.append([np.asarray(jax.random.gumbel(k, (BATCH, BATCH), jnp.float32))
                      for k in (keys[5], keys[6])])
    losses, temps = [], []
    with state_lib.mesh_context(mesh):
        for s in range(STEPS):
            batch = {"image": jnp.asarray(images[s].transpose(0, 2, 3, 1)),
                     "tokens": jnp.asarray(tokens[s], jnp.int32)}
            state, metrics = jitted(state, batch)
            losses.append(float(metrics["loss"]))
            temps.append(float(metrics["temp"]))
    return np.array(losses), np.array(temps), jax.device_get(state.params), \
        jax.device_get(state.extra), noise


def _reference_train(model, images, tokens, noise, dtype):
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=LR, weight_decay=WD)
    losses, temps = [], []
    for step in range(STEPS):
        epoch, i = divmod(step, EPOCH)
        for group in optimizer.param_groups:  # step_lr_schedule, then warmup_lr_schedule in epoch 0
            group["lr"] = max(1e-6, LR * 0.9 ** epoch)
            if epoch == 0:
                group["lr"] = min(LR, WARMUP_LR + (LR - WARMUP_LR) * i / WARMUP)
        optimizer.zero_grad()
        alpha = ALPHA * min(1, (epoch * EPOCH + i) / RAMP)
        ids = torch.as_tensor(tokens[step])
        g_t2i, g_i2t = (torch.as_tensor(n) for n in noise[step])
        ita, itm, lm = model(torch.as_tensor(images[step]).to(dtype), ids, (ids != 0).long(),
                             alpha, g_t2i, g_i2t)
        temps.append(model.temp.item())  # as forward clamped and used it
        loss = ita + itm + lm
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses), np.array(temps)


def _final(model):
    sd = {k: v.float() for k, v in model.blip_state_dict().items()}
    params = blip_interop.convert_blip(sd, num_heads=HEADS, text_heads=HEADS)
    params["temp"] = np.clip(params["temp"], 0.001, 0.5)  # fmjax clamps after the update
    return params, blip_interop.momentum_state(sd, num_heads=HEADS, text_heads=HEADS)


def test_blip_matches_salesforce_training():
    model = _reference_model()
    sd = {k: v.float() for k, v in model.blip_state_dict().items()}
    params = jax.tree.map(jnp.asarray, blip_interop.convert_blip(sd, num_heads=HEADS,
                                                                 text_heads=HEADS))
    extra = jax.tree.map(jnp.asarray, blip_interop.momentum_state(sd, num_heads=HEADS,
                                                                  text_heads=HEADS))
    c = _config()
    kwargs = blip_interop.blip_kwargs_from_state_dict(sd, num_heads=HEADS, text_heads=HEADS)
    c.model = dict(name="blip", **kwargs)
    images, tokens = _batches()
    losses, temps, final, final_extra, noise = _fmjax_run(c, params, extra, images, tokens)
    run = dict(losses=losses, scales=temps, final=final)
    for name, dtype in (("ref", torch.float32), ("ref64", torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        ref_losses, ref_temps = _reference_train(m, images, tokens, noise, dtype)
        ref_final, ref_extra = _final(m)
        run[name] = dict(losses=ref_losses, scales=ref_temps, final=ref_final, extra=ref_extra)
    ref = run["ref"]
    assert ref["scales"].max() == np.float32(0.5)           # the clamp bit
    assert ref["losses"][-1] < ref["losses"][0] - 0.3        # it trains
    _compare(run)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64)  # noqa: E731
                      for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    fm, r32 = flat(final_extra), flat(ref["extra"])
    assert fm.keys() == r32.keys()
    for k in fm:
        if "['key']['bias']" in k:  # the attention key biases: see _compare's NOISE_ONLY
            continue
        np.testing.assert_allclose(fm[k], r32[k], rtol=1e-4, atol=2e-5, err_msg=k)
    assert int(final_extra["queue_ptr"]) == STEPS * BATCH % QUEUE
