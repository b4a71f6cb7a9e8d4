"""open_flamingo checkpoints -> fmjax ``Flamingo`` params (format ``open_flamingo``).

open_flamingo (mlfoundations/open_flamingo, commit 655f693; ``train/train_utils.py``
``save_checkpoint`` keeps the trainable params only) stores the Perceiver resampler as
``perceiver.*`` and the gated cross-attention layers as ``lang_encoder.gated_cross_attn_layers.
{i}.*`` (``i``: the decoder layer they precede; None entries store nothing). This converts
those two parts:

- ``perceiver.latents`` -> ``resampler/latents``, ``perceiver.media_time_embs`` ->
  ``resampler/media_time_embs``, ``perceiver.norm`` -> ``resampler/norm``;
  ``perceiver.layers.{j}.0`` (PerceiverAttention: ``norm_media``, ``norm_latents``, ``to_q``,
  ``to_kv``, ``to_out``) -> ``resampler/attn_{j}``; ``perceiver.layers.{j}.1`` (FeedForward:
  ``0`` LayerNorm, ``1`` / ``3`` bias-free Linear) -> ``resampler/ff_{j}`` (``norm``, ``fc1``, ``fc2``);
- ``...gated_cross_attn_layers.{i}.attn`` (``norm``, ``to_q``, ``to_kv``, ``to_out``),
  ``.attn_gate``, ``.ff`` (as above), ``.ff_gate`` -> ``lm/gated_{i}/...``.

Linear weights (out, in) become kernels (in, out). The language model's own weights (and the
vision encoder's) come from their own checkpoints and converters (e.g. ``hf_gpt2``), as a
second ``config.model_init.more`` source; ``perceiver.frame_embs`` (video) has no fmjax
counterpart and is refused; the LM's trained ``<image>`` / ``<|endofchunk|>`` embedding rows
(open_flamingo without ``--freeze_lm_embeddings``) live in the LM's embedding.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping

from fmjax.interop.hf_vit import _to_numpy

Params = Dict[str, Any]
_GATED = re.compile(r"^(?:.*\.)?gated_cross_attn_layers\.(\d+)\.(.+)$")
_PERCEIVER = re.compile(r"^(?:.*\.)?perceiver\.(.+)$")


def _put(tree: Params, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f"open_flamingo: {'/'.join(path)} given twice.")
    tree[path[-1]] = value


def _ff_or_attn(rest: str, value, where: str):
    """``norm.weight`` / ``to_q.weight`` / FeedForward ``0.weight`` ... -> (path, value)."""
    ff = {"0": "norm", "1": "fc1", "3": "fc2"}
    head, _, leaf = rest.rpartition(".")
    head = ff.get(head, head)
    if head in ("norm", "norm_media", "norm_latents"):
        return (head, {"weight": "scale", "bias": "bias"}[leaf]), value
    if head in ("to_q", "to_kv", "to_out", "fc1", "fc2") and leaf == "weight":
        return (head, "kernel"), value.T
    raise ValueError(f"open_flamingo: unexpected parameter {where}.")


def convert_open_flamingo(state_dict: Mapping[str, Any], model_config=None) -> Params:
    """The resampler and gated-layer params of an open_flamingo state dict (module docstring)."""
    out: Params = {}
    seen = False
    for name, tensor in state_dict.items():
        value = _to_numpy(tensor)
        g = _GATED.match(name)
        if g and ".gated_cross_attn_layer." not in name:  # FlamingoLayer's alias of the same weights
            i, rest = g.groups()
            seen = True
            if rest in ("attn_gate", "ff_gate"):
                _put(out, ("lm", f"gated_{i}", rest), value.reshape(1))
                continue
            part, _, rest = rest.partition(".")
            if part not in ("attn", "ff"):
                raise ValueError(f"open_flamingo: unexpected parameter {name}.")
            path, v = _ff_or_attn(rest, value, name)
            _put(out, ("lm", f"gated_{i}", part) + path, v)
            continue
        p = _PERCEIVER.match(name)
        if p:
            seen = True
            rest = p.group(1)
            if rest in ("latents", "media_time_embs"):
                _put(out, ("resampler", rest), value)
            elif rest.startswith("norm."):
                _put(out, ("resampler", "norm", {"weight": "scale", "bias": "bias"}[rest[5:]]), value)
            elif rest.startswith("frame_embs"):
                raise ValueError("open_flamingo: perceiver.frame_embs (video frames) has no fmjax "
                                 "counterpart; fmjax's resampler takes one frame per image.")
            else:
                m = re.match(r"layers\.(\d+)\.([01])\.(.+)$", rest)
                if not m:
                    raise ValueError(f"open_flamingo: unexpected parameter {name}.")
                j, which, leaf = m.groups()
                path, v = _ff_or_attn(leaf, value, name)
                _put(out, ("resampler", f"{'attn' if which == '0' else 'ff'}_{j}") + path, v)
    if not seen:
        raise ValueError("open_flamingo: the state dict holds no perceiver.* or "
                         "gated_cross_attn_layers.* parameter; is it an open_flamingo checkpoint?")
    return out
