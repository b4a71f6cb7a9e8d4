"""Config checks that run before any data is read or anything is compiled.

Each failure is a ``ConfigError`` whose message is one line naming the problem
and the fix; ``launch/train.py`` prints it and exits non-zero.
"""
from __future__ import annotations

import jax

from fmjax.data import sources
from fmjax.parallel import mesh as mesh_lib

from fmjax.errors import ConfigError  # noqa: F401  (re-exported: fmjax.train.validate.ConfigError)

DTYPES = ("float32", "bfloat16")


def check(config, objective, mesh) -> None:
    dp = mesh_lib.batch_parallelism(mesh)
    bs = int(config.batch_size)
    if bs % dp:
        raise ConfigError(
            f"global batch_size={bs} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {dp}, e.g. --config.batch_size={max(dp, bs // dp * dp)}.")
    if bs % jax.process_count():
        raise ConfigError(f"global batch_size={bs} is not divisible by the {jax.process_count()} processes.")
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1 or bs % (accum * dp):
        raise ConfigError(
            f"batch_size={bs} must split into grad_accum_steps={accum} micro-batches that are each "
            f"divisible by the data-parallel size {dp}; pick batch_size a multiple of {accum * dp}.")
    if config.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r} is not supported; valid: {list(DTYPES)}.")
    patch = getattr(objective, "patch_size", None)
    size = config.data.get("image_size")
    if patch and size and size % patch:
        raise ConfigError(
            f"image size {size} is not divisible by the patch size {patch}; "
            f"use an image size that is a multiple of {patch} (e.g. {size // patch * patch or patch}).")
    _check_vocab(config)
    for key in ("total_steps", "log_every", "checkpoint_every"):
        if int(config.get(key, 1)) <= 0:
            raise ConfigError(f"{key} must be positive, got {config.get(key)}.")
    try:
        sources.check_source(config.data.name, config.data.get("train_split", "train"),
                             config.data.get("data_dir"))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _check_vocab(config) -> None:
    """The tokenizer's ids must fit the text tower's embedding table (an out-of-range id
    would be silently clamped by the lookup)."""
    tok_cfg = config.data.get("tokenize")
    text = config.objective.get("text") or {}
    vocab = config.model.get("vocab_size") or text.get("vocab_size")
    if not tok_cfg or not vocab:
        return
    from fmjax.data.transforms import tokenize
    try:
        tok = tokenize(**dict(tok_cfg)).tokenizer
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"config.data.tokenize: {e}") from None
    if tok.vocab_size > int(vocab):
        raise ConfigError(
            f"tokenizer {tok!r} yields ids up to {tok.vocab_size - 1} but the text tower's vocab_size "
            f"is {vocab}; set the model's vocab_size to {tok.vocab_size} (or the tokenizer's to {vocab}).")
