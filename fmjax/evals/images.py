"""Picture writing: image grids, PNG files, TensorBoard images, MAE grids; the ``images`` eval type.

Conventions: images are NHWC. A patch vector is the ``(p, p, 3)`` block
flattened channel-last, and patches are ordered row-major over the patch grid
(the MAE reference ``patchify``). Float images are taken to be in [0, 1];
``uint8`` images are passed through.
"""
import os

import jax
import numpy as np

from fmjax.evals import common, registry
from fmjax.models import layers  # the one patch layout (MAE reference order)
from fmjax.objectives.base import supports


def to_uint8(x):
    """Converts a float image in [0, 1] (clipped) or a uint8 image to uint8."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    x = np.nan_to_num(x.astype(np.float32), nan=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_rgb(x):
    """Makes ``[N, H, W]`` / ``[N, H, W, 1]`` images 3-channel."""
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def image_grid(rows, pad=2, pad_value=255):
    """Tiles rows of images into one uint8 picture.

    Args:
        rows: list of arrays ``[N, H, W, 3]`` (float in [0, 1] or uint8); each
            entry becomes one row of the grid, its N images the columns. A
            single array ``[N, H, W, 3]`` is taken as one row. Rows may hold
            different N (short rows are left blank) but share H and W.
        pad: pixels of border around and between images.
        pad_value: uint8 colour of the border.

    Returns:
        uint8 array ``[R*H + (R+1)*pad, C*W + (C+1)*pad, 3]``, with C the
        largest N.
    """
    if not isinstance(rows, (list, tuple)):
        rows = [rows]
    rows = [_to_rgb(to_uint8(r)) for r in rows]
    if not rows:
        raise ValueError("image_grid needs at least one row.")
    h, w = rows[0].shape[1:3]
    for r in rows:
        if r.shape[1:3] != (h, w):
            raise ValueError(f"rows differ in image size: {r.shape} vs {h, w}")
    ncols = max(r.shape[0] for r in rows)
    out = np.full((len(rows) * h + (len(rows) + 1) * pad,
                   ncols * w + (ncols + 1) * pad, 3), pad_value, np.uint8)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        for j, img in enumerate(row):
            x = pad + j * (w + pad)
            out[y:y + h, x:x + w] = img
    return out


def save_png(path, array):
    """Writes an image (HWC or HW; float in [0, 1] or uint8) as a PNG file.

    Parent directories are created.
    """
    from PIL import Image  # Local import: only this writer needs Pillow.

    array = to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if "://" in str(path):  # a bucket: through etils.epath
        import io
        from etils import epath
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        target.write_bytes(buf.getvalue())
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_tensorboard_image(writer, tag, array, step):
    """Adds an HWC image to a tensorboardX ``SummaryWriter`` as uint8."""
    array = to_uint8(array)
    if array.ndim == 2:
        array = array[..., None]
    writer.add_image(tag, array, global_step=int(step), dataformats="HWC")


def denormalize(x, mean, std):
    """Inverts ``(x - mean) / std`` over the channel axis; clips to [0, 1]."""
    x = np.asarray(x, np.float32)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return np.clip(x * std + mean, 0.0, 1.0)


def patchify(images, patch_size):
    """``[N, H, W, C]`` -> ``[N, (H/p)*(W/p), p*p*C]`` (MAE layout), on host arrays."""
    return np.asarray(layers.patchify(np.asarray(images), patch_size))


def unpatchify(patches, patch_size, height, width, channels=3):
    """Inverse of :func:`patchify`, on host arrays."""
    grid = (height // patch_size, width // patch_size)
    return np.asarray(layers.unpatchify(np.asarray(patches), patch_size, grid, channels))


def mae_reconstruction_grid(images, pred_patches, mask, patch_size, mean, std,
                            n=8, norm_pix=False, pad=2, grey=0.5):
    """Three-row picture of an MAE step: masked input, reconstruction, original.

    Args:
        images: ``[B, H, W, 3]`` normalised images as fed to the model.
        pred_patches: ``[B, L, p*p*3]`` decoder predictions in the normalised
            pixel space of ``images`` (per-patch normalised if ``norm_pix``).
        mask: ``[B, L]``, 1 (or True) where a patch was masked (removed).
        patch_size: patch side p.
        mean, std: per-channel normalisation to invert for display.
        n: number of examples (columns) to show.
        norm_pix: predictions are per-patch normalised targets (MAE's
            ``norm_pix_loss``); they are mapped back with the ORIGINAL patch's
            mean and unbiased variance (eps 1e-6).
        pad: border pixels of the grid.
        grey: display value in [0, 1] for masked patches in the first row.

    Returns:
        uint8 grid ``[3*H + 4*pad, n*W + (n+1)*pad, 3]``.
    """
    images = np.asarray(images, np.float32)[:n]
    pred = np.asarray(pred_patches, np.float32)[:n]
    mask = np.asarray(mask, np.float32)[:n]
    _, h, w, c = images.shape
    target = patchify(images, patch_size)                     # [n, L, D]
    if pred.shape != target.shape:
        raise ValueError(f"pred_patches {pred.shape} != patches {target.shape}")
    if norm_pix:
        mu = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        pred = pred * np.sqrt(var + 1e-6) + mu
    m = mask[..., None]
    recon = unpatchify(pred * m + target * (1.0 - m), patch_size, h, w, c)
    original = denormalize(images, mean, std)
    recon = denormalize(recon, mean, std)
    pix_mask = unpatchify(np.broadcast_to(m, target.shape), patch_size, h, w, c)
    masked = original * (1.0 - pix_mask) + grey * pix_mask
    return image_grid([masked, recon, original], pad=pad)


@registry.register("images")
class ImagesEvaluator(common.Evaluator):
    """Writes the objective's ``visualize`` pictures of the first batch of ``split`` (of
    ``examples``, default one batch; rng ``PRNGKey(seed)``, default 0) as ``<name>_<picture>``
    to ``DIR/images/`` and TensorBoard; logs no metric. Objectives without ``visualize``
    write nothing."""

    fields = ("seed",)
    random_init = False

    @classmethod
    def check_options(cls, where, ev, config, objective):
        if "seed" in ev:
            common.check_int(where, "seed", ev["seed"], 0)

    def run(self, state, step, writer):
        objective = self.ctx.objective
        if not supports(objective, "visualize"):
            return {}
        n = self.examples if self.examples is not None else self.batch_size
        batch, _ = next(self.batches(examples=n))
        with self.ctx.scope():
            pics = objective.visualize(state.params, state.extra, batch,
                                       jax.random.PRNGKey(self.ev.get("seed", 0)))
        for pic_name, pic in pics.items():
            writer.write_image(step, f"{self.name}_{pic_name}", np.asarray(pic))
        return {}


def model_inputs_to_display(transform, images) -> np.ndarray:
    """float [0, 1] (..., H, W, 3) of model inputs: the eval pipeline's ``normalize`` undone
    (else min-max scaled), for pictures."""
    from fmjax.data.transforms import normalize
    x = np.asarray(images, np.float32)[..., :3]
    norm = next((t for t in getattr(transform, "transforms", []) if isinstance(t, normalize)), None)
    if norm is not None:
        x = x * np.asarray(norm.std, np.float32) + np.asarray(norm.mean, np.float32)
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return np.clip(x, 0, 1)
