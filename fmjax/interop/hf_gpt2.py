"""transformers ``GPT2LMHeadModel`` / ``GPT2Model`` state dicts -> ``fmjax.models.decoder.Decoder``
params (plain numpy tree, the unrolled layout).

GPT-2's projections are ``Conv1D`` modules whose ``weight`` is stored (in, out) -- already flax's
kernel layout, so unlike ``nn.Linear`` weights they are *not* transposed. ``c_attn`` (D, 3D) is
split into query / key / value (D, heads, head_dim); ``c_proj`` (D, D) becomes
``attn/out/kernel`` (heads, head_dim, D). ``wte`` -> ``token_embed/embedding`` (``lm_head.weight``
is the same tensor, tied, and is dropped after checking it); ``wpe`` -> ``pos_embed``; ``ln_1``,
``ln_2``, ``ln_f`` -> ``norm1``, ``norm2``, ``norm``; ``mlp.c_fc`` / ``mlp.c_proj`` ->
``mlp/fc1`` / ``mlp/fc2``. Models with ``add_cross_attention`` also map ``ln_cross_attn`` ->
``norm_cross`` and ``crossattention.q_attn`` / ``c_attn`` (D, 2D: key, value) / ``c_proj`` ->
``cross_attn/query`` / ``key`` / ``value`` / ``out`` (``cross_attention_every=1``).
The attention ``bias`` / ``masked_bias`` buffers of old checkpoints are ignored.

``decoder_kwargs_from_hf_config(config)`` gives the matching ``Decoder`` kwargs.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from fmjax.interop.hf_vit import _Reader, _cfg, _to_numpy

Params = Dict[str, Any]
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu", "quick_gelu": "quick_gelu", "silu": "silu"}


def decoder_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``GPT2Config`` (object or dict) -> ``Decoder`` kwargs (dropouts left at 0)."""
    act = _cfg(cfg, "activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function={act!r} has no fmjax equivalent; "
                         f"valid: {sorted(_ACTIVATIONS)}.")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False)):
        if bool(_cfg(cfg, key, want)) != want:
            raise ValueError(f"GPT-2 config {key}={_cfg(cfg, key)!r} is not supported (needs {want}).")
    width = int(_cfg(cfg, "n_embd"))
    inner = _cfg(cfg, "n_inner", None)
    return dict(vocab_size=int(_cfg(cfg, "vocab_size")), max_length=int(_cfg(cfg, "n_positions")),
                width=width, depth=int(_cfg(cfg, "n_layer")), num_heads=int(_cfg(cfg, "n_head")),
                mlp_dim=int(inner) if inner else 4 * width, position="learned",
                tie_embeddings=bool(_cfg(cfg, "tie_word_embeddings", True)),
                cross_attention_every=1 if _cfg(cfg, "add_cross_attention", False) else 0,
                activation=_ACTIVATIONS[act], layernorm_eps=float(_cfg(cfg, "layer_norm_epsilon", 1e-5)))


def _conv1d(r, name, heads=None, head_dim=None, out_heads=False):
    w, b = r(name + ".weight"), r(name + ".bias")
    if out_heads:   # (heads*hd, D) -> (heads, hd, D)
        return {"kernel": w.reshape(heads, head_dim, w.shape[1]), "bias": b}
    return {"kernel": w, "bias": b}


def _ln(r, name):
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def _split_heads(w, b, heads):
    d_in, d_out = w.shape
    hd = d_out // heads
    return {"kernel": w.reshape(d_in, heads, hd), "bias": b.reshape(heads, hd)}


def convert_hf_gpt2(state_dict: Mapping[str, Any], hf_config) -> Params:
    """A ``GPT2LMHeadModel`` (or ``GPT2Model``: keys without ``transformer.``) state dict ->
    ``Decoder`` params. KeyError naming missing / unexpected keys on a mismatch."""
    sd = {}
    for k, v in state_dict.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        sd[k] = _to_numpy(v)
    r = _Reader(sd, "HF GPT-2")
    heads = int(_cfg(hf_config, "n_head"))
    width = int(_cfg(hf_config, "n_embd"))
    hd = width // heads
    wte = r("wte.weight")
    params: Params = {"token_embed": {"embedding": wte}, "pos_embed": r("wpe.weight")}
    tied = bool(_cfg(hf_config, "tie_word_embeddings", True))
    if "lm_head.weight" in sd:
        head = r("lm_head.weight")
        if tied:
            if wte is not None and not np.array_equal(head, wte):
                raise ValueError("lm_head.weight differs from wte.weight but the config ties them.")
        else:
            params["lm_head"] = {"kernel": head.T}
    for i in range(int(_cfg(hf_config, "n_layer"))):
        p = f"h.{i}"
        w, b = r(f"{p}.attn.c_attn.weight"), r(f"{p}.attn.c_attn.bias")
        block = {"norm1": _ln(r, f"{p}.ln_1"), "norm2": _ln(r, f"{p}.ln_2"),
                 "mlp": {"fc1": _conv1d(r, f"{p}.mlp.c_fc"), "fc2": _conv1d(r, f"{p}.mlp.c_proj")}}
        if w is not None and b is not None:
            attn = {n: _split_heads(w[:, j * width:(j + 1) * width], b[j * width:(j + 1) * width], heads)
                    for j, n in enumerate(("query", "key", "value"))}
            attn["out"] = _conv1d(r, f"{p}.attn.c_proj", heads, hd, out_heads=True)
            block["attn"] = attn
        if f"{p}.crossattention.c_attn.weight" in sd:
            q = r(f"{p}.crossattention.q_attn.weight"), r(f"{p}.crossattention.q_attn.bias")
            w, b = r(f"{p}.crossattention.c_attn.weight"), r(f"{p}.crossattention.c_attn.bias")
            block["cross_attn"] = {
                "query": _split_heads(q[0], q[1], heads),
                "key": _split_heads(w[:, :width], b[:width], heads),
                "value": _split_heads(w[:, width:], b[width:], heads),
                "out": _conv1d(r, f"{p}.crossattention.c_proj", heads, hd, out_heads=True)}
            block["norm_cross"] = _ln(r, f"{p}.ln_cross_attn")
        params[f"block_{i}"] = block
    params["norm"] = _ln(r, "ln_f")
    r.finish(ignore=(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)",))
    return params


# -- karpathy/nanoGPT ---------------------------------------------------------------------------
# nanoGPT's ``GPT`` (model.py) has GPT-2's module names under ``transformer.`` but ``nn.Linear``
# projections, (out, in): transposed, they are the ``Conv1D`` layout above. Its MLP uses the
# exact GELU (``nn.GELU()``), not GPT-2's tanh approximation: ``activation='gelu'``.
_NANOGPT_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def decoder_kwargs_from_nanogpt(model_args: Mapping[str, Any]) -> Dict[str, Any]:
    """A nanoGPT checkpoint's ``model_args`` (``GPTConfig`` fields) -> ``Decoder`` kwargs."""
    if not model_args.get("bias", True):
        raise ValueError("nanoGPT bias=False (LayerNorms and Linears without biases) is not supported; "
                         "fmjax's Decoder has biases.")
    return decoder_kwargs_from_hf_config(dict(  # GPT-2's config under GPT2Config's names
        vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
        n_embd=model_args["n_embd"], n_layer=model_args["n_layer"], n_head=model_args["n_head"],
        activation_function="gelu"))


def convert_nanogpt(state_dict: Mapping[str, Any], model_config) -> Params:
    """A nanoGPT ``GPT`` state dict (``ckpt.pt``'s ``model``; the ``_orig_mod.`` prefix that
    ``torch.compile`` adds is stripped, as nanoGPT's own loader does) -> ``Decoder`` params.
    ``model_config``: ``config.model`` (its ``num_heads``)."""
    sd = {}
    for k, v in state_dict.items():
        k = k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k
        v = _to_numpy(v)
        if k.endswith(".weight") and k[:-len(".weight")].split(".", 3)[-1] in _NANOGPT_LINEARS:
            v = v.T
        sd[k] = v
    if not any(k.endswith("ln_f.bias") for k in sd):
        raise KeyError("no transformer.ln_f.bias: a nanoGPT model with bias=False, which fmjax's Decoder "
                       "does not support")
    wte = sd.get("transformer.wte.weight")
    if wte is None:
        raise KeyError("transformer.wte.weight missing: not a nanoGPT GPT state dict")
    width = wte.shape[1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    heads = int(_cfg(model_config, "num_heads"))
    return convert_hf_gpt2(sd, dict(n_head=heads, n_embd=width, n_layer=depth, tie_word_embeddings=True))
