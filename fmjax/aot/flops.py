"""FLOP counts of a train step: analytic model FLOPs for ViT / MAE / CLIP / DINO / DiT, else
XLA's count.

The analytic count is the usual MFU convention: the transformer's matmuls, 2 FLOPs per
multiply-add, x3 for forward + backward, no rematerialisation counted. XLA's count of a
compiled program includes what remat recomputes (hardware FLOPs) and, on GPU, misses cuBLAS /
cuDNN custom calls.
"""
from __future__ import annotations


def xla_cost(stage) -> dict:
    """``stage.cost_analysis()`` of a lowered or compiled jax stage as a dict ({} if unknown)."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def xla_flops(stage) -> float:
    """XLA's FLOP count of a lowered or compiled jax stage, 0.0 if unknown."""
    return float(xla_cost(stage).get("flops", 0.0))


def _layer_flops(tokens: int, width: int, mlp: int) -> float:
    """Forward FLOPs of one pre-norm transformer block (matmuls only; 2 FLOPs per MAC)."""
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def analytic_train_flops_per_item(model, image_size: int) -> float:
    """Forward + backward (3x forward) model FLOPs per example for ViT / MAE."""
    p = model.patch_size
    patches = (image_size // p) ** 2
    embed = 2 * patches * p * p * 3 * model.width
    if hasattr(model, "mask_ratio"):  # MAE: encoder on the kept patches, decoder on all
        kept = 1 + int(patches * (1 - model.mask_ratio))
        dec_mlp = model.decoder_mlp_dim or 4 * model.decoder_width
        fwd = (embed + model.depth * _layer_flops(kept, model.width, model.mlp_dim)
               + 2 * kept * model.width * model.decoder_width
               + model.decoder_depth * _layer_flops(patches + 1, model.decoder_width, dec_mlp)
               + 2 * patches * model.decoder_width * p * p * 3)
    else:
        tokens = patches + int(model.class_token) + model.num_registers
        fwd = embed + model.depth * _layer_flops(tokens, model.width, model.mlp_dim)
        fwd += 2 * model.width * max(model.num_classes, 0)
    return 3.0 * fwd


def analytic_model(objective, spec):
    """(model, image size) when the analytic count applies (a ViT with a linear patch stem,
    or an MAE, on square ``image`` batches), else None: XLA's count is used instead."""
    from fmjax.models.mae import MAE
    from fmjax.models.vit import ViT
    model = getattr(objective, "model", None)
    image = spec.get("image")
    if image is None or len(image.shape) != 4 or image.shape[1] != image.shape[2]:
        return None
    if isinstance(model, MAE) or (isinstance(model, ViT) and model.stem == "patch"):
        return model, int(image.shape[1])
    return None


def clip_train_flops_per_item(model, image_size: int, context_length: int, texts: int = 1,
                              batch: int = 0) -> float:
    """CLIP with a flat ViT image tower: image tower + ``texts`` text-tower passes (2 with
    hard negatives) + projections, and the [B, B] logits' share per pair; x3 fwd + bwd."""
    patches = (image_size // model.patch_size) ** 2
    image = (2 * patches * model.patch_size ** 2 * 3 * model.width
             + model.depth * _layer_flops(patches + 1, model.width, model.mlp_dim)
             + 2 * model.width * model.embed_dim)
    text = (model.text_depth * _layer_flops(context_length, model.text_width, model.text_mlp_dim)
            + 2 * model.text_width * model.embed_dim)
    logits = 2 * batch * texts * model.embed_dim
    return 3.0 * (image + texts * text + logits)


def vit_forward_flops(model, image_size: int) -> float:
    """Forward model FLOPs of one image through a ViT (patch stem) at ``image_size``."""
    return analytic_train_flops_per_item(model, image_size) / 3.0


def dino_head_flops(head, width: int) -> float:
    """Forward FLOPs of DINO's projection head for one crop: the MLP, then the weight-normed
    last layer bottleneck -> out_dim."""
    dims = [width] + [head.hidden_dim] * (max(head.num_layers, 1) - 1) + [head.bottleneck_dim]
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return mlp + 2 * head.bottleneck_dim * head.out_dim


def dino_train_flops_per_item(backbone, head, global_size: int, num_global: int,
                              local_size: int = 0, num_local: int = 0) -> float:
    """One DINO example: the student (backbone + head, forward + backward: x3) on every global
    and local crop, and the EMA teacher (forward only: x1) on the global crops."""
    g = vit_forward_flops(backbone, global_size) + dino_head_flops(head, backbone.width)
    loc = (vit_forward_flops(backbone, local_size) + dino_head_flops(head, backbone.width)
           if num_local else 0.0)
    return 3.0 * (num_global * g + num_local * loc) + 1.0 * num_global * g


def dit_train_flops_per_item(model, image_size: int, channels: int) -> float:
    """One DiT example (forward + backward: x3): patch embedding, timestep / label / context
    conditioning MLP, per block the transformer matmuls plus adaLN's 6 x width modulation,
    and the final adaLN (2 x width) + linear to the patch pixels."""
    p, d = model.patch_size, model.width
    tokens = (image_size // p) ** 2
    out = (model.out_channels or channels) * (2 if model.learn_sigma else 1)
    cond = 2 * model.frequency_embedding_size * d + 2 * d * d + (2 * model.context_dim * d if model.context_dim else 0)
    fwd = (2 * tokens * p * p * channels * d + cond
           + model.depth * (_layer_flops(tokens, d, model.mlp_dim) + 2 * d * 6 * d)
           + 2 * d * 2 * d + 2 * tokens * d * p * p * out)
    return 3.0 * fwd


def _objective_analytic(objective, spec):
    """(FLOPs per example) for DINO (ViT backbone) and diffusion with a DiT, else None."""
    from fmjax.models.dit import DiT
    from fmjax.models.vit import ViT
    backbone, head = getattr(objective, "backbone", None), getattr(objective, "head", None)
    g = spec.get("global_crops")
    if (isinstance(backbone, ViT) and backbone.stem == "patch" and head is not None
            and hasattr(head, "bottleneck_dim") and g is not None and len(g.shape) == 5):
        loc = spec.get("local_crops")
        return dino_train_flops_per_item(backbone, head, int(g.shape[2]), int(g.shape[1]),
                                         int(loc.shape[2]) if loc is not None else 0,
                                         int(loc.shape[1]) if loc is not None else 0)
    model, image = getattr(objective, "model", None), spec.get("image")
    if isinstance(model, DiT) and image is not None and len(image.shape) == 4 and image.shape[1] == image.shape[2]:
        return dit_train_flops_per_item(model, int(image.shape[1]), int(image.shape[3]))
    return None


def model_flops_per_chip(objective, spec, lowered, num_devices: int):
    """(FLOPs per step per chip, source): analytic when it applies, else XLA's count of the
    program as written (before fusion and remat) divided over the devices."""
    analytic = analytic_model(objective, spec)
    batch = next(iter(spec.values())).shape[0]
    if analytic is not None:
        return analytic_train_flops_per_item(*analytic) * batch / num_devices, "analytic"
    per_item = _objective_analytic(objective, spec)
    if per_item is not None:
        return per_item * batch / num_devices, "analytic"
    from fmjax.models.clip import CLIP
    model, image, tokens = getattr(objective, "model", None), spec.get("image"), spec.get("tokens")
    if (isinstance(model, CLIP) and model.image is None and model.text is None and model.width
            and image is not None and tokens is not None and image.shape[1] == image.shape[2]):
        per_item = clip_train_flops_per_item(model, int(image.shape[1]), int(tokens.shape[1]),
                                             1 + int("neg_tokens" in spec), batch)
        return per_item * batch / num_devices, "analytic"
    return xla_flops(lowered) / num_devices, "xla"
