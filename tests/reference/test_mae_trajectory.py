"""Training-trajectory parity of fmjax's MAE step with the authors' code (issue 12, section 1).

The reference is a minimal PyTorch transcription of facebookresearch/mae at commit
efb2a8062c206524e35e47d04501ed4f544c0ae8 (the repository's HEAD, 2022-04-20):
- ``main_pretrain.py``: ``lr = blr * eff_batch_size / 256``;
  ``param_groups = optim_factory.add_weight_decay(model_without_ddp, args.weight_decay)``
  (no skip list); ``torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))``
  (eps 1e-8); ``NativeScalerWithGradNormCount`` (``util/misc.py``), called without
  ``clip_grad``, so pre-training never clips.
- ``engine_pretrain.py`` ``train_one_epoch``: the lr set per iteration by
  ``lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)``
  when ``data_iter_step % accum_iter == 0``; ``loss /= accum_iter``; the optimizer steps every
  ``accum_iter`` micro-batches.
- ``util/lr_sched.py`` ``adjust_learning_rate``: linear warm-up ``lr * epoch / warmup_epochs``,
  then a half-cycle cosine to ``min_lr``.
- ``models_mae.py`` ``MaskedAutoencoderViT``: ``random_masking``, ``forward_encoder``,
  ``forward_decoder``, ``forward_loss`` (norm_pix_loss with ``torch.var``'s unbiased variance);
  ``util/pos_embed.py`` ``get_2d_sincos_pos_embed``; the blocks are timm 0.3.2's (the version
  the repository's README pins): ``timm/models/vision_transformer.py`` ``Block`` /
  ``Attention`` (one fused ``qkv`` Linear) / ``Mlp`` / ``PatchEmbed`` (in timm032_blocks.py,
  shared with the DeiT test), and
  ``timm/optim/optim_factory.py`` ``add_weight_decay`` (no decay for
  ``len(param.shape) == 1 or name.endswith(".bias") or name in skip_list``; frozen params,
  i.e. the fixed sin-cos ``pos_embed`` / ``decoder_pos_embed``, are left out).

The only changes to the reference: ``random_masking`` takes its ``noise`` as an argument
(fmjax's draw, see below) instead of calling ``torch.rand``; float32 throughout (the
reference trains under ``torch.cuda.amp.autocast()``; its GradScaler only rescales); the
data loader is a list of fixed batches.

fmjax runs its real jitted step: ``make_objective`` on ``configs/mae.py`` (default preset,
model shrunk to width 64 / depth 2 / decoder 32x1, schedule compressed: 30 steps =
10 "epochs" of 3 steps, warm-up 2 epochs = 6 steps, blr chosen for a peak lr of 1e-3), the
config's optimizer settings unchanged (betas, weight decay 0.05, ``no_decay``, eps, min_lr,
clipping), ``make_optimizer``, ``create_state`` and ``make_train_step`` as ``loop.py`` builds
them, on a 1-device mesh. Both start from the same weights (the reference's, biases /
LayerNorms / tokens perturbed so they matter, converted by ``fmjax.interop.hf_vit`` after a
rename of the original's keys to the transformers layout). The masking noise is fmjax's own
draw: the step's key ``fold_in(state.rng, step)`` (``fold_in(., i)`` per micro-batch when
accumulating), split by ``MAEObjective.loss``, then ``make_rng('mask')`` in ``MAE.__call__``.

Tolerance: the loss at every step and the final params within rtol 1e-5, atol 1e-6 (measured:
max |diff| / (0.1 + |ref|) 3.6e-7 for the loss, 7.5e-7 for the params, which moved by up to
1.5e-2); the lr at every step within 1e-6 relative or 1e-6 of the peak (fmjax's schedule is
float32: ``1 + cos`` near the end of the cosine loses ~3e-6 relative, 4.5e-11 absolute).
One exception: the attention KEY biases. Their true gradient is exactly zero (a key bias adds
the same ``q . b_k`` to every logit of a query's row, which softmax ignores), so both sides'
gradients there are round-off, which Adam divides by its own round-off and turns into random
steps of up to lr size (measured: the two sides' key biases end 3.7e-5 apart). They are not
compared by value; instead the test checks that the reference's key biases, and those plus
N(0, 0.1^2) noise, put into fmjax's final params change neither its prediction nor its loss
(1e-6 relative): the direction is null.

Beside the trajectory: the weight-decay groups param by param (with the config's
``optimizer.no_decay``; the old default ``NO_DECAY_PATTERNS`` fails on cls_token /
mask_token), the paper presets' optimizer settings, and the initial distribution of every
param under the presets' ``objective.param_init='reference'``.
"""
import math
import os
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
sys.path.insert(0, os.path.dirname(__file__))  # --import-mode=importlib: the shared blocks
from timm032_blocks import Block, PatchEmbed  # noqa: E402  (timm 0.3.2)
from deit_reference import add_weight_decay  # noqa: E402  (timm 0.3.2 optim_factory.py)
from mae_util import adjust_learning_rate  # noqa: E402  (MAE util/lr_sched.py)

from fmjax.data import pipeline  # noqa: E402
from fmjax.interop import hf_vit  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402
from fmjax.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from fmjax.parallel.rules import get_rules  # noqa: E402
from fmjax.train import optimizer as opt_lib  # noqa: E402
from fmjax.train.state import create_state, mesh_context  # noqa: E402
from fmjax.train.step import jit_train_step, make_train_step  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
IMG, PATCH, BATCH = 32, 8, 8
WIDTH, DEPTH, HEADS = 64, 2, 4
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 32, 1, 4
MLP_RATIO = 4.0
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 3, 10, 2   # 30 optimizer steps, 6 of warm-up
PEAK_LR = 1e-3


# ----------------------------------------------------------------------------------------------
# The reference: facebookresearch/mae (models_mae.py, util/pos_embed.py) on timm 0.3.2's blocks.
# ----------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """util/pos_embed.py (np.float -> np.float64, removed from numpy since)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000 ** omega
    pos = pos.reshape(-1)
    out = np.einsum('m,d->md', pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class MaskedAutoencoderViT(nn.Module):
    """models_mae.py, with the masking noise passed in (``forward(imgs, mask_ratio, noise)``)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                  norm_layer=norm_layer)
            for i in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1],
                                            int(self.patch_embed.num_patches ** .5), cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1],
                                                    int(self.patch_embed.num_patches ** .5), cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        # noise = torch.rand(N, L, device=x.device)  <- the reference; here fmjax's draw.
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
        return loss

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# ----------------------------------------------------------------------------------------------
# The reference's training step: timm 0.3.2 add_weight_decay, util/lr_sched.py, engine_pretrain.py.
# ----------------------------------------------------------------------------------------------

def reference_train(model, data_loader, args):
    """main_pretrain.py's optimizer set-up and its epoch loop over engine_pretrain.train_one_epoch.

    ``data_loader``: per epoch, a list of (samples NCHW, noise) micro-batches. Returns the loss
    of every micro-batch and the lr of every optimizer step."""
    eff_batch_size = args.batch_size * args.accum_iter * 1  # misc.get_world_size() == 1
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    param_groups = add_weight_decay(model, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
    losses, lrs = [], []
    for epoch in range(args.epochs):
        # -- train_one_epoch
        model.train(True)
        accum_iter = args.accum_iter
        optimizer.zero_grad()
        loader = data_loader[epoch]
        for data_iter_step, (samples, noise) in enumerate(loader):
            if data_iter_step % accum_iter == 0:
                lr_sched_adjust = adjust_learning_rate(optimizer, data_iter_step / len(loader) + epoch, args)
            loss, _, _ = model(samples, mask_ratio=args.mask_ratio, noise=noise)
            loss_value = loss.item()
            assert math.isfinite(loss_value)
            loss /= accum_iter
            # loss_scaler(loss, optimizer, parameters=model.parameters(), update_grad=...): scale
            # (1 in float32), backward, and when updating: unscale, no clip_grad, step.
            loss.backward()
            if (data_iter_step + 1) % accum_iter == 0:
                optimizer.step()
                lrs.append(optimizer.param_groups[0]["lr"])
                assert lrs[-1] == lr_sched_adjust
            if (data_iter_step + 1) % accum_iter == 0:
                optimizer.zero_grad()
            losses.append(loss_value)
    return np.array(losses), np.array(lrs)


# ----------------------------------------------------------------------------------------------
# Weights: the reference's state dict -> transformers' ViTMAE key layout -> fmjax's converter.
# ----------------------------------------------------------------------------------------------

def hf_config(width=WIDTH, depth=DEPTH, heads=HEADS, dec_width=DEC_WIDTH, dec_depth=DEC_DEPTH,
              dec_heads=DEC_HEADS):
    """A transformers ViTMAEConfig (as a dict) for the converter."""
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                intermediate_size=int(width * MLP_RATIO), image_size=IMG, patch_size=PATCH,
                num_channels=3, decoder_hidden_size=dec_width, decoder_num_hidden_layers=dec_depth,
                decoder_num_attention_heads=dec_heads, decoder_intermediate_size=int(dec_width * MLP_RATIO),
                layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=True, mask_ratio=0.75)

_TOP = {"patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
        "cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
        "norm": "vit.layernorm", "decoder_embed": "decoder.decoder_embed",
        "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
        "decoder_norm": "decoder.decoder_norm", "decoder_pred": "decoder.decoder_pred"}
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def to_hf_layout(state_dict):
    """models_mae.py names -> transformers ViTMAEForPreTraining names (fused qkv split in three)."""
    out = {}
    for name, value in state_dict.items():
        value = value.detach().cpu() if hasattr(value, "detach") else torch.as_tensor(value)
        parts = name.split(".")
        if parts[0] in ("blocks", "decoder_blocks"):
            prefix = ("vit.layers." if parts[0] == "blocks" else "decoder.decoder_layers.") + parts[1]
            sub, leaf = ".".join(parts[2:-1]), parts[-1]
            if sub == "attn.qkv":
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.attention.{proj}.{leaf}"] = chunk
            else:
                out[f"{prefix}.{_BLOCK[sub]}.{leaf}"] = value
        else:
            stem, leaf = (name, None) if name in _TOP else (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1])
            out[_TOP[stem] + ("" if leaf is None else "." + leaf)] = value
    return out


def to_fmjax(state_dict, check_pos_embed=True, cfg=None):
    return hf_vit.convert_hf_vit_mae(to_hf_layout(state_dict), cfg or hf_config(),
                                     check_pos_embed=check_pos_embed)


def reference_model(seed=0, perturb=True, cfg=None):
    cfg = cfg or hf_config()
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(
        img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        decoder_embed_dim=cfg["decoder_hidden_size"], decoder_depth=cfg["decoder_num_hidden_layers"],
        decoder_num_heads=cfg["decoder_num_attention_heads"], mlp_ratio=MLP_RATIO,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), norm_pix_loss=True)
    if perturb:
        with torch.no_grad():  # biases, LayerNorms and tokens away from their init so they matter
            for name, p in model.named_parameters():
                if p.requires_grad and (name.endswith("bias") or "norm" in name or "token" in name):
                    p.add_(0.1 * torch.randn_like(p))
    return model


def reference_groups(model):
    """Per fmjax param: 1.0 where add_weight_decay puts it in the decayed group, else 0.0."""
    groups = add_weight_decay(model, 0.05)
    decayed = {id(p) for p in groups[1]["params"]}
    sd = {n: torch.full_like(p, float(id(p) in decayed)) for n, p in model.named_parameters()}
    return to_fmjax(sd, check_pos_embed=False)


# ----------------------------------------------------------------------------------------------
# fmjax: the config's objective and optimizer, the trainer's jitted step.
# ----------------------------------------------------------------------------------------------

def mae_config(default_config, accum=1):
    c = default_config("mae")
    c.model.update(dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=int(WIDTH * MLP_RATIO),
                        decoder_width=DEC_WIDTH, decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS,
                        decoder_mlp_dim=int(DEC_WIDTH * MLP_RATIO)))
    c.data.image_size = IMG
    c.batch_size = BATCH
    c.grad_accum_steps = accum
    c.total_steps = EPOCHS * STEPS_PER_EPOCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    # Only the schedule is compressed; every other optimizer setting is the config's.
    c.optimizer.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH
    assert c.optimizer.lr_scaling == "linear"
    c.optimizer.blr = PEAK_LR * 256 / BATCH
    return c


def fmjax_noise(model, key, shape):
    """The noise MAE.__call__ draws in training: MAEObjective.loss splits the step's key into
    (mask, dropout), the model draws ``uniform(make_rng('mask'), (B, L))``."""
    mask_rng, _ = jax.random.split(key)
    return model.apply({}, rngs={"mask": mask_rng},
                       method=lambda m: jax.random.uniform(m.make_rng("mask"), shape))


def run_fmjax(config, params0, batches):
    """The trainer's step over ``batches`` (numpy NHWC) from ``params0``. Returns (losses, lrs,
    final params, the noise of every micro-batch [step][micro] and fmjax's mask for it)."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {"image": jax.ShapeDtypeStruct(batches[0].shape, jnp.float32)}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    assert jax.tree.structure(jax.device_get(state.params)) == jax.tree.structure(params0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params0)):
        assert a.shape == b.shape and a.dtype == b.dtype
    state = state.replace(params=jax.device_put(params0, shardings.params))
    step_fn = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps,
                              nonfinite=config.nonfinite)
    jitted = jit_train_step(step_fn, shardings, {"image": batch_sharding(mesh)})

    # fmjax's own mask for a micro-batch, to check that the test reproduces its draw.
    model = objective.model
    accum = config.grad_accum_steps

    @jax.jit
    def draws(state_rng, step, images):
        key = jax.random.fold_in(state_rng, step)
        noises, masks = [], []
        for i in range(accum):
            k = key if accum == 1 else jax.random.fold_in(key, i)
            micro = images[i::accum]
            noises.append(fmjax_noise(model, k, (micro.shape[0], (IMG // PATCH) ** 2)))
            mask_rng, drop_rng = jax.random.split(k)
            out = model.apply({"params": params0}, micro, train=True,
                              rngs={"mask": mask_rng, "dropout": drop_rng})
            masks.append(out["mask"])
        return noises, masks

    state_rng = jax.device_get(state.rng)
    losses, lrs, noise, masks = [], [], [], []
    with mesh_context(mesh):
        for step, images in enumerate(batches):
            n, m = jax.device_get(draws(state_rng, step, images))
            noise.append(n)
            masks.append(m)
            state, metrics = jitted(state, pipeline.global_batch({"image": images}, mesh))
            metrics = jax.device_get(metrics)
            assert float(metrics["finite"]) == 1.0
            losses.append(float(metrics["loss"]))
            lrs.append(float(metrics["lr"]))
    assert int(state.step) == len(batches)
    return np.array(losses), np.array(lrs), jax.device_get(state.params), noise, masks, objective


def _batches(n):
    """``n`` pre-augmented global batches (NHWC float32), fixed seed."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((BATCH, IMG, IMG, 3)).astype(np.float32) for _ in range(n)]


def _args(config, accum):
    steps = config.total_steps
    assert steps == EPOCHS * STEPS_PER_EPOCH
    return types.SimpleNamespace(
        batch_size=BATCH // accum, accum_iter=accum, epochs=EPOCHS, warmup_epochs=WARMUP_EPOCHS,
        lr=None, blr=config.optimizer.blr, min_lr=0.0, weight_decay=0.05, mask_ratio=0.75)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _rel_err(a, b):
    return float(np.max(np.abs(a - b) / (ATOL / RTOL + np.abs(b))))


def _trajectory(default_config, accum):
    config = mae_config(default_config, accum)
    ref = reference_model()
    params0 = to_fmjax(ref.state_dict())
    batches = _batches(config.total_steps)
    losses, lrs, params, noise, masks, objective = run_fmjax(config, params0, batches)

    # The same micro-batches and noise for the reference (fmjax splits a global batch into
    # micro-batches x[i::accum]; the reference's loader yields them one after another).
    loader, i = [], 0
    for epoch in range(EPOCHS):
        epoch_batches = []
        for _ in range(STEPS_PER_EPOCH):
            for m in range(accum):
                x = torch.from_numpy(np.ascontiguousarray(batches[i][m::accum].transpose(0, 3, 1, 2)))
                epoch_batches.append((x, torch.from_numpy(np.array(noise[i][m]))))
            i += 1
        loader.append(epoch_batches)
    ref_losses, ref_lrs = reference_train(ref, loader, _args(config, accum))

    # fmjax's masks are the reference's for that noise (the draw is reproduced).
    for step in range(len(batches)):
        for m in range(accum):
            mask_ref = ref.random_masking(torch.zeros(BATCH // accum, (IMG // PATCH) ** 2, 1), 0.75,
                                          torch.from_numpy(np.array(noise[step][m])))[1]
            np.testing.assert_array_equal(np.asarray(masks[step][m]), mask_ref.numpy())
    return config, ref, params, losses, lrs, ref_losses.reshape(-1, accum).mean(axis=1), ref_lrs, objective


def _check(config, ref, params, losses, lrs, ref_losses, ref_lrs, objective):
    # fmjax's schedule is float32: 1 + cos near the end of the cosine loses ~3e-6 relative
    # (4.5e-11 absolute), hence an absolute tolerance of 1e-6 of the peak.
    np.testing.assert_allclose(lrs, ref_lrs, rtol=1e-6, atol=1e-6 * PEAK_LR, err_msg="lr per step")
    assert lrs[0] == 0.0 and lrs.max() == pytest.approx(PEAK_LR, rel=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL, err_msg="loss per step")
    ref_params = to_fmjax(ref.state_dict())   # also checks the reference's pos_embed = fmjax's table
    got, want = _flat(params), _flat(ref_params)
    assert got.keys() == want.keys()
    keys = [k for k in got if "['attn']['key']['bias']" not in k]
    assert len(keys) == len(got) - DEPTH - DEC_DEPTH
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
    # The key biases (not compared by value, see the docstring) moved by round-off only, and
    # are a null direction of the model: the reference's values, or those plus N(0, 0.1^2),
    # give fmjax's prediction and loss.
    key_bias = [k for k in got if k not in keys]
    assert max(float(np.abs(got[k] - want[k]).max()) for k in key_bias) < 0.1 * lrs.sum()
    x = jnp.asarray(_batches(1)[0])
    noise = jax.random.uniform(jax.random.PRNGKey(5), (BATCH, (IMG // PATCH) ** 2))
    a = objective.model.apply({"params": params}, x, noise=noise)
    for shift in (0.0, 0.1):
        rng = np.random.default_rng(1)
        swapped = jax.tree_util.tree_map_with_path(
            lambda p, v: (want[jax.tree_util.keystr(p)] + shift * rng.standard_normal(v.shape).astype(v.dtype)
                          if jax.tree_util.keystr(p) in key_bias else v), params)
        b = objective.model.apply({"params": swapped}, x, noise=noise)
        np.testing.assert_allclose(np.asarray(b["pred"]), np.asarray(a["pred"]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-6)
    loss_err = _rel_err(losses, ref_losses)
    param_err = max(_rel_err(got[k], want[k]) for k in keys)
    init = _flat(to_fmjax(reference_model().state_dict()))
    moved = max(float(np.abs(got[k] - init[k]).max()) for k in keys)
    print(f"max rel err (rtol {RTOL}, atol {ATOL}): loss {loss_err:.2e}, params {param_err:.2e}; "
          f"max param change {moved:.2e}; losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    return loss_err, param_err


# ----------------------------------------------------------------------------------------------

def test_decay_groups_are_the_references(default_config):
    """add_weight_decay's groups (timm 0.3.2, as main_pretrain.py calls it) = fmjax's decay mask
    with the config's ``optimizer.wd_groups='mae'``: cls_token and mask_token [1, 1, D] decay, biases
    and LayerNorms do not, the fixed sin-cos tables are no params on either side."""
    def patterns(opt):  # as make_optimizer reads them
        return opt_lib.no_decay_patterns(opt.get("no_decay"), opt.get("wd_groups", ""))

    config = mae_config(default_config)
    for preset in ("default", "vit_b16_imagenet", "vit_l16_imagenet"):
        assert patterns(default_config("mae", preset).optimizer) == patterns(config.optimizer)
    ref = reference_groups(reference_model())
    mask = opt_lib.decay_mask(ref, patterns=patterns(config.optimizer))
    flat_ref, flat_mask = _flat(ref), _flat(mask)
    for k, v in flat_ref.items():
        assert np.all(v == v.flat[0]), k
        assert bool(v.flat[0]) == bool(flat_mask[k]), (k, "reference decays" if v.flat[0] else "reference skips")
    assert flat_mask["['cls_token']"] and flat_mask["['mask_token']"]
    assert not flat_mask["['encoder']['norm']['scale']"]


def test_init_distributions_are_the_references(default_config):
    """Every param's initial distribution (models_mae.py initialize_weights on timm's blocks)
    under the paper presets' ``objective.param_init='reference'``: xavier_uniform per Linear,
    the FUSED qkv weight (3D, D) included, so q/k/v are 1/sqrt(2) narrower than fmjax's
    default per-kernel xavier; the patch embedding xavier over its (D, C*p*p) view, its bias
    torch's Conv2d default U(+-1/sqrt(C*p*p)) (initialize_weights leaves it); tokens
    N(0, 0.02^2); Linear biases 0, LayerNorms 1 / 0. Checked by bound and std over a
    width-256 model (fixed seeds)."""
    param_init = {default_config("mae", p).objective.get("param_init", "jax")
                  for p in ("vit_b16_imagenet", "vit_l16_imagenet")}
    assert param_init == {"reference"}
    dims = dict(width=256, depth=1, heads=4, dec_width=128, dec_depth=1, dec_heads=4)
    cfg = hf_config(**dims)
    ref = _flat(to_fmjax(reference_model(perturb=False, cfg=cfg).state_dict(), cfg=cfg))
    c = mae_config(default_config)
    c.model.update(dict(width=256, depth=1, num_heads=4, mlp_dim=1024, decoder_width=128,
                        decoder_depth=1, decoder_heads=4, decoder_mlp_dim=512))
    c.objective.param_init = "reference"
    objective = make_objective(c)
    params, _ = jax.jit(objective.init)(jax.random.PRNGKey(0), {"image": jnp.zeros((1, IMG, IMG, 3))})
    got = _flat(flax.core.meta.unbox(params))
    assert got.keys() == ref.keys()
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, k
        if np.all(r == r.flat[0]):  # constants: zeros and ones
            np.testing.assert_array_equal(g, r, err_msg=k)
            continue
        few = "token" in k or "patch_embed']['proj']['bias" in k  # 128-256 samples
        np.testing.assert_allclose(g.std(), r.std(), rtol=0.25 if few else 0.05, err_msg=k)
        if "token" not in k:  # uniform draws: the same bound
            np.testing.assert_allclose(np.abs(g).max(), np.abs(r).max(), rtol=0.02, err_msg=k)


def test_param_init_option_is_checked(default_config):
    c = mae_config(default_config)
    c.objective.param_init = "torch"
    with pytest.raises(ValueError, match="param_init='torch'; valid: jax, reference"):
        make_objective(c)


def test_paper_presets_optimizer_is_the_references(default_config):
    """main_pretrain.py / PRETRAIN.md: AdamW betas (0.9, 0.95), eps 1e-8, wd 0.05, lr = blr *
    batch / 256 with blr 1.5e-4 at batch 4096, 40 warm-up epochs of 800, cosine to min_lr 0,
    no clipping, norm_pix_loss, mask ratio 0.75; an epoch is 1281167 // 4096 steps (drop_last)."""
    for preset in ("vit_b16_imagenet", "vit_l16_imagenet"):
        c = default_config("mae", preset)
        o = c.optimizer
        spe = 1281167 // 4096
        assert (o.name, o.b1, o.b2, o.eps, o.weight_decay, o.min_lr) == ("adamw", 0.9, 0.95, 1e-8, 0.05, 0.0)
        assert (o.lr_scaling, o.blr, c.batch_size, o.decay) == ("linear", 1.5e-4, 4096, "cosine")
        assert o.get("warmup_mode", "linear") == "linear" and not o.get("clip_norm")
        assert o.warmup_steps == 40 * spe and c.total_steps == 800 * spe
        assert c.grad_accum_steps == 1 and c.model.mask_ratio == 0.75 and c.model.norm_pix_loss
        assert c.model.get("drop_path", 0.0) == 0.0


def test_trajectory_matches_reference(default_config):
    """30 optimizer steps (6 warm-up, then the cosine), AdamW with decay 0.05: loss and lr at
    every step, final params (key biases: see the module docstring)."""
    _check(*_trajectory(default_config, accum=1))


def test_trajectory_with_accumulation_matches_reference(default_config):
    """accum_iter=2 / grad_accum_steps=2: the reference's ``loss /= accum_iter`` and its lr set
    once per optimizer step (data_iter_step / len(data_loader) with len counting micro-batches)."""
    _check(*_trajectory(default_config, accum=2))
