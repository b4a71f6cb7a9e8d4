"""A training run's batch spec from its config alone, without reading the dataset.

``config.data.pp_train`` is applied to a synthetic source example (a random uint8 image at the
config's resolution, label 0, a caption naming shape classes), so every op that shapes the batch
(crops, multi-crop views, masks, tokenisation) is the real one. A tokenizer whose vocabulary
file is not on this machine (``clip_bpe``) is swapped for the byte tokenizer: the token array's
shape is the context length either way. Used by ``launch/compile.py`` and ``launch/benchmark.py``.
"""
from __future__ import annotations

import os
import re

import numpy as np

# Names shape classes, so swap_words (CLIP hard negatives) finds a word to swap.
SYNTHETIC_CAPTION = "a small red circle left of a large blue square."


def synthetic_example(config) -> dict:
    """What a source gives (``image`` uint8 HxWx3, ``label``, ``caption``, and instances:
    ``masks`` (K, H, W) uint8, ``num_objects`` K, per-instance ``shapes`` / ``colors`` / ``sizes``
    / ``positions``, with K = ``config.data.max_instances`` or the shapes' 3), at the dataset's
    resolution for fmjax_shapes, else at ``config.data.image_size`` (every pp_train crops or
    resizes from that)."""
    from fmjax.data import sources
    try:
        size = sources._shapes_resolution(config.data.name)  # noqa: SLF001
    except (ValueError, AttributeError):
        size = None
    size = size or int(config.data.get("image_size") or 224)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    k = int(config.data.get("max_instances", 3) or 3)
    masks = np.zeros((k, size, size), np.uint8)
    for i in range(k):   # a square per instance, so boxes and prompts are well defined
        y, x = rng.integers(0, size - size // 4, 2)
        masks[i, y:y + size // 4, x:x + size // 4] = 1
    attrs = {key: np.zeros((k,), np.int32) for key in ("shapes", "colors", "sizes", "positions")}
    return {"image": image, "label": 0, "caption": SYNTHETIC_CAPTION, "masks": masks,
            "num_objects": np.int32(k), **attrs}


_VOCAB_FILE_ARGS = re.compile(r"tokenizer\s*=\s*['\"]clip_bpe['\"]")


def without_vocab_files(config):
    """``(config, note)``: ``config`` itself, or, when its ``clip_bpe`` vocabulary file is not on
    this machine, a copy tokenizing with the byte tokenizer at the same context length (the
    batch's shapes and the model are unchanged; ``note`` says so, else it is '')."""
    tok = config.data.get("tokenize")
    if not tok or tok.get("tokenizer") != "clip_bpe":
        return config, ""
    path = tok.get("bpe_path")
    if path and os.path.isfile(os.path.expanduser(str(path))):
        return config, ""
    config = config.copy_and_resolve_references()
    config.data.tokenize.tokenizer = "bytes"  # (reads no bpe_path)
    for key in ("pp_train", "pp_eval"):
        if config.data.get(key):
            config.data[key] = _VOCAB_FILE_ARGS.sub("tokenizer='bytes'", config.data[key])
    return config, (f"the CLIP BPE vocabulary {path!r} is not here: tokens come from the byte "
                    "tokenizer, same context length (shapes and memory are unchanged)")


def batch_spec(config, objective, global_batch: int | None = None, example=None):
    """``(spec, transformed example)``: the global batch's ``{key: ShapeDtypeStruct}`` for
    ``objective.batch_keys``, from ``config.data.pp_train`` on ``example`` (default: the
    synthetic one). Missing keys are a ``ConfigError`` naming them."""
    from fmjax.data.transforms import parse_pp
    from fmjax.train.setup import batch_spec as _batch_spec
    transform = parse_pp(config.data.pp_train, "config.data.pp_train")
    raw = synthetic_example(config) if example is None else example
    spec = _batch_spec([raw], transform, objective.batch_keys,
                       int(config.batch_size if global_batch is None else global_batch))
    return spec, transform(raw, np.random.default_rng(0))


def check_without_data(config, objective, mesh) -> None:
    """``validate.check`` as if ``config`` named the bundled data, and without its evals: every
    config check that needs no dataset (the benchmark and AOT compilation read none)."""
    from fmjax.data import sources
    from fmjax.train import validate
    checked = config.copy_and_resolve_references()
    checked.data.name, checked.data.train_split = sources.SHAPES_NAME, "train"
    validate.check(checked, objective, mesh, evals=False)
