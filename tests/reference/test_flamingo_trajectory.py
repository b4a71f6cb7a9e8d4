"""Training-trajectory parity of Flamingo with open_flamingo's training step.

fmjax's real jitted train step (``configs/flamingo.py`` -> ``make_objective``,
``make_optimizer``, ``make_train_step``, ``create_state``; a 1-device mesh) beside a PyTorch
transcription of open_flamingo's (tests/reference/open_flamingo_train.py, commit
655f693fbfa04cd6e9a987d960654624d48917cf), from the same weights (a random transformers
GPT-2 as the frozen LM, through ``fmjax.interop.hf_gpt2``; the reference's perceiver and gated
layers through ``fmjax.interop.open_flamingo``, format ``open_flamingo``), for 30 steps of 2
interleaved sequences of 5 generated VQA examples each (``vqa_pairs`` on the shapes scenes;
fmjax draws each step's questions and answer styles, and the reference gets the same token
rows), float32:

* trainable: the perceiver and the gated layers; the LM and the vision tower frozen (the
  vision tower is frozen in both, so the reference gets fmjax's tower's tokens of the images);
* loss: the LM's cross-entropy with pad and ``<image>`` labels ignored (train_utils.py);
* ``clip_grad_norm_(1.0)`` over the trainable params, AdamW (lr 2e-3, wd 0.1) with weight
  decay on the gated layers only, every param of them (norms and gates too:
  ``optimizer.decay_all`` with ``wd_mult`` 0 on the resampler), cosine with 5 warm-up steps
  (``get_cosine_schedule_with_warmup``; fmjax's linear warm-up and cosine are the same numbers).

Compared: the loss at every step and the final params (as the CLIP test's ``_compare``).
The gates start at 0, as in open_flamingo; they open during the 30 steps.
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
transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import open_flamingo_train as oft  # noqa: E402
from test_clip_trajectory import _compare  # noqa: E402
from fmjax.data import shapes  # noqa: E402
from fmjax.data.text_ops import vqa_pairs  # noqa: E402
from fmjax.interop import hf_gpt2  # noqa: E402
from fmjax.interop.formats import convert  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402
from fmjax.parallel import mesh as mesh_lib  # noqa: E402
from fmjax.parallel import rules as rules_lib  # noqa: E402
from fmjax.train import optimizer as opt_lib  # noqa: E402
from fmjax.train import state as state_lib  # noqa: E402
from fmjax.train import step as step_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
STEPS, BATCH, K, SEQ, IMAGE = 30, 10, 5, 80, 16
LR, WD, WARMUP = 2e-3, 0.1, 5
VISION = dict(name="vit", width=24, depth=1, num_heads=2, mlp_dim=48, patch_size=8,
              class_token=True, pool="cls", num_classes=0)
XATTN = dict(xattn_heads=2, xattn_dim_head=8, xattn_ff_mult=2.0, resampler_depth=2,
             resampler_heads=2, resampler_dim_head=8, num_latents=3)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=2048, n_positions=SEQ,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    return cfg, transformers.GPT2LMHeadModel(cfg)


def _config(lm_kwargs):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    c = importlib.import_module("configs.flamingo").get_config("default")
    c.dtype = "float32"
    c.total_steps, c.batch_size = STEPS, BATCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.objective.update(shots_per_sequence=K, seq_length=SEQ)
    c.model.update(dict(vision=VISION, lm=lm_kwargs, cross_every=1, **XATTN))
    c.optimizer.update(lr=LR, weight_decay=WD, warmup_steps=WARMUP, b1=0.9, b2=0.999, eps=1e-8,
                       clip_norm=1.0, decay_all=True, wd_mult=(("resampler/.*", 0.0),))
    c.model_init = {}
    return c


def _batches():
    op = vqa_pairs(16, "words", 2048)
    out = []
    for s in range(STEPS):
        exs = [op(shapes.generate_example(s * BATCH + i, "train", IMAGE), None) for i in range(BATCH)]
        b = {k: np.stack([e[k] for e in exs]) for k in ("qa_tokens", "qa_len", "qa_prompt_len")}
        b["image"] = np.stack([e["image"] for e in exs]).astype(np.float32) / 127.5 - 1.0
        out.append(b)
    return out


def _fmjax_run(c, params, batches):
    """fmjax's jitted step: per-step losses, the final params, each step's token rows and
    valid masks (the objective's draw from ``split(fold_in(rng, step))[0]``) and the vision
    tokens of each step's images."""
    objective = make_objective(c)
    objective.check(c)
    tx, schedule = opt_lib.make_optimizer(c.optimizer, c.total_steps, c.batch_size)
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    rules = rules_lib.get_rules(c.sharding)
    spec = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32 if k == "image" else jnp.int32)
            for k, v in batches[0].items()}
    state, shardings = state_lib.create_state(objective, tx, spec, mesh, rules, c.seed)
    params = dict(params, vision=jax.device_get(state.params["vision"]))
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    params = jax.device_put(params, shardings.params)
    state = state.replace(params=params, opt_state=jax.device_put(tx.init(params), shardings.opt_state))
    step_fn = step_lib.make_train_step(objective, tx, schedule, rules)
    batch_sh = mesh_lib.batch_sharding(mesh)
    jitted = step_lib.jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sh, spec))
    rows, vis = [], []
    for s, b in enumerate(batches):
        jb = {k: jnp.asarray(v) for k, v in b.items()}
        seq = objective.sequences(jax.random.split(jax.random.fold_in(state.rng, s))[0], jb)
        rows.append((np.asarray(seq["tokens"]), np.asarray(seq["valid"])))
        vis.append(np.asarray(objective.model.apply(
            {"params": state.params}, objective._images(jb), method="vision_tokens")))
    losses = []
    with state_lib.mesh_context(mesh):
        for b in batches:
            state, metrics = jitted(state, {k: jnp.asarray(v) for k, v in b.items()})
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), rows, vis


def _reference_train(model, rows, vis, dtype):
    model.train()
    opt, sched = oft.optimizer_and_schedule(model, LR, WD, WARMUP, STEPS)
    losses = []
    for (tokens, valid), v in zip(rows, vis):
        ids = torch.as_tensor(tokens, dtype=torch.long)
        losses.append(oft.train_step(model, opt, sched, torch.as_tensor(v).to(dtype), ids,
                                     torch.as_tensor(valid).long(),
                                     oft.labels_of(ids, pad_token_id=0, media_token_id=0)))
    return np.array(losses)


def _fm_params(model, lm_params):
    sd = {k: v.float() for k, v in model.state_dict().items()}
    conv = convert("open_flamingo", sd)
    return dict(resampler=conv["resampler"], lm=dict(lm_params, **conv["lm"]))


def test_flamingo_matches_open_flamingo_training():
    cfg, lm = _gpt2()
    lm_params = hf_gpt2.convert_hf_gpt2(lm.state_dict(), cfg)
    lm_kwargs = hf_gpt2.decoder_kwargs_from_hf_config(cfg)
    model = oft.Flamingo(lm, dim_visual=VISION["width"], media_token_id=0, heads=2, dim_head=8,
                         ff_mult=2, perceiver_depth=2, perceiver_heads=2, perceiver_dim_head=8,
                         num_latents=3)
    start = _fm_params(model, lm_params)
    c = _config(lm_kwargs)
    batches = _batches()
    losses, final, rows, vis = _fmjax_run(c, jax.tree.map(jnp.asarray, start), batches)
    final = {k: v for k, v in final.items() if k != "vision"}
    run = dict(losses=losses, scales=np.zeros(STEPS), final=final)
    for name, dtype in (("ref", torch.float32), ("ref64", torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        ref_losses = _reference_train(m, rows, vis, dtype)
        run[name] = dict(losses=ref_losses, scales=np.zeros(STEPS), final=_fm_params(m, lm_params))
    ref = run["ref"]
    print("\nfmjax", np.round(losses, 4), "\nref  ", np.round(ref["losses"], 4))
    assert ref["losses"][-1] < ref["losses"][0] - 0.1                # it trains
    gates = [float(np.abs(final["lm"][f"gated_{i}"]["attn_gate"]).max()) for i in range(2)]
    assert min(gates) > 1e-2, gates                                  # the gates opened
    assert all(rows[s][1].sum() > 2 * K for s in range(STEPS))
    _compare(run)
