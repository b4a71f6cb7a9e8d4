"""Convert openai/DALL-E's dVAE state dicts (``dall_e.Encoder`` / ``dall_e.Decoder``) into the
params of ``fmjax.models.dvae.DVAE``.

``dall_e`` (commit 5be4b236bc3ade6943662354117a0e83752cc322) names its parameters
``blocks.input.{w,b}``, ``blocks.group_{g}.block_{i}.id_path.{w,b}`` (where the width changes),
``blocks.group_{g}.block_{i}.res_path.conv_{1..4}.{w,b}`` and ``blocks.output.conv.{w,b}``;
fmjax's modules carry the same names under ``encoder/`` and ``decoder/`` (``blocks.`` dropped),
with each conv weight [n_out, n_in, kw, kw] transposed to [kw, kw, n_in, n_out]. The
architecture (``group_count``, ``n_hid``, ``n_blk_per_group``, ``vocab_size``, ``n_init``,
channels) is read off the names and shapes. Checked by tests/interop/test_dall_e_parity.py.

OpenAI publishes ``encoder.pkl`` / ``decoder.pkl`` as pickled modules; their ``state_dict()``
(saved with ``torch.save``) is what this reads.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import numpy as np

from fmjax.interop.hf_vit import _to_numpy

Params = Dict[str, Any]
_KEY = re.compile(r"blocks\.(input|output\.conv|group_\d+\.block_\d+\.(?:id_path|res_path\.conv_[1-4]))\.(w|b)")
_BLOCK = re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.")


def read_state_dict(path: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``), as NumPy."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    import torch
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickled module (OpenAI's encoder.pkl) lands here
        raise ValueError(f"{path} is not a plain state dict ({str(e).splitlines()[0][:120]}); save "
                         "the module's state_dict() first: torch.save(torch.load('encoder.pkl')"
                         ".state_dict(), 'encoder.pt').") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict.")
    return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sd.items()}


def _strip(sd: Mapping[str, Any]) -> dict:
    """The state dict as float32 NumPy copies (never views of the torch tensors, which an
    optimizer step would change in place), without a leading ``module.`` / ``encoder.`` prefix."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "encoder.", "decoder."):
            if k.startswith(prefix + "blocks."):
                k = k[len(prefix):]
        out[k] = _to_numpy(v)
    return out


def _architecture(sd: Mapping[str, np.ndarray], kind: str) -> dict:
    if "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
        raise ValueError(f"not a dall_e {kind} state dict: no blocks.input.w / blocks.output.conv.w "
                         f"(it has e.g. {sorted(sd)[:3]}).")
    bad = [k for k in sd if not _KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"not a dall_e {kind} state dict: unexpected key {bad[0]!r}.")
    blocks = {(int(g), int(i)) for g, i in (_BLOCK.match(k).groups() for k in sd if _BLOCK.match(k))}
    groups = sorted({g for g, _ in blocks})
    n_blk = sorted({i for _, i in blocks})
    if not groups or groups != list(range(1, len(groups) + 1)) or n_blk != list(range(1, len(n_blk) + 1)) \
            or len(blocks) != len(groups) * len(n_blk):
        raise ValueError(f"dall_e {kind} state dict: groups {groups} x blocks {n_blk} are not complete.")
    return dict(group_count=len(groups), n_blk_per_group=len(n_blk))


def encoder_config(sd: Mapping[str, Any]) -> dict:
    """``DVAE`` kwargs of a ``dall_e.Encoder`` state dict (``n_init`` stays the default)."""
    sd = _strip(sd)
    arch = _architecture(sd, "Encoder")
    n_hid, channels, kw, _ = sd["blocks.input.w"].shape
    if kw != 7:
        raise ValueError(f"dall_e Encoder state dict: blocks.input.w is {kw}x{kw}, not 7x7 (a Decoder's?).")
    return dict(arch, n_hid=int(n_hid), channels=int(channels), vocab_size=int(sd["blocks.output.conv.w"].shape[0]))


def decoder_config(sd: Mapping[str, Any]) -> dict:
    """``DVAE`` kwargs of a ``dall_e.Decoder`` state dict (``output`` 'logit_laplace' for its
    2 C output channels)."""
    sd = _strip(sd)
    arch = _architecture(sd, "Decoder")
    n_init, vocab, kw, _ = sd["blocks.input.w"].shape
    if kw != 1:
        raise ValueError(f"dall_e Decoder state dict: blocks.input.w is {kw}x{kw}, not 1x1 (an Encoder's?).")
    g = arch["group_count"]
    n_hid = sd[f"blocks.group_{g}.block_1.res_path.conv_4.w"].shape[0]
    out = sd["blocks.output.conv.w"].shape[0]
    if out % 2:
        raise ValueError(f"dall_e Decoder state dict: {out} output channels; the logit-Laplace decoder has 2 C.")
    return dict(arch, n_hid=int(n_hid), n_init=int(n_init), vocab_size=int(vocab), channels=out // 2,
                output="logit_laplace")


def _convert(sd: Mapping[str, np.ndarray]) -> Params:
    params: Params = {}
    for k, v in sd.items():
        path = k[len("blocks."):].split(".")
        if path[-1] == "w":
            v = np.transpose(v, (2, 3, 1, 0))   # [out, in, kh, kw] -> [kh, kw, in, out]
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(v, np.float32)
    return params


def convert_encoder(sd: Mapping[str, Any]) -> Params:
    """``dall_e.Encoder.state_dict()`` -> ``{'encoder': ...}`` (DVAE params; no decoder)."""
    sd = _strip(sd)
    encoder_config(sd)
    return {"encoder": _convert(sd)}


def convert_decoder(sd: Mapping[str, Any]) -> Params:
    """``dall_e.Decoder.state_dict()`` -> ``{'decoder': ...}``."""
    sd = _strip(sd)
    decoder_config(sd)
    return {"decoder": _convert(sd)}


def convert_dall_e(encoder_sd: Mapping[str, Any], decoder_sd: Mapping[str, Any]) -> tuple[Params, dict]:
    """Both halves -> ``(params, DVAE kwargs)``; the two must describe the same dVAE."""
    enc, dec = encoder_config(encoder_sd), decoder_config(decoder_sd)
    for key in ("group_count", "n_blk_per_group", "n_hid", "vocab_size", "channels"):
        if enc[key] != dec[key]:
            raise ValueError(f"dall_e Encoder and Decoder differ in {key}: {enc[key]} vs {dec[key]}.")
    return {**convert_encoder(encoder_sd), **convert_decoder(decoder_sd)}, {**enc, **dec}
