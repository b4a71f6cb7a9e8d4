"""The ``sam`` objective: its losses, prompt sampling, the box-as-corner-points layout, a few
training steps and the mIoU evals (the CPU learning number is in configs/sam.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.objectives import sam as sam_lib
from fmjax.testing import load_config


def test_focal_and_dice_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    target = (rng.uniform(size=(2, 1, 8, 8)) > 0.5).astype(np.float32)
    p = 1 / (1 + np.exp(-logits))
    ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    focal = ((0.25 * target + 0.75 * (1 - target)) * ce * (1 - p_t) ** 2).mean((-2, -1))
    dice = 1 - (2 * (p * target).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + target.sum((-2, -1)) + 1)
    np.testing.assert_allclose(sam_lib.focal_loss(jnp.asarray(logits), jnp.asarray(target)), focal, rtol=1e-5)
    np.testing.assert_allclose(sam_lib.dice_loss(jnp.asarray(logits), jnp.asarray(target)), dice, rtol=1e-5)


def test_box_and_point_sampling():
    gt = np.zeros((3, 16, 16), bool)
    gt[0, 2:5, 3:9] = True
    gt[1, 10, 12] = True
    box = np.asarray(sam_lib.mask_box(jnp.asarray(gt)))
    np.testing.assert_array_equal(box, [[3, 2, 8, 4], [12, 10, 12, 10], [0, 0, 0, 0]])
    for seed in range(5):
        xy, found = sam_lib.sample_pixel(jax.random.PRNGKey(seed), jnp.asarray(gt))
        xy = np.asarray(xy).astype(int)
        assert list(np.asarray(found)) == [True, True, False]
        assert gt[0, xy[0, 1], xy[0, 0]] and tuple(xy[1]) == (12, 10)
    jit = np.asarray(sam_lib.jitter_box(jax.random.PRNGKey(0), jnp.asarray(box[:2]), 0.1, 2.0, 16))
    assert np.abs(jit - box[:2]).max() <= 2.0 + 1e-6 and (jit[:, 2] >= jit[:, 0]).all()
    assert np.asarray(sam_lib.mask_iou(jnp.asarray(gt[:1]), jnp.asarray(gt[:1]))) == 1.0


def _config():
    c = load_config("sam")
    c.model.update(dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), prompt_dim=32,
                        decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32))
    return c


def test_box_corners_as_points_are_box_tokens():
    from fmjax.models.registry import build_model
    model = build_model(_config().model)
    params = model.init(jax.random.PRNGKey(0), *model.init_inputs(1))["params"]
    box = jnp.array([[[3.0, 5.0, 40.0, 30.0]]])
    pe = lambda *a, **k: model.apply({"params": params}, *a, method=lambda m, *x, **kw: m.prompt_encoder(*x, **kw), **k)  # noqa: E731
    as_box, _ = pe(None, None, box)
    as_points, _ = pe(box.reshape(1, 1, 2, 2), jnp.array([[[2, 3]]]))
    np.testing.assert_allclose(as_points[:, :, :2], as_box, atol=1e-6)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 3, 64, 64), np.uint8)
    for b in range(4):
        for k in range(3):
            y, x = rng.integers(4, 40, 2)
            masks[b, k, y:y + 16, x:x + 20] = 1
    return dict(image=jnp.asarray(rng.normal(size=(4, 64, 64, 3)).astype(np.float32)),
                masks=jnp.asarray(masks), num_objects=jnp.array([3, 2, 1, 3], jnp.int32))


def test_training_steps_lower_the_loss_and_evals_are_per_image(batch):
    import optax
    from fmjax.objectives.base import make_objective
    objective = make_objective(_config())
    params, extra = objective.init(jax.random.PRNGKey(0), batch)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        (loss, (metrics, _)), grads = jax.value_and_grad(objective.loss, has_aux=True)(
            params, extra, batch, rng, 0)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, metrics

    losses = []
    for i in range(30):
        params, opt, loss, metrics = step(params, opt, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert float(metrics["instances"]) == 9.0  # 3 + 2 + 1 + 3 present instances
    ev = jax.jit(objective.eval_metrics)(params, extra, batch, jax.random.PRNGKey(0))
    assert set(ev) == {"miou_box", "miou_1pt", "miou_1pt_oracle", "miou_3pt"}
    for v in ev.values():
        assert v.shape == (4,) and (np.asarray(v) >= 0).all() and (np.asarray(v) <= 1).all()


def test_remat_rounds_keeps_the_loss_and_gradients(batch):
    """``objective.remat_rounds`` (the paper presets) recomputes each round's decoder pass and
    full-resolution loss in the backward pass: the same loss and gradients."""
    from fmjax.objectives.base import make_objective
    c = _config()
    plain = make_objective(c)
    c.objective.remat_rounds = True
    remat = make_objective(c)
    params, extra = plain.init(jax.random.PRNGKey(0), batch)
    grad = lambda o: jax.jit(jax.value_and_grad(lambda p: o.loss(p, extra, batch, jax.random.PRNGKey(3), 0)[0]))(params)  # noqa: E731
    (la, ga), (lb, gb) = grad(plain), grad(remat)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    # recomputation fuses differently: float32 sums over the full-resolution pixels differ by
    # ~3e-6 of the largest gradient; a gradient lost by the remat would be off by O(1)
    atol = 1e-5 * max(float(np.abs(g).max()) for g in jax.tree.leaves(ga))
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


def test_image_size_must_match_the_model(tmp_path):
    from fmjax.errors import ConfigError
    from fmjax.objectives.base import make_objective
    c = _config()
    c.data.image_size = 32
    with pytest.raises(ConfigError, match="SAM model takes 64 px"):
        make_objective(c).check(c)


@pytest.mark.parametrize("override, message", [
    ({"interaction": "sam3"}, "interaction='sam3'; valid: 'fmjax', 'sam2'"),
    ({"round_reduction": "max"}, "round_reduction='max'; valid: 'mean', 'sum'"),
    ({"iou_loss": "huber"}, "iou_loss='huber'; valid: 'mse', 'l1'"),
    ({"click_from_gt_prob": 1.5, "interaction": "sam2"}, "click_from_gt_prob=1.5; must be in [0, 1]"),
    ({"click_from_gt_prob": 0.1}, "set --config.objective.interaction=sam2 too"),
])
def test_reference_option_errors(override, message):
    from fmjax.errors import ConfigError
    from fmjax.objectives.base import make_objective
    c = _config()
    c.objective.update(override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_objective(c).check(c)


def test_sam2_clicks():
    """SAM 2's sample_random_points_from_errors: a false negative gives a positive click, a
    false positive a negative one, an exact prediction a negative click on the background;
    the click is the argmax of the noise over the error pixels."""
    gt = np.zeros((3, 8, 8), bool)
    gt[:, 2:5, 2:5] = True
    pred = gt.copy()
    pred[0, 3, 3] = False          # row 0: one false negative at (x 3, y 3)
    pred[1, 6, 1] = True           # row 1: one false positive at (x 1, y 6)
    noise = np.random.default_rng(0).uniform(size=(3, 8, 8, 2)).astype(np.float32)
    xy, label = map(np.asarray, sam_lib.SAMObjective.sam2_click(jnp.asarray(gt), jnp.asarray(pred),
                                                                 jnp.asarray(noise)))
    assert xy[0].tolist() == [3, 3] and label[0] == 1
    assert xy[1].tolist() == [1, 6] and label[1] == 0
    bg = ~gt[2]
    y, x = np.unravel_index(np.argmax(np.where(bg, noise[2, ..., 0], -1)), bg.shape)
    assert xy[2].tolist() == [x, y] and label[2] == 0


def test_paper_preset_compiles_with_synthetic_instance_masks(tmp_path):
    """configs/sam.py:sa1b_vit_b (the SA-1B recipe: 64 masks per image, multistep lr, layer-wise
    decay, remat, bf16) through launch/compile.py, shrunk to the small encoder at 64 px and one
    correction round: the batch spec carries synthetic instance masks (no SA-1B reader is
    needed to compile). The full preset's memory on v5p-512 is in configs/sam.py's docstring."""
    import json
    from fmjax.testing import run_cli
    out = tmp_path / "r.json"
    pp = load_config("sam", "sa1b_vit_b").data.pp_train.replace("1024", "64")
    proc = run_cli("compile", "--config=configs/sam.py:sa1b_vit_b", "--topology=cpu-2",
                   "--config.model.variant=", "--config.data.image_size=64", "--config.data.max_instances=4",
                   f"--config.data.pp_train={pp}",
                   "--config.batch_size=4", "--config.objective.correction_rounds=1", "--eval_step=false",
                   f"--out={out}", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["batch_spec"]["masks"] == {"shape": [4, 4, 64, 64], "dtype": "uint8"}
    assert r["remat"] is True and r["dtype"] == "bfloat16" and r["global_batch"] == 4
