"""BEiT (Bao et al., 2022): BERT pre-training of image transformers - predict the discrete
visual tokens of the masked patches.

microsoft/unilm ``beit/`` (commit 768a3c873f598bb9b4d4dfb9267b099e35f8fe56):
``modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling`` (the masked patch
embeddings replaced by a learned ``mask_token``; BEiT's ViT with layer scale and a shared
relative position bias, ``fmjax.models.relpos``; ``lm_head`` Linear(D, vocab) on the masked
positions) and ``engine_for_pretraining.py`` (``input_ids = d_vae.get_codebook_indices(images)``,
``labels = input_ids[bool_masked_pos]``, ``CrossEntropyLoss(lm_head(x[masked]), labels)``: the
mean over every masked patch of the batch; ``mlm_acc``).

The mask is drawn per example by the ``beit_mask`` pp op (``MaskingGenerator``: blockwise,
75 of 196 patches in the paper) and arrives as ``batch['mask']`` [B, h, w]. The targets come
from a frozen discrete-VAE tokenizer (``objective.tokenizer``: an fmjax ``dvae`` workdir,
OpenAI's published dVAE through ``fmjax/interop``, or a random one; see
``fmjax.models.dvae.load_tokenizer``), kept in the objective state (``extra['tokenizer']``:
sharded, checkpointed, never updated) and run inside the step on ``batch['tokenizer_image']``
([B, S, S, C] in [0, 1], the same crop at the tokenizer's resolution, BEiT's "second
view") or, when the pipeline gives none, on ``batch['image']`` un-normalised and resized to
the tokenizer's input size (``objective.tokenizer_resize``). The tokenizer's grid must equal
the backbone's patch grid. ``objective.tokenizer=dict(precomputed=True)``: no tokenizer in the
step; the pipeline gives ``batch['visual_tokens']`` [B, h, w] (tokens made offline).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.errors import ConfigError
from fmjax.evals import images as image_lib
from fmjax.models import inject, layers
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective

RESIZE = ("lanczos3", "linear", "cubic", "nearest")


def masked_token_loss(logits, labels, mask):
    """BEiT's loss and accuracy: cross-entropy of ``logits`` [B, N, V] against ``labels`` [B, N]
    averaged over the masked positions (``mask`` [B, N], 1 = masked) of the whole batch."""
    m = mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    n = jnp.maximum(m.sum(), 1.0)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(ce * m) / n, jnp.sum(acc * m) / n


class BEiTObjective(Objective):
    batch_keys = ("image", "mask")

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("tokens", "pooled"), "objective 'beit'", config.model.name)
        self.patch_size = int(getattr(self.backbone, "patch_size", 0) or 0)
        self.width = int(getattr(self.backbone, "width", 0) or 0)
        self.num_prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.norm = config.data.get("normalization", "imagenet")
        self.resize = o.get("tokenizer_resize", "lanczos3")
        self.image_size = int(config.data.get("image_size", 224))
        # The tokenizer's input size (BEiT's second_input_size: 112 px for 224 px / patch 16 with
        # DALL-E's 8x dVAE); default the image size.
        self.tokenizer_size = int(o.get("tokenizer_image_size", None) or self.image_size)
        self.tokenizer_spec = o.get("tokenizer", None)
        self._tokenizer = None
        self.vocab_size = int(o.get("vocab_size", 8192))
        spec = dict(self.tokenizer_spec or {})
        self.precomputed = bool(spec.get("precomputed", False))
        if self.precomputed:  # visual tokens made offline, in the batch
            self.batch_keys = ("image", "mask", "visual_tokens")
        elif "tokenizer_image" in str(config.data.get("pp_train", "")):
            self.batch_keys = ("image", "mask", "tokenizer_image")
        self.lm_head = nn.Dense(self.vocab_size, dtype=self.backbone.dtype,
                                kernel_init=layers.part(nn.initializers.truncated_normal(0.02), ("embed", "classes")),
                                bias_init=layers.part(nn.initializers.zeros, ("classes",)))

    # -- the tokenizer ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """(module, params) of the frozen dVAE, loaded on first use."""
        if self._tokenizer is None:
            from fmjax.models import dvae
            self._tokenizer = dvae.load_objective_tokenizer(self.tokenizer_spec, self.tokenizer_size)
        return self._tokenizer

    def check(self, config):
        if not self.patch_size or not self.width:
            raise ConfigError(f"objective 'beit' needs a patch backbone with patch_size and width; "
                              f"config.model.name={config.model.name!r} has none.")
        if self.resize not in RESIZE:
            raise ConfigError(f"config.objective.tokenizer_resize={self.resize!r}; valid: {RESIZE}.")
        if self.precomputed:
            return
        spec = dict(self.tokenizer_spec or {})
        if not any(spec.get(k) for k in ("workdir", "torch", "init")):
            raise ConfigError("config.objective.tokenizer names no dVAE: train a dVAE tokenizer first "
                              "(python launch/train.py --config=configs/dvae.py:cpu --workdir=DIR) and pass "
                              "--config.objective.tokenizer.workdir=DIR, or give OpenAI's encoder "
                              "(tokenizer.torch=FILE) or a random one (tokenizer.init='random').")
        module, _ = self.tokenizer
        grid = self.image_size // self.patch_size
        if self.tokenizer_size // module.downsample != grid:
            raise ConfigError(f"the tokenizer reads {self.tokenizer_size} px images into "
                              f"{self.tokenizer_size // module.downsample}x{self.tokenizer_size // module.downsample} "
                              f"codes but the backbone's patch grid is {grid}x{grid}: set "
                              f"config.objective.tokenizer_image_size={grid * module.downsample}.")
        vocab = int(getattr(module, "vocab_size", 0))
        if vocab != self.vocab_size:
            raise ConfigError(f"config.objective.vocab_size={self.vocab_size} but the tokenizer has {vocab} codes; "
                              "set them equal.")

    def tokens(self, extra, batch):
        """[B, N] int32 visual tokens of the batch's images (BEiT's ``input_ids``)."""
        if "visual_tokens" in batch:  # objective.tokenizer.precomputed: made offline
            ids = batch["visual_tokens"]
            return ids.reshape(ids.shape[0], -1).astype(jnp.int32)
        module, _ = self.tokenizer
        if "tokenizer_image" in batch:
            x = batch["tokenizer_image"].astype(jnp.float32)
        else:
            mean, std = NORMALIZE_PRESETS[self.norm]
            x = batch["image"].astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
            s = self.tokenizer_size
            if x.shape[1:3] != (s, s):
                x = jax.image.resize(x, (x.shape[0], s, s, x.shape[-1]), method=self.resize)
            x = jnp.clip(x, 0.0, 1.0)
        ids = module.apply({"params": extra["tokenizer"]}, x, method=type(module).tokens)
        return jax.lax.stop_gradient(ids.reshape(ids.shape[0], -1).astype(jnp.int32))

    # -- model ------------------------------------------------------------------------------
    def logits(self, params, images, mask, train=False, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        with inject.mask_token_hook(mask, params["mask_token"]):
            x = self.backbone.apply({"params": params["backbone"]}, images, train=train,
                                    rngs=rngs)["tokens"][:, self.num_prefix:]
        return self.lm_head.apply({"params": params["lm_head"]}, x)

    def init(self, rng, batch):
        b_rng, t_rng, h_rng = jax.random.split(rng, 3)
        images = batch["image"]
        backbone = self.backbone.init({"params": b_rng}, images)["params"]
        head = self.lm_head.init({"params": h_rng}, jnp.zeros((1, 1, self.width), self.backbone.dtype))["params"]
        params = {"backbone": backbone, "mask_token": inject.init_mask_token(t_rng, self.width), "lm_head": head}
        if self.precomputed:
            return params, {}
        _, tok_params = self.tokenizer
        return params, {"tokenizer": tok_params}

    def loss(self, params, extra, batch, rng, step):
        images, mask = batch["image"], batch["mask"]
        labels = self.tokens(extra, batch)
        logits = self.logits(params, images, mask, train=True, rng=rng)
        m = mask.reshape(mask.shape[0], -1)
        loss, acc = masked_token_loss(logits, labels, m)
        return loss, ({"mlm_acc": acc, "mask_ratio": m.astype(jnp.float32).mean()}, extra)

    def features(self, params, extra, images):
        return self.backbone.apply({"params": params["backbone"]}, images)["pre_logits"]

    def visualize(self, params, extra, batch, rng):
        """Rows: the image, the masked input (grey), and the masked patches coloured by
        whether the model's most likely token is the tokenizer's (green) or not (red)."""
        images = batch["image"]
        b, h, w = images.shape[0], images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        if "mask" in batch:
            mask = batch["mask"]
        else:  # validation images: a BEiT-like block mask from the rng (a random quarter-square)
            from fmjax.data.mask_ops import beit_mask
            op = beit_mask((h, w), max(1, int(0.4 * h * w)), min_num_patches=max(1, (h * w) // 12))
            r = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel()[-1])
            mask = jnp.asarray(np.stack([op.draw(r) for _ in range(b)]))
        m = np.asarray(mask).astype(bool)
        mean, std = NORMALIZE_PRESETS[self.norm]
        img = image_lib.denormalize(np.asarray(images), mean, std)
        up = lambda a: np.repeat(np.repeat(a, self.patch_size, 1), self.patch_size, 2)[..., None]
        masked = np.where(up(m), 0.5, img)
        n = min(8, b)
        if self.precomputed and "visual_tokens" not in batch:  # no tokenizer to score against
            return {"masked_tokens": image_lib.image_grid([img[:n], masked[:n]])}
        labels = self.tokens(extra, {**batch, "mask": mask})
        right = np.asarray(jnp.argmax(self.logits(params, images, mask), -1) == labels).reshape(b, h, w)
        colour = np.where(up(right), np.asarray([0.1, 0.8, 0.1]), np.asarray([0.9, 0.1, 0.1]))
        verdict = np.where(up(m), 0.5 * img + 0.5 * colour, img)
        return {"masked_tokens": image_lib.image_grid([img[:n], masked[:n], verdict[:n]])}


def make(config) -> BEiTObjective:
    return BEiTObjective(config)
