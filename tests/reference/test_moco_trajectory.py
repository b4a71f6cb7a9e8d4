"""MoCo v3: fmjax's jitted training step against the original training code, step by step.

Reference: facebookresearch/moco-v3 at commit c349e6e24f40d3fedb22d973f92defa4cedf37a7,
transcribed below in PyTorch (distributed and AMP parts dropped; world size 1, float32):
  - main_moco.py: ``train`` (per iteration: ``adjust_learning_rate(optimizer, epoch + i /
    iters_per_epoch, args)`` - linear warm-up then half-cycle cosine to 0 -, ``moco_m =
    adjust_moco_momentum(epoch + i / iters_per_epoch, args)`` with ``--moco-m-cos``, ``loss =
    model(images[0], images[1], moco_m)``, ``zero_grad``, ``backward``, ``step``),
    ``args.lr = args.lr * args.batch_size / 256``, ``torch.optim.AdamW(model.parameters(), lr,
    weight_decay=wd)`` (one group: every param decays; params without grad - the momentum
    encoder, the fixed pos_embed and, with ``--stop-grad-conv1``, the patch projection - are
    skipped);
  - moco/builder.py: ``MoCo`` (momentum encoder copied from the base encoder, ``forward``:
    queries through base encoder + predictor per view, then under no_grad
    ``_update_momentum_encoder(m)`` BEFORE the keys are computed with it,
    ``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)``, ``contrastive_loss``: normalise,
    ``concat_all_gather`` (identity here), ``CrossEntropyLoss()(q k^T / T, arange) * 2T``),
    ``MoCo_ViT`` (the ViT's head replaced by ``_build_mlp(3, hidden, mlp_dim, dim)``,
    predictor ``_build_mlp(2, dim, mlp_dim, dim)`` WITH its last BN: last_bn defaults to True
    there; only MoCo_ResNet passes False), ``_build_mlp`` (Linear(bias=False) -> BatchNorm1d ->
    ReLU, last Linear(bias=False) -> BatchNorm1d(affine=False));
  - vits.py: ``VisionTransformerMoCo`` (``build_2d_sincos_position_embedding``, its xavier
    init with q, k, v apart, cls_token N(0, 1e-6), ``stop_grad_conv1``) on timm 0.4.9's
    ``VisionTransformer`` (blocks from tests/reference/timm032_blocks.py: 0.4.9's Block and
    Attention compute the same; class token after the final norm as the feature).

Protocol: a tiny ViT (width 48, depth 2, 3 heads, patch 8, 32px views, 16 patches), projector
(3 layers, hidden 32, dim 16) and predictor (2 layers) are built with the reference's init,
perturbed (biases, LayerNorm and BatchNorm affine params, cls_token) so every param matters,
and converted to fmjax params through ``fmjax/interop/timm_vit.py`` (the fused qkv split) plus
the head mapping in ``to_fmjax``; the fixed ``pos_embed`` is not a param in fmjax, and is
asserted equal to ``ViT(pos_embed='sincos_moco')``'s table. Both sides train 27 steps (9
"epochs" of 3 iterations) on the same pre-augmented pairs of views (B=8, random normal),
float32. The compressed schedule crosses the lr warm-up (2 epochs = 6 steps, peak 1e-3)
and runs the momentum cosine 0.9 -> 1 with T = 0.2 and weight decay 0.1. fmjax runs the
real jitted step (``make_train_step`` / ``make_optimizer`` / ``create_state``, as
``fmjax/train/loop.py`` builds them) on ``configs/moco.py``'s default preset shrunk to the
sizes above; its reference options (``model.pos_embed='sincos_moco'``, ``pool='cls'``,
``optimizer.frozen=('backbone/patch_embed/.*',)``, ``decay_all=True``, ``min_lr=0``, linear
warm-up) are NOT overridden here, so the test checks the preset.

Adam's eps is 1e-6 on both sides (the reference's default is 1e-8). Some params have a zero
gradient in exact arithmetic: the attention key biases and the base encoder's final LayerNorm
bias (the projector's first Linear has no bias, and the BatchNorm after it removes a constant
shift of its input). Their float gradients are rounding noise (~1e-7), which Adam with eps 1e-8
scales to full lr-size steps that differ between any two float32 implementations: torch float32
against torch float64, same code, already drifts to 2e-4 in the loss by step 27 here. With eps
1e-6 the losses of torch float32 and float64 agree to 4e-6 at every step.

Asserted: the lr and momentum schedules and the loss at every step, and the final base encoder,
projector, predictor and momentum encoder within rtol=1e-5 with atol=1e-6 (for near-zero
values), except the invariant params above: their |error| <= 0.1 x the summed lr, and swapping
the reference's values into fmjax's state changes fmjax's loss by < 1e-6 relative (so they do
not matter); the frozen patch projection is bit-identical to its initial value. Measured
(torch 2.13 CPU, jax 0.10.2): max |err| / (atol/rtol + |ref|) = 3.6e-6 for the losses, 1.7e-6
over the params, 7.2e-7 over the momentum encoder; invariant params 0.033 x the summed lr.

``test_old_behaviour_is_detected`` (slow) reverts one option at a time and checks that it
breaks the tolerance (invariant params left out); measured worst relative errors:
pos_embed='sincos' (MAE's table) 2.9e-1; the patch projection trained 8.6e-2; fmjax's decay
groups instead of decay_all 6.5e-3; a constant momentum 1.1e-1; no 2T scale 1.4; the predictor
without its last BN (MoCo_ResNet's) 2.1e-1; mean pooling 3.5e-1; the momentum update after the
optimizer step (DINO's placement) 1.1e-2; the heads' BatchNorm over both views at once 1.8e-1.

Mismatches found against the brief: MoCo_ViT's predictor keeps its last BatchNorm (only
MoCo_ResNet drops it), so ``objective.predictor_last_bn='plain'`` by default; MoCo v3's sin-cos
table is MAE's with the row and column halves swapped (``model.pos_embed='sincos_moco'``).
"""
import functools
import importlib
import math
import os
import re
import sys
from functools import reduce
from operator import mul

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from fmjax.data import pipeline  # noqa: E402
from fmjax.interop.timm_vit import convert_timm_vit  # noqa: E402
from fmjax.models.layers import get_2d_sincos_pos_embed  # noqa: E402
from fmjax.objectives import moco as moco_lib  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402
from fmjax.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from fmjax.parallel.rules import get_rules  # noqa: E402
from fmjax.train import optimizer as opt_lib  # noqa: E402
from fmjax.train.state import create_state, mesh_context  # noqa: E402
from fmjax.train.step import jit_train_step, make_train_step  # noqa: E402
from fmjax.testing import one_torch_thread  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timm032_blocks import Block  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL, ATOL = 1e-5, 1e-6

# The run: sizes and (compressed) hyper-parameters, in the reference's units.
B, IMG, PATCH = 8, 32, 8
WIDTH, DEPTH, HEADS = 48, 2, 3
DIM, MLP_DIM = 16, 32
EPOCHS, NITER = 9, 3                      # 27 optimizer steps
HP = dict(lr=0.032, weight_decay=0.1, warmup_epochs=2, moco_m=0.9, moco_t=0.2, eps=1e-6)


# ==== The reference, transcribed (facebookresearch/moco-v3 @ c349e6e) =======================

class PatchEmbed(nn.Module):                        # timm 0.4.9 layers/patch_embed.py
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):                 # timm 0.4.9 (dropouts 0, no distillation)
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, 4.0, qkv_bias=True,
                                            norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.norm(x)[:, 0]                   # pre_logits: Identity

    def forward(self, x):
        return self.head(self.forward_features(x))


class VisionTransformerMoCo(VisionTransformer):     # vits.py
    def __init__(self, stop_grad_conv1=False, **kwargs):
        super().__init__(**kwargs)
        self.build_2d_sincos_position_embedding()
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if 'qkv' in name:
                    val = math.sqrt(6. / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        val = math.sqrt(6. / float(3 * reduce(mul, self.patch_embed.patch_size, 1) + self.embed_dim))
        nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad = False
            self.patch_embed.proj.bias.requires_grad = False

    def build_2d_sincos_position_embedding(self, temperature=10000.):
        h, w = self.patch_embed.grid_size
        grid_w = torch.arange(w, dtype=torch.float32)
        grid_h = torch.arange(h, dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")  # the reference's default
        assert self.embed_dim % 4 == 0
        pos_dim = self.embed_dim // 4
        omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
        omega = 1. / (temperature**omega)
        out_w = torch.einsum('m,d->md', [grid_w.flatten(), omega])
        out_h = torch.einsum('m,d->md', [grid_h.flatten(), omega])
        pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
        assert self.num_tokens == 1
        pe_token = torch.zeros([1, 1, self.embed_dim], dtype=torch.float32)
        self.pos_embed = nn.Parameter(torch.cat([pe_token, pos_emb], dim=1))
        self.pos_embed.requires_grad = False


class MoCo(nn.Module):                              # moco/builder.py
    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self._build_projector_and_predictor_mlps(dim, mlp_dim)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    def _build_mlp(self, num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        mlp = []
        for l in range(num_layers):
            dim1 = input_dim if l == 0 else mlp_dim
            dim2 = output_dim if l == num_layers - 1 else mlp_dim
            mlp.append(nn.Linear(dim1, dim2, bias=False))
            if l < num_layers - 1:
                mlp.append(nn.BatchNorm1d(dim2))
                mlp.append(nn.ReLU(inplace=True))
            elif last_bn:
                mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    @torch.no_grad()
    def _update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1. - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum('nc,mc->nm', [q, k]) / self.T   # concat_all_gather: world size 1
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long)            # + N * rank, rank 0
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class MoCo_ViT(MoCo):                               # moco/builder.py
    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        hidden_dim = self.base_encoder.head.weight.shape[1]
        del self.base_encoder.head, self.momentum_encoder.head
        self.base_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim)


def adjust_learning_rate(optimizer, epoch, args):   # main_moco.py
    if epoch < args["warmup_epochs"]:
        lr = args["lr"] * epoch / args["warmup_epochs"]
    else:
        lr = args["lr"] * 0.5 * (1. + math.cos(math.pi * (epoch - args["warmup_epochs"])
                                               / (args["epochs"] - args["warmup_epochs"])))
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr
    return lr


def adjust_moco_momentum(epoch, args):              # main_moco.py
    return 1. - 0.5 * (1. + math.cos(math.pi * epoch / args["epochs"])) * (1. - args["moco_m"])


def reference_model(seed=0):
    """main_moco.py's model (vit_* with --stop-grad-conv1), its base encoder and predictor
    perturbed, then the momentum encoder copied again (as MoCo.__init__ does)."""
    torch.manual_seed(seed)
    vit = functools.partial(VisionTransformerMoCo, stop_grad_conv1=True, img_size=IMG,
                            patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    model = MoCo_ViT(vit, DIM, MLP_DIM, HP["moco_t"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.base_encoder.named_parameters()) + [
                ("predictor." + n, p) for n, p in model.predictor.named_parameters()]:
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("pos_embed"):
                continue                               # fixed
            if name.endswith(".bias"):
                p.add_(0.05 * noise)
            elif name.endswith(".weight") and p.ndim == 1:   # LayerNorm and BatchNorm scales
                p.add_(0.2 * noise)
            elif name.endswith("cls_token"):
                p.add_(0.2 * noise)
        for param_b, param_m in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
    return model


def run_reference(model, batches, steps=EPOCHS * NITER):
    """main_moco.py's train loop over EPOCHS epochs of NITER iterations (world size 1)."""
    args = dict(lr=HP["lr"] * B / 256, warmup_epochs=HP["warmup_epochs"], epochs=EPOCHS,
                moco_m=HP["moco_m"])
    optimizer = torch.optim.AdamW(model.parameters(), args["lr"], weight_decay=HP["weight_decay"],
                                  eps=HP["eps"])
    model.train()
    losses, lrs, ms = [], [], []
    for epoch in range(EPOCHS):
        for i in range(NITER):
            if epoch * NITER + i >= steps:
                break
            lr = adjust_learning_rate(optimizer, epoch + i / NITER, args)
            moco_m = adjust_moco_momentum(epoch + i / NITER, args)
            x = torch.from_numpy(np.ascontiguousarray(np.transpose(batches[epoch * NITER + i]["global_crops"],
                                                                   (1, 0, 4, 2, 3))))
            loss = model(x[0], x[1], moco_m)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            lrs.append(lr)
            ms.append(moco_m)
    return np.asarray(losses), np.asarray(lrs), np.asarray(ms)


# ==== Weights: reference state dict -> fmjax params (through fmjax/interop/timm_vit.py) ======

def _mlp(sd, prefix, num_layers, last_bn_params=False):
    """``_build_mlp`` Sequential -> MLPHead params (fc_i kernel, bn_i_scale, bn_i_bias)."""
    out, idx = {}, 0
    for i in range(num_layers):
        out[f"fc_{i}"] = {"kernel": sd[f"{prefix}.{idx}.weight"].T}
        if i < num_layers - 1:
            out[f"bn_{i}_scale"] = sd[f"{prefix}.{idx + 1}.weight"]
            out[f"bn_{i}_bias"] = sd[f"{prefix}.{idx + 1}.bias"]
            idx += 3
    return out


def _encoder(sd, prefix):
    vit = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    backbone = convert_timm_vit(vit, num_heads=HEADS)
    pos = backbone.pop("pos_embed")                    # fixed: not a param of ViT(pos_embed='sincos_moco')
    want = get_2d_sincos_pos_embed(WIDTH, IMG // PATCH, cls_token=True, layout="moco_v3")
    np.testing.assert_allclose(pos[0], want, rtol=0, atol=1e-6)   # the table fmjax computes
    return {"backbone": backbone, "projector": _mlp(sd, prefix + "head", 3)}


def to_fmjax(state_dict):
    """(params, momentum encoder) of the reference model's state dict."""
    sd = {k: v.detach().numpy().copy() for k, v in state_dict.items() if "running_" not in k
          and "num_batches_tracked" not in k}
    params = dict(_encoder(sd, "base_encoder."), predictor=_mlp(sd, "predictor", 2))
    f32 = lambda t: jax.tree.map(lambda x: np.array(x, np.float32), t)
    return f32(params), f32(_encoder(sd, "momentum_encoder."))


# ==== fmjax: the real jitted step from configs/moco.py ===================================

def moco_config(**overrides):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    c = importlib.import_module("configs.moco").get_config("default")
    c.seed, c.total_steps, c.batch_size = 0, EPOCHS * NITER, B
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.data.image_size = IMG
    c.model.update(dict(variant=f"S/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                        mlp_dim=4 * WIDTH, drop_path=0.0))
    c.objective.update(dict(dim=DIM, mlp_dim=MLP_DIM, temperature=HP["moco_t"], momentum=HP["moco_m"]))
    c.optimizer.update(dict(lr_scaling="linear", blr=HP["lr"], weight_decay=HP["weight_decay"], eps=HP["eps"],
                            warmup_steps=HP["warmup_epochs"] * NITER))
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def run_fmjax(config, init_params, init_momentum, batches, objective=None):
    """(losses, final state) of fmjax's jitted step from the converted weights."""
    objective = objective or make_objective(config)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    put = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
    params = jax.tree.map(put, init_params, state.params)
    momentum = jax.tree.map(put, init_momentum, state.extra["momentum"])
    state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                          extra=dict(state.extra, momentum=momentum))
    step = jit_train_step(make_train_step(objective, tx, schedule, rules), shardings,
                          jax.tree.map(lambda _: batch_sharding(mesh), spec))
    losses, lrs, ms = [], [], []
    with mesh_context(mesh):
        for batch in batches:
            state, metrics = step(state, pipeline.global_batch(batch, mesh))
            losses.append(metrics["loss"])
            lrs.append(metrics["lr"])
            ms.append(metrics["momentum"])
    return (np.asarray(jax.device_get(losses)), jax.device_get(state),
            np.asarray(jax.device_get(lrs)), np.asarray(jax.device_get(ms)))


def make_batches(seed=0):
    rng = np.random.default_rng(seed)
    return [{"global_crops": rng.normal(size=(B, 2, IMG, IMG, 3)).astype(np.float32)}
            for _ in range(EPOCHS * NITER)]


def relative_error(got, want):
    """max |got - want| / (atol / rtol + |want|): <= rtol passes assert_allclose(rtol, atol)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / (ATOL / RTOL + np.abs(want))))


# Params the loss does not depend on in exact arithmetic: the attention key biases (softmax over
# the keys is invariant to q . b_k) and the base encoder's final LayerNorm bias (the projector's
# first Linear has no bias and its BatchNorm removes the batch mean: a constant shift of its input
# cancels). Their gradients are float rounding noise (~1e-7 here, torch float32 against float64
# too), which Adam scales up to steps of up to ~lr: their values are compared loosely
# (INVARIANT_ATOL_LR x the summed lr) and ``test_moco_trajectory_matches_reference`` checks that
# swapping in the reference's values leaves fmjax's loss unchanged.
INVARIANT = re.compile(r".*(attn/key/bias|encoder/norm/bias)$")
INVARIANT_ATOL_LR = 0.1


def compare(ref, state, losses):
    """{what: max relative error} of the losses and every param of both encoders (the
    invariant ones apart: ``invariant/...``, max |error| / summed lr)."""
    from flax import traverse_util
    errs = {"loss": relative_error(losses, ref["losses"])}
    for what, got, want in (("params", state.params, ref["params"]),
                            ("momentum", state.extra["momentum"], ref["momentum"])):
        flat_got, flat_want = traverse_util.flatten_dict(got, sep="/"), traverse_util.flatten_dict(want, sep="/")
        assert flat_got.keys() == flat_want.keys(), set(flat_got) ^ set(flat_want)
        for k in flat_want:
            if INVARIANT.fullmatch(k):
                errs[f"invariant/{what}/{k}"] = float(np.abs(flat_got[k] - flat_want[k]).max() / ref["lrs"].sum())
            else:
                errs[f"{what}/{k}"] = relative_error(flat_got[k], flat_want[k])
    return errs


def _with_invariant_from(params, source):
    from flax import traverse_util
    flat, src = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(source, sep="/")
    return traverse_util.unflatten_dict({k: (src[k] if INVARIANT.fullmatch(k) else v) for k, v in flat.items()},
                                        sep="/")


@functools.lru_cache(maxsize=None)
def reference_run():
    """The reference trajectory (and the shared initial weights and batches), run once."""
    with one_torch_thread():
        model = reference_model()
        init_params, init_momentum = to_fmjax(model.state_dict())
        batches = make_batches()
        losses, lrs, ms = run_reference(model, batches)
    params, momentum = to_fmjax(model.state_dict())
    return dict(init_params=init_params, init_momentum=init_momentum, batches=batches,
                losses=losses, lrs=lrs, ms=ms, params=params, momentum=momentum)


def test_moco_trajectory_matches_reference():
    ref = reference_run()
    # The run exercises what it is meant to: the warm-up crossed, params and momentum encoder moving.
    assert ref["lrs"][0] == 0 and ref["lrs"].argmax() == HP["warmup_epochs"] * NITER
    moved = lambda tree, init: np.median([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(
        jax.tree.leaves(tree), jax.tree.leaves(init))])
    assert moved(ref["params"], ref["init_params"]) > 0.02, moved(ref["params"], ref["init_params"])
    assert moved(ref["momentum"], ref["init_momentum"]) > 0.002
    config = moco_config()
    losses, state, lrs, ms = run_fmjax(config, ref["init_params"], ref["init_momentum"], ref["batches"])
    np.testing.assert_allclose(lrs, ref["lrs"], rtol=1e-5, atol=1e-12)  # float32 cosine
    np.testing.assert_allclose(ms, ref["ms"], rtol=1e-6)
    np.testing.assert_allclose(losses, ref["losses"], rtol=RTOL, atol=ATOL)
    errs = compare(ref, state, losses)
    bad = {k: v for k, v in errs.items() if v > (INVARIANT_ATOL_LR if k.startswith("invariant/") else RTOL)}
    assert not bad, bad
    # The frozen random patch projection: bit-identical in the params (no step, no decay).
    np.testing.assert_array_equal(state.params["backbone"]["patch_embed"]["proj"]["kernel"],
                                  ref["init_params"]["backbone"]["patch_embed"]["proj"]["kernel"])
    # The invariant params do not matter: the reference's values give fmjax's loss, to rounding.
    objective = make_objective(config)
    batch = {"global_crops": jnp.asarray(ref["batches"][-1]["global_crops"])}
    loss_of = jax.jit(lambda p, e: objective.loss(p, e, batch, jax.random.PRNGKey(0), 5)[0])
    extra = dict(state.extra)
    swapped = loss_of(_with_invariant_from(state.params, ref["params"]),
                      dict(extra, momentum=_with_invariant_from(extra["momentum"], ref["momentum"])))
    np.testing.assert_allclose(swapped, loss_of(state.params, extra), rtol=1e-6)
    print("max relative errors: loss", f"{errs['loss']:.1e}",
          "params", f"{max(v for k, v in errs.items() if k.startswith('params/')):.1e}",
          "momentum", f"{max(v for k, v in errs.items() if k.startswith('momentum/')):.1e}",
          "invariant (x summed lr)", f"{max(v for k, v in errs.items() if k.startswith('invariant/')):.1e}")


class MomentumAfterStep(moco_lib.MoCoObjective):
    """fmjax's usual EMA placement (DINO's after_update): keys from the momentum encoder as it
    was, the update after the optimizer step with the NEW params."""

    def momentum_at(self, step):
        return jnp.float32(1.0), jnp.float32(0.0)

    def after_update(self, params, extra, step):
        m, one_minus = super().momentum_at(step)
        return dict(extra, momentum=moco_lib.momentum_update(extra["momentum"], self._encoders(params),
                                                             m, one_minus))


class BatchNormOverBothViews(moco_lib.MoCoObjective):
    """The heads' BatchNorm over both views at once (one [1, 2B, D] group, as SimCLR)."""

    def _project(self, projector, feats):
        b, n = feats.shape[:2]
        z = self.projector.apply({"params": projector}, jnp.swapaxes(feats, 0, 1).reshape(1, n * b, -1))
        return z.reshape(n, b, -1)

    def _query(self, params, feats):
        z = self._project(params["projector"], feats)
        n, b = z.shape[:2]
        return self.predictor.apply({"params": params["predictor"]}, z.reshape(1, n * b, -1)).reshape(n, b, -1)


# Each reference behaviour reverted one at a time (config overrides, or an objective class).
OLD_BEHAVIOURS = {
    "pos_embed='sincos' (MAE's table, halves swapped)": ({"model.pos_embed": "sincos"}, None),
    "patch projection trained (no --stop-grad-conv1)": ({"optimizer.frozen": ()}, None),
    "decay groups (fmjax's no_decay default, not decay_all)": ({"optimizer.decay_all": False}, None),
    "constant momentum (no --moco-m-cos)": ({"objective.momentum_cos": False}, None),
    "no 2T loss scale": ({"objective.scale_2t": False}, None),
    "predictor without its last BN (MoCo_ResNet's)": ({"objective.predictor_last_bn": "none"}, None),
    "mean pooling instead of the class token": ({"model.pool": "mean"}, None),
    "momentum update after the optimizer step": ({}, MomentumAfterStep),
    "BatchNorm over both views together": ({}, BatchNormOverBothViews),
}


@pytest.mark.slow
@pytest.mark.parametrize("old", list(OLD_BEHAVIOURS))
def test_old_behaviour_is_detected(old):
    """Each reverted option breaks the tolerance of the test above (by >= 10x somewhere)."""
    ref = reference_run()
    overrides, cls = OLD_BEHAVIOURS[old]
    config = moco_config(**overrides)
    objective = cls(config) if cls is not None else None
    losses, state, _, _ = run_fmjax(config, ref["init_params"], ref["init_momentum"], ref["batches"], objective)
    worst = max(v for k, v in compare(ref, state, losses).items() if not k.startswith("invariant/"))
    print(f"{old}: max relative error {worst:.1e}")
    assert worst > 10 * RTOL, f"{old}: max relative error {worst:.1e} stays within tolerance"
