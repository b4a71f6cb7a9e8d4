"""Numerical parity of fmjax ViT / MAE with timm-layout ViT, DeiT and MAE checkpoints.

timm cannot be installed here (it pulls a CUDA torch), so the reference is a minimal
PyTorch transcription, written for this test from the source read at:

- huggingface/pytorch-image-models commit aa4b5850c1543fa488abf260f18390eda46cf85d
  (timm 1.0.29.dev0): ``timm/models/vision_transformer.py`` ``VisionTransformer``
  (``__init__`` module names, ``_pos_embed`` incl. ``no_embed_class`` and ``reg_token``,
  ``forward_features``, ``global_pool_nlc``, ``forward_head`` with ``fc_norm``) and ``Block``;
  ``timm/layers/attention.py`` ``Attention`` (fused ``qkv``; the non-fused branch:
  ``q * scale @ k^T``, softmax, ``@ v``); ``timm/layers/mlp.py`` ``Mlp``;
  ``timm/layers/patch_embed.py`` ``PatchEmbed`` (conv, flatten, transpose);
  ``timm/layers/layer_scale.py`` ``LayerScale``; ``timm/models/deit.py``
  ``VisionTransformerDistilled`` (``dist_token``, ``head_dist``, logits averaged at inference).
  timm's ``LayerNorm`` is ``nn.LayerNorm`` with eps 1e-6.
- facebookresearch/mae commit efb2a8062c206524e35e47d04501ed4f544c0ae8: ``models_mae.py``
  ``MaskedAutoencoderViT`` (``random_masking`` with the noise passed in instead of drawn,
  ``forward_encoder``, ``forward_decoder``, ``forward_loss``), ``util/pos_embed.py``.
- facebookresearch/deit commit 7e160fe43f0252d17191b71cbb5826254114ea5b: ``models_v2.py``
  (DeiT III) names its layer scales ``blocks.{i}.gamma_{1,2}``.

Every weight (norms, tokens and biases included) is drawn at random, so each matters;
outputs are compared in float32 within 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from fmjax.errors import ConfigError  # noqa: E402
from fmjax.interop import timm_vit  # noqa: E402
from fmjax.models import layers  # noqa: E402
from fmjax.models.mae import MAE  # noqa: E402
from fmjax.models.vit import ViT, resize_pos_embed  # noqa: E402

ATOL = 1e-5
IMG, PATCH, WIDTH, HEADS = 32, 8, 64, 4


# ----------------------------------------------------------------------------------------------
# The reference: timm's VisionTransformer / VisionTransformerDistilled, transcribed.
# ----------------------------------------------------------------------------------------------

def LayerNorm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, init_values=None):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """timm ``VisionTransformer``; ``distilled=True`` is ``VisionTransformerDistilled``."""

    def __init__(self, img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=10,
                 global_pool="token", embed_dim=WIDTH, depth=2, num_heads=HEADS, mlp_ratio=2.,
                 qkv_bias=True, init_values=None, class_token=True, no_embed_class=False,
                 reg_tokens=0, pre_norm=False, fc_norm=None, distilled=False):
        super().__init__()
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.global_pool, self.no_embed_class = global_pool, no_embed_class
        self.distilled = distilled
        self.num_prefix_tokens = int(class_token) + reg_tokens + int(distilled)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.norm_pre = LayerNorm(embed_dim) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, x):
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.distilled:
            to_cat.append(self.dist_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = x + self.pos_embed
            return torch.cat(to_cat + [x], dim=1) if to_cat else x
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        return x + self.pos_embed

    def forward_features(self, x):
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.blocks(x))

    def forward_head(self, x, pre_logits=False):
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            return (self.head(x) + self.head_dist(x_dist)) / 2
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _randomize(model, seed=0):
    """Every param random normal (fan-in scaled for matrices), so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
                std = p[0].numel() ** -0.5
            else:
                std = 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.add_(1.0)  # keep the residual stream's scale sane over depth
    return model.eval()


def _images(n=2, size=IMG, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    diff = float(np.abs(got - want).max())
    print(f"{what}: max|diff| {diff:.2e} (max|ref| {float(np.abs(want).max()):.2f})")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=what)


def _run(ref, images, **convert_kw):
    sd = ref.state_dict()
    params = timm_vit.convert_timm_vit(sd, HEADS, **convert_kw)
    fm = ViT(**timm_vit.vit_kwargs_from_timm(sd, HEADS))
    return fm, params, fm.apply({"params": params}, _nhwc(images))


# ----------------------------------------------------------------------------------------------
# timm_vit
# ----------------------------------------------------------------------------------------------

def test_token_pool_parity():
    ref = _randomize(VisionTransformer(global_pool="token"))
    images = _images()
    fm, params, out = _run(ref, images)
    assert fm.pool == "cls" and not fm.fc_norm and fm.num_classes == 10 and fm.mlp_dim == 128
    with torch.no_grad():
        feats = ref.forward_features(images)
        pooled = ref.forward_head(feats, pre_logits=True)
        logits = ref(images)
    _close(out["tokens"], feats.numpy(), "tokens")
    _close(out["pre_logits"], pooled.numpy(), "pre_logits")
    _close(out["logits"], logits.numpy(), "logits")


def test_avg_pool_fc_norm_parity():
    """MAE's fine-tuned models (models_vit.py, global_pool) and timm global_pool='avg'."""
    ref = _randomize(VisionTransformer(global_pool="avg"), seed=2)
    assert "fc_norm.weight" in ref.state_dict() and "norm.weight" not in ref.state_dict()
    images = _images()
    fm, params, out = _run(ref, images)
    assert fm.pool == "mean" and fm.fc_norm and "norm" not in params["encoder"]
    with torch.no_grad():
        feats = ref.forward_features(images)
        pooled = ref.forward_head(feats, pre_logits=True)
        logits = ref(images)
    _close(out["tokens"], feats.numpy(), "tokens (no final norm)")
    _close(out["pre_logits"], pooled.numpy(), "pre_logits")
    _close(out["logits"], logits.numpy(), "logits")


@pytest.mark.parametrize("kw", [
    dict(no_embed_class=True, init_values=0.1, qkv_bias=False),          # DeiT III style
    dict(reg_tokens=2),                                                 # registers in pos_embed
    dict(class_token=False, reg_tokens=1, no_embed_class=True, global_pool="avg", fc_norm=False),
    dict(pre_norm=True, num_classes=0),                                 # CLIP-style, no patch bias
], ids=["deit3", "reg_embed_class", "reg_gap", "pre_norm"])
def test_layout_variants_parity(kw):
    ref = _randomize(VisionTransformer(**kw), seed=3)
    images = _images()
    fm, params, out = _run(ref, images)
    with torch.no_grad():
        feats = ref.forward_features(images)
        want = ref(images)
    n_prefix = ref.num_prefix_tokens
    got = np.asarray(out["tokens"])
    _close(got[:, fm.num_prefix_tokens:], feats[:, n_prefix:].numpy(), "patch tokens")
    _close(got, feats.numpy(), "all tokens")  # same prefix order: [cls, reg..., patches]
    _close(out["logits"] if "logits" in out else out["pre_logits"], want.numpy(), "output")


def test_deit3_gamma_names():
    """facebookresearch/deit models_v2.py stores layer scales as gamma_1 / gamma_2."""
    ref = _randomize(VisionTransformer(no_embed_class=True, init_values=0.1), seed=4)
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
          for k, v in ref.state_dict().items()}
    assert "blocks.0.gamma_1" in sd
    images = _images()
    out = ViT(**timm_vit.vit_kwargs_from_timm(sd, HEADS)).apply(
        {"params": timm_vit.convert_timm_vit(sd, HEADS)}, _nhwc(images))
    with torch.no_grad():
        _close(out["logits"], ref(images).numpy(), "logits")


def test_deit_distilled():
    ref = _randomize(VisionTransformer(distilled=True), seed=5)
    sd = ref.state_dict()
    images = _images()
    with pytest.raises(ValueError, match="head_dist='drop'"):
        timm_vit.convert_timm_vit(sd, HEADS)
    fm, params, out = _run(ref, images, head_dist="keep")
    assert fm.num_registers == 1 and fm.num_prefix_tokens == 2
    with torch.no_grad():
        feats = ref.forward_features(images)
        pooled = ref.forward_head(feats, pre_logits=True)
        logits = ref(images)
    _close(out["tokens"], feats.numpy(), "tokens")
    tokens = np.asarray(out["tokens"])  # DeiT's pre_logits average the cls and dist tokens
    _close((tokens[:, 0] + tokens[:, 1]) / 2, pooled.numpy(), "DeiT pre_logits")
    dist = params["head_dist"]
    dist_logits = np.asarray(out["tokens"])[:, 1] @ dist["kernel"] + dist["bias"]
    _close((np.asarray(out["logits"]) + dist_logits) / 2, logits.numpy(), "averaged logits")
    dropped = timm_vit.convert_timm_vit(sd, HEADS, head_dist="drop")
    assert "head_dist" not in dropped and set(dropped) == set(params) - {"head_dist"}
    # head_dist='distill': DeiT's own layout in ViT(distill_token=True), both heads inside.
    kw = timm_vit.vit_kwargs_from_timm(sd, HEADS, distill_token=True)
    assert kw["distill_token"] and kw["num_registers"] == 0
    deit = timm_vit.convert_timm_vit(sd, HEADS, head_dist="distill")
    np.testing.assert_array_equal(deit["pos_embed"], sd["pos_embed"].numpy())
    out = ViT(**kw).apply({"params": deit}, _nhwc(images))
    _close(out["tokens"], feats.numpy(), "tokens (distill_token)")
    _close(out["logits"], logits.numpy(), "DeiT logits (distill_token)")
    _close(out["dist_logits"], ref.head_dist(feats[:, 1]).detach().numpy(), "dist head")
    params_mi = timm_vit.convert_for_model_init(sd, "timm_vit", dict(name="vit", distill_token=True,
                                                                     num_heads=HEADS))
    assert set(params_mi) == set(deit) and "dist_token" in params_mi
    assert "reg_tokens" in timm_vit.convert_for_model_init(sd, "timm_vit", dict(name="vit", num_heads=HEADS))
    with pytest.raises(ValueError, match="needs a DeiT distilled state dict"):
        timm_vit.convert_timm_vit(_randomize(VisionTransformer(), seed=7).state_dict(), HEADS,
                                  head_dist="distill")


def test_wrapped_checkpoint_and_ddp_prefix():
    ref = _randomize(VisionTransformer(), seed=6)
    sd = ref.state_dict()
    want = timm_vit.convert_timm_vit(sd, HEADS)
    for wrapped in ({"model": sd, "epoch": 3}, {"state_dict": sd},
                    {"model": {f"module.{k}": v for k, v in sd.items()}}):
        got = timm_vit.convert_timm_vit(wrapped, HEADS)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert timm_vit.vit_kwargs_from_timm({"model": sd}, HEADS)["num_classes"] == 10


def test_missing_and_unexpected_keys_one_line():
    sd = dict(_randomize(VisionTransformer(), seed=7).state_dict())
    sd.pop("blocks.1.mlp.fc2.weight")
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(KeyError) as e:
        timm_vit.convert_timm_vit(sd, HEADS)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys [blocks.1.mlp.fc2.weight]" in msg, msg
    assert "unexpected keys [blocks.0.attn.q_norm.weight]" in msg, msg


def test_mae_checkpoint_refused_by_timm_vit():
    ref = _randomize(MaskedAutoencoderViT(), seed=8)
    with pytest.raises(KeyError) as e:
        timm_vit.convert_timm_vit(ref.state_dict(), HEADS)
    msg = str(e.value)
    assert "\n" not in msg and "decoder_blocks.*.attn.qkv.weight (x2)" in msg, msg
    assert "convert_timm_mae" in msg and "mask_token" in msg


def test_default_heads_and_errors():
    sd = {"patch_embed.proj.weight": np.zeros((768, 3, 16, 16), np.float32)}
    assert timm_vit.vit_kwargs_from_timm(sd)["num_heads"] == 12
    sd = {"patch_embed.proj.weight": np.zeros((1280, 3, 14, 14), np.float32)}
    assert timm_vit.vit_kwargs_from_timm(sd)["num_heads"] == 16  # ViT-H: head_dim 80
    sd = {"patch_embed.proj.weight": np.zeros((96, 3, 16, 16), np.float32)}
    with pytest.raises(ValueError, match="pass num_heads="):
        timm_vit.vit_kwargs_from_timm(sd)
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        timm_vit.convert_timm_vit(sd, num_heads=5)


# ----------------------------------------------------------------------------------------------
# timm_mae: facebookresearch/mae models_mae.py, transcribed.
# ----------------------------------------------------------------------------------------------

class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=WIDTH, depth=2,
                 num_heads=HEADS, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=16,
                 mlp_ratio=4., norm_pix_loss=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        grid = int(num_patches ** .5)
        with torch.no_grad():  # fixed sin-cos tables (fmjax's equals util/pos_embed.py's)
            self.pos_embed.copy_(torch.from_numpy(
                layers.get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True)).float()[None])
            dec = layers.get_2d_sincos_pos_embed(decoder_embed_dim, grid, cls_token=True)
            self.decoder_pos_embed.copy_(torch.from_numpy(dec).float()[None])

    def patchify(self, imgs):
        p = self.patch_size
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio, noise):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _mae_ref(seed=9):
    ref = MaskedAutoencoderViT()
    fixed = {"pos_embed": ref.pos_embed.detach().clone(),
             "decoder_pos_embed": ref.decoder_pos_embed.detach().clone()}
    ref = _randomize(ref, seed)
    with torch.no_grad():  # the fixed tables stay the sin-cos ones
        ref.pos_embed.copy_(fixed["pos_embed"])
        ref.decoder_pos_embed.copy_(fixed["decoder_pos_embed"])
    return ref


def test_mae_pretrain_parity():
    ref = _mae_ref()
    sd = ref.state_dict()
    kw = timm_vit.mae_kwargs_from_timm(sd, HEADS)
    assert kw["decoder_heads"] == 16 and kw["decoder_width"] == 32 and kw["decoder_depth"] == 2
    params = timm_vit.convert_timm_mae({"model": sd}, HEADS)
    fm = MAE(**kw, mask_ratio=0.75, norm_pix_loss=True)
    g = torch.Generator().manual_seed(10)
    images, noise = _images(3), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        loss, pred, mask = ref(images, 0.75, noise)
    out = fm.apply({"params": params}, _nhwc(images), noise=jnp.asarray(noise.numpy()))
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask.numpy())
    _close(out["pred"], pred.numpy(), "mae pred")
    _close(out["loss"], loss.numpy(), "mae loss")


def test_mae_encoder_only_and_pos_check():
    ref = _mae_ref()
    sd = {k: v for k, v in ref.state_dict().items()
          if not (k.startswith("decoder_") or k == "mask_token")}  # mae_pretrain_vit_*.pth
    params = timm_vit.convert_timm_mae(sd, HEADS)
    assert set(params) == {"patch_embed", "cls_token", "encoder"}
    images = _images()
    with torch.no_grad():
        x = ref.patch_embed(images) + ref.pos_embed[:, 1:]
        x = torch.cat([(ref.cls_token + ref.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
        for blk in ref.blocks:
            x = blk(x)
        want = ref.norm(x)
    vit = ViT(**dict(timm_vit.vit_kwargs_from_timm(sd, HEADS), pos_embed="sincos"))
    out = vit.apply({"params": params}, _nhwc(images))
    _close(out["tokens"], want.numpy(), "MAE encoder in ViT(pos_embed='sincos')")
    bad = dict(ref.state_dict(), pos_embed=torch.randn_like(ref.pos_embed))
    with pytest.raises(ValueError, match="sin-cos"):
        timm_vit.convert_timm_mae(bad, HEADS)


# ----------------------------------------------------------------------------------------------
# config.model_init with a .pth file (format timm_vit / timm_mae).
# ----------------------------------------------------------------------------------------------

def _create(config):
    from fmjax.train import model_init as mi_lib
    from fmjax.train import optimizer as opt_lib
    from fmjax.train import restore
    from fmjax.train import setup as setup_lib
    from fmjax.train import state as state_lib
    objective, mesh, rules = setup_lib.build(config, jax.devices()[:1])
    spec = restore.train_batch_spec(config, objective)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    _, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    lines = []
    state, _ = state_lib.create_state(
        objective, tx, spec, mesh, rules, config.seed, shardings,
        load_params=lambda p, sh: mi_lib.apply(config, p, sh, log=lines.append)[0])
    return jax.tree.map(np.asarray, state.params), "\n".join(lines)


def test_model_init_pth_with_pos_embed_resize(tiny_config, tmp_path):
    # A DeiT-style checkpoint for 16x16 images (2x2 grid) into the tiny supervised ViT on
    # 32x32 (4x4 grid): pos_embed resized, the 10-class head re-initialised for 8 classes.
    ref = _randomize(VisionTransformer(img_size=16, embed_dim=32, num_heads=2, mlp_ratio=2.,
                                       global_pool="avg"), seed=11)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"model": ref.state_dict(), "epoch": 299}, path)
    c = tiny_config("supervised")
    c.model.update(dict(stem="patch", pool="mean", fc_norm=True, mlp_dim=64))
    c.model_init.torch = path
    c.model_init.format = "timm_vit"
    c.model_init.dont_load = ("head/.*",)
    from fmjax.train import loop
    loop.check_config(c, str(tmp_path / "run"))  # no config.json needed
    got, text = _create(c)
    want = timm_vit.convert_timm_vit(ref.state_dict(), 2)
    np.testing.assert_array_equal(got["encoder"]["block_1"]["attn"]["value"]["kernel"],
                                  want["encoder"]["block_1"]["attn"]["value"]["kernel"])
    np.testing.assert_array_equal(got["fc_norm"]["scale"], want["fc_norm"]["scale"])
    np.testing.assert_array_equal(got["patch_embed"]["proj"]["kernel"],
                                  want["patch_embed"]["proj"]["kernel"])
    np.testing.assert_allclose(got["pos_embed"], np.asarray(resize_pos_embed(
        want["pos_embed"], (2, 2), (4, 4), 1)), rtol=1e-6, atol=1e-6)
    print(text)
    assert "timm_vit checkpoint" in text and "1 pos-embed resized" in text, text
    assert "2 checkpoint arrays unused" in text, text  # the 10-class head

    c.model_init.format = "timm_mae"
    with pytest.raises(ConfigError,
                       match=r"is not a timm_mae checkpoint: .*unexpected keys.*fc_norm"):
        _create(c)


def test_model_init_timm_mae(tiny_config, tmp_path):
    ref = MaskedAutoencoderViT(embed_dim=32, num_heads=2, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": ref.state_dict()}, path)
    c = tiny_config("mae")  # width 32, 2 heads; decoder 32 x 1, 2 heads; mlp 64 (ratio 2)
    c.model.update(dict(mlp_dim=128, decoder_mlp_dim=128))
    c.model_init.torch = path
    c.model_init.format = "timm_mae"
    got, text = _create(c)
    want = timm_vit.convert_timm_mae(ref.state_dict(), num_heads=2, decoder_heads=2)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path_, leaf in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_array_equal(leaf, flat_want[path_], err_msg=jax.tree_util.keystr(path_))
    assert "0 missing" in text and "0 checkpoint arrays unused" in text, text
