"""SimMIM: masks (SimMIM's MaskGenerator), the masked L1 loss and the linear decoder's pixel
order against the reference formulas, the converter, config errors, and exact resume."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import transforms
from fmjax.data.mask_ops import simmim_mask
from fmjax.errors import ConfigError
from fmjax.objectives import simmim as simmim_lib


def _reference_mask_generator(rs, input_size, mask_patch_size, model_patch_size, mask_ratio):
    """microsoft/SimMIM data/data_simmim.py MaskGenerator.__call__ (np.random -> a RandomState)."""
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size ** 2
    mask_count = int(np.ceil(token_count * mask_ratio))
    mask_idx = rs.permutation(token_count)[:mask_count]
    mask = np.zeros(token_count, dtype=int)
    mask[mask_idx] = 1
    return mask.reshape((rand_size, rand_size)).repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.mark.parametrize("args", [(192, 32, 4, 0.6), (224, 32, 16, 0.6), (32, 8, 4, 0.6), (32, 16, 8, 0.3)])
def test_mask_distribution_matches_mask_generator(args):
    op = simmim_mask(*args)
    rng, rs = np.random.default_rng(0), np.random.RandomState(0)
    ours = np.stack([op.draw(rng) for _ in range(2000)])
    ref = np.stack([_reference_mask_generator(rs, *args) for _ in range(2000)])
    assert ours.shape == ref.shape and ours.dtype == np.int32
    # Same count in every mask, same block structure, same (uniform) marginal per position.
    np.testing.assert_array_equal(ours.sum((1, 2)), ref.sum((1, 2)))
    scale = args[1] // args[2]
    blocks = ours.reshape(len(ours), ours.shape[1] // scale, scale, ours.shape[2] // scale, scale)
    assert np.all(blocks.min((2, 4)) == blocks.max((2, 4)))
    p = math.ceil((args[0] // args[1]) ** 2 * args[3]) / (args[0] // args[1]) ** 2
    np.testing.assert_allclose(ours.mean(0), p, atol=0.05)
    np.testing.assert_allclose(ref.mean(0), p, atol=0.05)


def test_in_step_masks_have_the_same_distribution():
    m = np.asarray(simmim_lib.draw_masks(jax.random.PRNGKey(0), 4000, (8, 8), 8, 4, 0.6))
    assert m.shape == (4000, 8, 8)
    np.testing.assert_array_equal(m.sum((1, 2)), math.ceil(16 * 0.6) * 4)
    np.testing.assert_allclose(m.mean(0), math.ceil(16 * 0.6) / 16, atol=0.04)


def test_mask_op_errors():
    with pytest.raises(ValueError, match="multiple of mask_patch_size"):
        simmim_mask(30, 8, 4)
    with pytest.raises(ValueError, match="mask_ratio"):
        simmim_mask(32, 8, 4, 1.5)
    out = transforms.parse("simmim_mask(32, 8, 4, 0.6)")({"image": np.zeros((32, 32, 3))}, np.random.default_rng(0))
    assert out["mask"].shape == (8, 8)


def test_loss_and_pixel_order_match_the_reference():
    """``unpatchify`` is PixelShuffle's order; the loss is SimMIM.forward's, gradients too."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b, grid, p, c, d = 2, 4, 4, 3, 8
    tokens = rng.normal(size=(b, grid * grid, d)).astype(np.float32)
    w = rng.normal(size=(d, c * p * p)).astype(np.float32)
    bias = rng.normal(size=(c * p * p,)).astype(np.float32)
    images = rng.normal(size=(b, grid * p, grid * p, c)).astype(np.float32)
    mask = (rng.random((b, grid, grid)) < 0.5).astype(np.int32)

    def ours(w):
        rec = simmim_lib.unpatchify(jnp.asarray(tokens) @ w + bias, (grid, grid), p, c)
        return simmim_lib.masked_l1(jnp.asarray(images), rec, jnp.asarray(mask), p)

    tw = torch.tensor(w.T.reshape(c * p * p, d, 1, 1), requires_grad=True)
    z = torch.from_numpy(tokens).permute(0, 2, 1).reshape(b, d, grid, grid)
    x_rec = torch.nn.functional.pixel_shuffle(torch.nn.functional.conv2d(z, tw, torch.from_numpy(bias)), p)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    m = torch.from_numpy(mask).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()
    ref = (torch.nn.functional.l1_loss(x, x_rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / c
    ref.backward()
    loss, grad = jax.value_and_grad(ours)(jnp.asarray(w))
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), tw.grad.numpy()[:, :, 0, 0].T, rtol=1e-5, atol=1e-7)
    rec = np.asarray(simmim_lib.unpatchify(jnp.asarray(tokens) @ w + bias, (grid, grid), p, c))
    np.testing.assert_allclose(rec, x_rec.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_unmasked_tokens_do_not_see_the_mask_token(tiny_config):
    """The hook replaces exactly the masked patch embeddings (SimMIM's x * (1 - w) + t * w)."""
    from fmjax.objectives.base import make_objective
    obj = make_objective(tiny_config("simmim"))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    params, _ = obj.init(jax.random.PRNGKey(0), {"image": images})
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    zero = jnp.zeros((2, 8, 8), jnp.int32)
    full = jnp.ones((2, 8, 8), jnp.int32)
    r0, _ = obj.reconstruct(params, images, zero)
    r0b, _ = obj.reconstruct(params, images * 0 + 1.0, full)
    r1, _ = obj.reconstruct(params, images, full)
    assert not np.allclose(r0, r1)
    np.testing.assert_allclose(r1, r0b, rtol=1e-5, atol=1e-5)   # fully masked: the image is unseen


@pytest.mark.parametrize("override, match", [
    ({"objective.mask_patch_size": 6}, "multiple of the model's patch_size"),
    ({"objective.mask_ratio": 1.0}, "mask_ratio"),
    ({"objective.mask_patch_size": 12}, "image_size=32 must be a multiple"),
    # a model patch override without the pp's mask op (it would fail at the first step, in the backbone)
    ({"model.patch_size": 2}, r"masks 8-px patches on a grid of 4-px model patches, but "
                              r"config.model.patch_size=2 .* use simmim_mask\(<image size>, 8, 2, <ratio>\)"),
])
def test_config_errors(tiny_config, override, match):
    from fmjax.objectives.base import make_objective
    config = tiny_config("simmim", **override)
    with pytest.raises(ConfigError, match=match):
        make_objective(config).check(config)


def test_train_cli_refuses_a_pp_train_without_masks(tiny_config, tmp_path):
    from fmjax.train import loop
    config = tiny_config("simmim")
    config.data.pp_train = "normalize('imagenet')|keep('image')"
    with pytest.raises(ConfigError, match=r"batch keys \['image', 'mask'\]"):
        loop.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()
