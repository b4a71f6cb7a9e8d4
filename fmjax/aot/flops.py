"""FLOP counts of a train step: analytic model FLOPs for ViT / MAE, else XLA's count.

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


def model_flops_per_chip(objective, spec, lowered, num_devices: int):
    """(FLOPs per step per chip, source): analytic when it applies, else XLA's count of the
    program as written (before fusion and remat) divided over the devices."""
    analytic = analytic_model(objective, spec)
    batch = next(iter(spec.values())).shape[0]
    if analytic is not None:
        return analytic_train_flops_per_item(*analytic) * batch / num_devices, "analytic"
    from fmjax.models.clip import CLIP
    model, image, tokens = getattr(objective, "model", None), spec.get("image"), spec.get("tokens")
    if (isinstance(model, CLIP) and model.image is None and model.text is None and model.width
            and image is not None and tokens is not None and image.shape[1] == image.shape[2]):
        per_item = clip_train_flops_per_item(model, int(image.shape[1]), int(tokens.shape[1]),
                                             1 + int("neg_tokens" in spec), batch)
        return per_item * batch / num_devices, "analytic"
    return xla_flops(lowered) / num_devices, "xla"
