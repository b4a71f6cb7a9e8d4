"""Export a workdir's checkpoint to safetensors + a reference config: what ``launch/export.py``
runs (the weight mapping is ``fmjax.interop.export``).

Which weights: ``weights='auto'`` takes what the method publishes: DINO's EMA teacher backbone
(the DINO head is not exported), the diffusion objective's EMA model, the ``backbone`` params
of objectives that keep one (a head on a backbone), the params otherwise;
``weights='params'`` takes the optimised params (DINO's student backbone, the non-EMA model).
Every check that needs only ``DIR/config.json`` (the format fits the model, no option lacks a
reference equivalent, ``out`` is free) runs before the checkpoint is restored; errors are
``ConfigError`` / ``FileNotFoundError`` (one line from the launcher), and nothing is written.
"""
from __future__ import annotations

import re

from fmjax import adapt
from fmjax.adapt import lora as adapt_lora
from fmjax.errors import ConfigError
from fmjax.interop import export as export_lib
from fmjax.train import workdir as workdir_lib
from fmjax.train.restore import load_checkpoint, load_workdir_config
from fmjax.train.setup import build
from fmjax.train.writer import log

WEIGHTS = ("auto", "params")


def export_model(objective):
    """The fmjax model of ``objective`` that is exported (DINO: its ViT backbone)."""
    backbone = getattr(objective, "backbone", None)
    return objective.model if backbone is None else backbone


def select_weights(objective_name: str, state, weights: str = "auto"):
    """``(params tree, description)`` of the exported model in a restored ``state``."""
    if weights not in WEIGHTS:
        raise ConfigError(f"unknown --weights={weights!r}; valid: {', '.join(WEIGHTS)}.")
    auto = weights == "auto"
    if objective_name == "dino":
        return ((state.extra["teacher"]["backbone"], "EMA teacher backbone") if auto
                else (state.params["backbone"], "student backbone"))
    if objective_name == "diffusion":
        return ((state.extra["ema"]["model"], "EMA model") if auto
                else (state.params["model"], "params (no EMA)"))
    if "backbone" in state.params:  # objectives that train a head on a backbone (linear probe)
        return state.params["backbone"], "backbone params"
    return state.params, "params"


def preprocess_from_config(config):
    """{'mean', 'std'} of the ``normalize(...)`` op of ``config.data.pp_eval``, or None."""
    pp = str(config.data.get("pp_eval", "") or "")
    found = re.search(r"normalize\('(\w+)'\)", pp)
    if not found:
        return None
    from fmjax.data.transforms import NORMALIZE_PRESETS
    preset = NORMALIZE_PRESETS.get(found.group(1))
    return None if preset is None else dict(mean=list(preset[0]), std=list(preset[1]))


def export_workdir(workdir: str, fmt: str, out: str, step: int | None = None,
                   weights: str = "auto", dtype: str = "float32", config=None,
                   devices=None) -> dict:
    """Writes ``workdir``'s checkpoint (latest or ``step``) in ``fmt`` to the new dir ``out``.

    Returns ``fmjax.interop.export.export``'s dict plus 'step' and 'weights'.
    """
    workdir = workdir_lib.resolve(workdir)
    if weights not in WEIGHTS:
        raise ConfigError(f"unknown --weights={weights!r}; valid: {', '.join(WEIGHTS)}.")
    export_lib.check_dtype(dtype)
    out = export_lib.check_out(out)
    config = config or load_workdir_config(workdir)
    export_lib.check_format(config.model.get("name"), fmt, workdir)
    adapter = adapt.spec(config)
    if adapter is not None and adapter["name"] != "lora":
        raise ConfigError(f"{workdir} trains a {adapter['name']!r} adapter, which the exported "
                          f"{fmt!r} model has no place for; only LoRA merges into the kernels.")
    objective, _, _ = build(config, devices)
    export_lib.check_model(export_model(objective), fmt, workdir)

    config, objective, _, _, state, step = load_checkpoint(workdir, config, step, devices)
    params, which = select_weights(config.objective.name, state, weights)
    if adapter is not None:  # LoRA folded into the kernels: the exported model is the plain one
        params, which = adapt_lora.merge(params, adapter["alpha"], adapter["rank"]), f"{which} + merged LoRA"
    image_size = config.data.get("image_size")
    metadata = dict(source=dict(workdir=workdir, step=int(step), weights=which,
                                objective=config.objective.name,
                                model=config.model.to_dict(), image_size=image_size))
    result = export_lib.export(export_model(objective), params, fmt, out,
                               image_size=image_size, dtype=dtype, metadata=metadata,
                               preprocess=preprocess_from_config(config))
    log(f"== exported {workdir} step {step} ({which}) as {result['reference']} "
        f"({fmt}, {dtype}) to {result['out']}: {', '.join(result['files'])}")
    for note in result["notes"]:
        log(f"   note: {note}")
    return dict(result, step=int(step), weights=which)
