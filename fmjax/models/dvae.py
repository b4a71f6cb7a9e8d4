"""DALL-E's discrete VAE (Ramesh et al. 2021): the visual tokenizer of BEiT and DALL-E.

The architecture of openai/DALL-E's ``dall_e`` package (``encoder.py``, ``decoder.py``,
``utils.py`` at commit 5be4b236bc3ade6943662354117a0e83752cc322), transcribed module for
module so that its ``state_dict`` maps name for name (``fmjax/interop/dall_e.py``):

- ``Conv2d``: params ``w`` [kw, kw, n_in, n_out] (torch: [n_out, n_in, kw, kw]) drawn from
  N(0, 1 / (n_in * kw^2)) and ``b`` zeros, 'same' padding ``(kw - 1) // 2``.
- Encoder: ``input`` (7x7 conv to ``n_hid``), ``group_1 .. group_G``, each of
  ``n_blk_per_group`` residual blocks of width ``2^(g-1) n_hid`` followed by a 2x2 max-pool
  (but the last group), then ``output`` (ReLU, 1x1 conv to ``vocab_size`` logits).
  A block is ``id_path(x) + post_gain * res_path(x)``: ``id_path`` a 1x1 conv where the width
  changes (else the identity), ``res_path`` ReLU-conv x 4 through a bottleneck of width
  ``n_out / 4`` with kernels (3, 3, 3, 1), and ``post_gain = 1 / n_layers^2``,
  ``n_layers = G * n_blk_per_group``.
- Decoder: ``input`` (1x1 conv from the ``vocab_size`` code distribution to ``n_init``), groups
  of width ``2^(G-g) n_hid`` with kernels (1, 3, 3, 3) and a 2x nearest-neighbour upsampling
  after each group but the last, then ``output`` (ReLU, 1x1 conv to ``2 C`` channels: the
  logit-Laplace ``mu`` then ``ln b``; ``C`` with ``output='mse'``: the image itself).
- Images are mapped by ``map_pixels`` (``(1 - 2 eps) x + eps``, eps 0.1) before the encoder;
  a logit-Laplace reconstruction is ``unmap_pixels(sigmoid(mu))``.

OpenAI's published dVAE is ``group_count=4`` (256 px -> 32x32 tokens, downsample 8),
``n_hid=256``, ``n_blk_per_group=2``, ``vocab_size=8192``, ``n_init=128`` (variant ``openai``);
``group_count=3`` downsamples 4x (a 32 px CPU model gets 8x8 tokens). As in ``dall_e``, the
encoder's last conv and the decoder's first conv compute in float32 whatever ``dtype`` is.

Tokenizer contract (``CAPABILITIES['tokenizer']``; what BEiT's objective relies on)::

    module, params = load_tokenizer(spec, image_size)
    codes = module.apply({'params': params}, images01, method=DVAE.tokens)

- ``images01``: float [B, image_size, image_size, C] RGB in **[0, 1]** (no mean/std
  normalisation: ``tokens`` applies ``map_pixels`` itself), resized to the size the tokenizer
  reads, a multiple of ``module.downsample`` (BEiT with OpenAI's tokenizer: 112 px for a
  224 px / patch-16 ViT, so that the 14x14 codes match its patch grid).
- ``codes``: int32 [B, image_size / downsample, image_size / downsample] in
  ``[0, module.vocab_size)``: the argmax of the encoder logits (as ``dall_e``'s usage and
  BEiT's ``get_codebook_indices``).
- ``params`` hold at least ``encoder`` (a ``torch`` encoder-only file has no ``decoder``;
  ``decode`` then fails, ``tokens`` / ``encode`` work).

``spec`` (a dict or ConfigDict) names exactly one source:

- ``workdir=DIR`` [``step=N``; default the latest]: an fmjax run of the ``dvae`` objective;
  the model is rebuilt from ``DIR/config.json`` (``model``) and its params read from
  ``DIR/checkpoints/<step>/state`` (the EMA params ``extra/ema`` when the run kept them,
  ``ema=False`` for the raw params);
- ``torch=FILE``: a PyTorch ``state_dict`` of ``dall_e``'s ``Encoder`` (``.pt`` / ``.pth`` /
  ``.bin`` read with ``weights_only=True``, or ``.safetensors``), the architecture read off
  the shapes (``fmjax.interop.dall_e``). OpenAI's ``encoder.pkl`` pickles the whole module:
  save its ``state_dict()`` first (``torch.save(torch.load('encoder.pkl').state_dict(),
  'encoder.pt')`` where ``dall_e`` is installed);
- ``init='random'`` [``seed=0``, ``model=dict(...)`` DVAE fields, default the ``openai``
  variant]: a randomly initialised tokenizer (tests, ablations).

This module reads checkpoints with Orbax directly, not through ``fmjax.train`` (models import
no training code: docs/design.md's one-way imports).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers

LOGIT_LAPLACE_EPS = 0.1
OUTPUTS = ("logit_laplace", "mse")
CONV_AXES = (None, None, "conv_in", "conv_out")
ENCODER_KERNELS = (3, 3, 3, 1)   # res_path conv_1 .. conv_4 (dall_e EncoderBlock)
DECODER_KERNELS = (1, 3, 3, 3)   # dall_e DecoderBlock

DVAE_VARIANTS = {
    # OpenAI's published dVAE (dall_e.Encoder / Decoder defaults).
    "openai": dict(group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=8192, n_init=128),
}


def dvae_kwargs(variant: Optional[str], **overrides) -> dict:
    if variant is not None and variant not in DVAE_VARIANTS:
        raise ValueError(f"Unknown dvae variant {variant!r}; valid: {sorted(DVAE_VARIANTS)}.")
    kwargs = dict(DVAE_VARIANTS[variant]) if variant else {}
    kwargs.update(overrides)
    return kwargs


def map_pixels(x, eps: float = LOGIT_LAPLACE_EPS):
    """dall_e.utils.map_pixels: [0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x, eps: float = LOGIT_LAPLACE_EPS):
    """dall_e.utils.unmap_pixels: the inverse of ``map_pixels``, clipped to [0, 1]."""
    return jnp.clip((x - eps) / (1 - 2 * eps), 0, 1)


def dall_e_normal(key, shape, dtype=jnp.float32):
    """dall_e Conv2d's init: N(0, 1 / (n_in * kw^2)) for a [kw, kw, n_in, n_out] kernel."""
    kw, _, n_in, _ = shape
    return jax.random.normal(key, shape, dtype) / math.sqrt(n_in * kw * kw)


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: ``w`` [kw, kw, n_in, n_out] and ``b`` [n_out], 'same' padding."""
    n_out: int
    kw: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("w", layers.part(dall_e_normal, CONV_AXES), (self.kw, self.kw, x.shape[-1], self.n_out))
        b = self.param("b", layers.part(nn.initializers.zeros, ("conv_out",)), (self.n_out,))
        pad = (self.kw - 1) // 2
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (1, 1),
                                         ((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b.astype(self.dtype)


class ResPath(nn.Module):
    """ReLU-conv x 4 (``conv_1`` .. ``conv_4``) through a bottleneck of ``n_hid``."""
    n_hid: int
    n_out: int
    kernels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        widths = (self.n_hid, self.n_hid, self.n_hid, self.n_out)
        for i, (width, kw) in enumerate(zip(widths, self.kernels)):
            x = Conv2d(width, kw, self.dtype, name=f"conv_{i + 1}")(nn.relu(x))
        return x


class Block(nn.Module):
    """dall_e EncoderBlock / DecoderBlock: ``id_path(x) + post_gain * res_path(x)``."""
    n_out: int
    n_layers: int
    kernels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ident = Conv2d(self.n_out, 1, self.dtype, name="id_path")(x) if x.shape[-1] != self.n_out else x
        res = ResPath(self.n_out // 4, self.n_out, tuple(self.kernels), self.dtype, name="res_path")(x)
        return ident + (1 / self.n_layers ** 2) * res


class Group(nn.Module):
    """``block_1 .. block_n`` then a 2x2 max-pool (``resample='pool'``), a 2x nearest
    upsampling (``'upsample'``) or nothing."""
    n_out: int
    n_blk: int
    n_layers: int
    kernels: Sequence[int]
    resample: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.n_blk):
            x = Block(self.n_out, self.n_layers, tuple(self.kernels), self.dtype, name=f"block_{i + 1}")(x)
        if self.resample == "pool":   # torch MaxPool2d(kernel_size=2): stride 2, no padding
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        elif self.resample == "upsample":   # torch Upsample(scale_factor=2, mode='nearest')
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x


class Output(nn.Module):
    """``output``: ReLU then the 1x1 ``conv``."""
    n_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv2d(self.n_out, 1, self.dtype, name="conv")(nn.relu(x))


class Encoder(nn.Module):
    """dall_e.Encoder on NHWC (mapped) pixels -> [B, H / 2^(G-1), W / 2^(G-1), vocab] logits."""
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        g_count, n_layers = self.group_count, self.group_count * self.n_blk_per_group
        x = Conv2d(self.n_hid, 7, self.dtype, name="input")(x)
        for g in range(1, g_count + 1):
            x = Group(2 ** (g - 1) * self.n_hid, self.n_blk_per_group, n_layers, ENCODER_KERNELS,
                      "pool" if g < g_count else "", self.dtype, name=f"group_{g}")(x)
        return Output(self.vocab_size, jnp.float32, name="output")(x)   # use_float16=False


class Decoder(nn.Module):
    """dall_e.Decoder: [B, h, w, vocab] code distribution -> [B, h 2^(G-1), w 2^(G-1), out]."""
    group_count: int = 4
    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    out_channels: int = 6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        g_count, n_layers = self.group_count, self.group_count * self.n_blk_per_group
        x = Conv2d(self.n_init, 1, jnp.float32, name="input")(z)   # use_float16=False
        for g in range(1, g_count + 1):
            x = Group(2 ** (g_count - g) * self.n_hid, self.n_blk_per_group, n_layers, DECODER_KERNELS,
                      "upsample" if g < g_count else "", self.dtype, name=f"group_{g}")(x)
        return Output(self.out_channels, self.dtype, name="output")(x)


class DVAE(nn.Module):
    """The dVAE: ``encode(images01) -> logits``, ``decode(z) -> stats``, ``tokens(images01)``.

    ``output``: 'logit_laplace' (the decoder's ``2 C`` channels are ``mu`` and ``ln b`` of a
    logit-Laplace over the mapped pixels, DALL-E's) or 'mse' (``C`` channels: the image in
    [0, 1], for a squared-error loss). See the module docstring for the tokenizer contract.
    """
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    n_init: int = 128
    channels: int = 3
    output: str = "logit_laplace"
    dtype: Any = jnp.float32

    # The backbone contract (fmjax.models.registry.CAPABILITIES); no annotation: not a field.
    capabilities = frozenset({"tokenizer"})

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def out_channels(self) -> int:
        return 2 * self.channels if self.output == "logit_laplace" else self.channels

    def setup(self):
        problem = config_problem(self)
        if problem:
            raise ValueError(problem)
        self.encoder = Encoder(self.group_count, self.n_hid, self.n_blk_per_group, self.vocab_size, self.dtype)
        self.decoder = Decoder(self.group_count, self.n_init, self.n_hid, self.n_blk_per_group,
                               self.out_channels, self.dtype)

    def _check_images(self, images):
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(f"dvae: images must be [B, H, W, {self.channels}] in [0, 1]; got {images.shape}.")
        if images.shape[1] % self.downsample or images.shape[2] % self.downsample:
            raise ValueError(f"dvae: image size {images.shape[1]}x{images.shape[2]} is not a multiple of the "
                             f"downsampling {self.downsample} (group_count={self.group_count}).")

    def encode(self, images):
        """[B, H, W, C] images in [0, 1] -> float32 logits [B, H/d, W/d, vocab_size]."""
        self._check_images(images)
        return self.encoder(map_pixels(images.astype(jnp.float32)))

    def decode(self, z):
        """[B, h, w, vocab_size] code distribution (soft, or one-hot) -> [B, h d, w d, out_channels]."""
        return self.decoder(z)

    def tokens(self, images):
        """[B, H, W, C] images in [0, 1] -> int32 codes [B, H/d, W/d] (argmax of the logits)."""
        return jnp.argmax(self.encode(images), axis=-1).astype(jnp.int32)

    def decode_tokens(self, codes):
        """int codes [B, h, w] -> the decoder's output for the one-hot codes."""
        return self.decoder(jax.nn.one_hot(codes, self.vocab_size, dtype=jnp.float32))

    def __call__(self, images):
        """encode -> softmax -> decode (initialises both halves)."""
        return self.decode(jax.nn.softmax(self.encode(images), axis=-1))


def config_problem(m) -> str:
    """Why a DVAE's fields cannot work (one line), or ''."""
    if m.output not in OUTPUTS:
        return f"config.model.output={m.output!r}; valid: {list(OUTPUTS)}."
    if m.group_count < 1 or m.n_blk_per_group < 1:
        return (f"config.model.group_count={m.group_count} and n_blk_per_group={m.n_blk_per_group} "
                "must be >= 1.")
    if m.n_hid < 4 or m.n_hid % 4:
        return f"config.model.n_hid={m.n_hid} must be a positive multiple of 4 (blocks narrow to width / 4)."
    if m.vocab_size < 2 or m.n_init < 1 or m.channels < 1:
        return (f"config.model.vocab_size={m.vocab_size}, n_init={m.n_init}, channels={m.channels}: need "
                "vocab_size >= 2 and n_init, channels >= 1.")
    return ""


def reconstruction(stats, output: str = "logit_laplace"):
    """The decoder output -> the reconstructed image in [0, 1]: ``unmap_pixels(sigmoid(mu))``
    for logit-Laplace (dall_e's usage notebook), the clipped output for 'mse'."""
    stats = stats.astype(jnp.float32)
    if output == "logit_laplace":
        return unmap_pixels(jax.nn.sigmoid(stats[..., :stats.shape[-1] // 2]))
    return jnp.clip(stats, 0.0, 1.0)


# -- Loading a tokenizer. ------------------------------------------------------------------------
SPEC_KEYS = ("workdir", "step", "ema", "torch", "init", "seed", "model")


def _spec_get(spec, key, default=None):
    v = spec.get(key, default) if hasattr(spec, "get") else default
    return default if v is None else v


def _plain(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value) if isinstance(value, Mapping) else value


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _from_workdir(workdir: str, step, use_ema) -> tuple[dict, dict, str]:
    import numpy as np
    import orbax.checkpoint as ocp
    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer workdir={workdir}: no config.json; name a directory written by "
                         "launch/train.py with the dvae objective.")
    with open(path) as f:
        config = json.load(f)
    model = dict(config.get("model") or {})
    if model.get("name") != "dvae" or (config.get("objective") or {}).get("name") != "dvae":
        raise ValueError(f"tokenizer workdir={workdir} trained model {model.get('name')!r} with objective "
                         f"{(config.get('objective') or {}).get('name')!r}; a tokenizer needs a dvae run "
                         "(configs/dvae.py).")
    steps = _checkpoint_steps(workdir)
    if not steps or (step is not None and int(step) not in steps):
        raise ValueError(f"tokenizer workdir={workdir}: no checkpoint{'' if step is None else f' at step {step}'}"
                         f"; available: {steps}.")
    step = steps[-1] if step is None else int(step)
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    extra = state.get("extra") or {}
    if use_ema is None:
        use_ema = isinstance(extra, Mapping) and "ema" in extra
    if use_ema and not (isinstance(extra, Mapping) and "ema" in extra):
        raise ValueError(f"tokenizer workdir={workdir}: ema=True but the run kept no EMA params "
                         "(objective.ema_decay was 0).")
    params = jax.tree.map(np.asarray, jax.device_get(extra["ema"] if use_ema else state["params"]))
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
           if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"tokenizer workdir={workdir} step {step} holds non-finite params (e.g. {bad[0]}).")
    return model, params, f"{workdir} step {step}{' (ema)' if use_ema else ''}"


def load_objective_tokenizer(spec, image_size: int):
    """``load_tokenizer`` of an objective's frozen tokenizer (BEiT, DALL-E): a bad
    ``config.objective.tokenizer`` is a one-line ConfigError naming that key."""
    from fmjax.errors import ConfigError
    try:
        # Loaded lazily, maybe first inside a trace (launch/eval.py's abstract init): restoring
        # a workdir's checkpoint needs concrete arrays, so it runs eagerly whatever the context.
        with jax.ensure_compile_time_eval():
            return load_tokenizer(spec, image_size)
    except ValueError as e:
        raise ConfigError(f"config.objective.tokenizer: {e}") from None


def load_tokenizer(spec, image_size: int, dtype=jnp.float32):
    """``(DVAE module, params)`` from ``spec`` (see the module docstring); raises a one-line
    ``ValueError`` for a bad spec or an ``image_size`` the tokenizer cannot read (not a
    multiple of its downsampling). ``dtype``: the module's compute dtype (the encoder's last
    conv stays float32). ``params`` are plain (unboxed) arrays."""
    if not hasattr(spec, "get"):
        raise ValueError(f"tokenizer spec must be a dict with one of workdir / torch / init; got {spec!r}.")
    keys = list(spec.keys())
    unknown = sorted(set(keys) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"tokenizer spec has unknown keys {unknown}; valid: {list(SPEC_KEYS)}.")
    workdir, path, init = _spec_get(spec, "workdir"), _spec_get(spec, "torch"), _spec_get(spec, "init")
    if sum(bool(x) for x in (workdir, path, init)) != 1:
        raise ValueError("tokenizer spec must set exactly one of workdir=DIR, torch=FILE or init='random'; "
                         f"got {({k: spec.get(k) for k in keys})}.")
    if workdir:
        model_cfg, params, _ = _from_workdir(workdir, _spec_get(spec, "step"), spec.get("ema"))
        model_cfg.pop("name", None)
        kwargs = dvae_kwargs(model_cfg.pop("variant", None), **model_cfg)
    elif path:
        from fmjax.interop import dall_e
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer torch={path}: no such file.")
        sd = dall_e.read_state_dict(path)
        kwargs = dall_e.encoder_config(sd)
        params = dall_e.convert_encoder(sd)
    else:
        if init != "random":
            raise ValueError(f"tokenizer init={init!r}; valid: 'random'.")
        model_cfg = dict(_plain(spec.get("model")) or {})
        model_cfg.pop("name", None)
        variant = model_cfg.pop("variant", None)
        kwargs = dvae_kwargs(variant if (variant or model_cfg) else "openai", **model_cfg)
        params = None
    kwargs.pop("dtype", None)
    module = DVAE(dtype=dtype, **kwargs)
    problem = config_problem(module)
    if problem:
        raise ValueError(f"tokenizer: {problem}")
    if int(image_size) <= 0 or int(image_size) % module.downsample:
        raise ValueError(f"tokenizer image_size={image_size} must be a positive multiple of its downsampling "
                         f"{module.downsample} (group_count={module.group_count}).")
    if params is None:
        x = jnp.zeros((1, int(image_size), int(image_size), module.channels), jnp.float32)
        params = nn.meta.unbox(module.init(jax.random.PRNGKey(int(_spec_get(spec, "seed", 0))), x)["params"])
    return module, params
