"""Mixup / CutMix of the supervised objective against timm's ``timm/data/mixup.py``.

``_timm_*`` below transcribe timm's ``rand_bbox``, ``cutmix_bbox_and_lam``, ``mixup_target``
and ``Mixup._mix_batch`` (mode 'batch', ``cutmix_minmax=None``, ``correct_lam=True``) to numpy
on NCHW arrays, with ``np.random.randint`` replaced by the injected box centre. Given the same
draws (lam, mixup or cutmix, centre), fmjax's on-device ``apply_mix`` gives the same images and
soft targets; ``sample_mix``'s draws have timm's distribution; with every option off the loss
is the old one bit for bit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fmjax.errors import ConfigError
from fmjax.objectives import supervised
from fmjax.testing import load_config


# -- numpy transcription of timm/data/mixup.py (torch -> numpy; the rng draws injected) --------

def _timm_one_hot(x, num_classes, on_value=1., off_value=0.):
    out = np.full((x.shape[0], num_classes), off_value, dtype=np.float32)
    out[np.arange(x.shape[0]), x] = on_value
    return out


def _timm_mixup_target(target, num_classes, lam=1., smoothing=0.0):
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    y1 = _timm_one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = _timm_one_hot(target[::-1], num_classes, on_value=on_value, off_value=off_value)
    return y1 * np.float32(lam) + y2 * np.float32(1. - lam)   # torch: float32 tensor * Python float


def _timm_rand_bbox(img_shape, lam, randint, margin=0., count=None):
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = randint(0 + margin_y, img_h - margin_y, size=count)
    cx = randint(0 + margin_x, img_w - margin_x, size=count)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + cut_h // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def _timm_cutmix_bbox_and_lam(img_shape, lam, randint, correct_lam=True):
    yl, yu, xl, xu = _timm_rand_bbox(img_shape, lam, randint)
    if correct_lam:
        bbox_area = (yu - yl) * (xu - xl)
        lam = 1. - bbox_area / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


def _timm_mix_batch(x, lam, use_cutmix, randint):
    """``Mixup._mix_batch`` after ``_params_per_batch`` returned ``(lam, use_cutmix)``."""
    x = x.copy()
    if lam == 1.:
        return x, 1.
    if use_cutmix:
        (yl, yh, xl, xh), lam = _timm_cutmix_bbox_and_lam(x.shape, lam, randint)
        x[:, :, yl:yh, xl:xh] = x[::-1].copy()[:, :, yl:yh, xl:xh]   # torch's flip copies
    else:
        x_flipped = x[::-1] * np.float32(1. - lam)
        x = x * np.float32(lam) + x_flipped
    return x, lam


def _timm_mixup(x_nchw, target, lam, use_cutmix, cy, cx, num_classes, smoothing):
    centres = iter([cy, cx])   # rand_bbox draws cy, then cx
    randint = lambda lo, hi, size=None: (lambda v: (np.testing.assert_(lo <= v < hi), v)[1])(next(centres))
    x, lam = _timm_mix_batch(x_nchw, lam, use_cutmix, randint)
    return x, _timm_mixup_target(target, num_classes, lam, smoothing), lam


# -- parity --------------------------------------------------------------------------------------

B, H, W, C, CLASSES, SMOOTH = 6, 12, 16, 3, 10, 0.1

CASES = [  # (lam, use_cutmix, cy, cx): interior, clipped at every border, odd cuts, empty box
    (0.3, True, 6, 8), (0.3, True, 0, 0), (0.3, True, 11, 15), (0.05, True, 2, 14),
    (0.9, True, 5, 3), (0.999, True, 7, 7), (0.0, True, 6, 8), (0.61, True, 1, 9),
    (0.3, False, 0, 0), (0.77, False, 4, 4), (0.0123, False, 0, 0),
    (1.0, False, 3, 3), (1.0, True, 3, 3),
]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, H, W, C)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=B).astype(np.int32)
    return images, labels


@pytest.fixture(scope="module")
def jit_apply():
    return jax.jit(lambda x, y, lam, cut, cy, cx: supervised.apply_mix(x, y, lam, cut, cy, cx, CLASSES, SMOOTH))


@pytest.mark.parametrize("lam, use_cutmix, cy, cx", CASES)
def test_apply_mix_equals_timm(batch, jit_apply, lam, use_cutmix, cy, cx):
    images, labels = batch
    lam32 = np.float32(lam)
    got_x, got_t, got_lam = jit_apply(images, labels, lam32, use_cutmix, np.int32(cy), np.int32(cx))
    want_x, want_t, want_lam = _timm_mixup(images.transpose(0, 3, 1, 2), labels, float(lam32),
                                           use_cutmix, cy, cx, CLASSES, SMOOTH)
    want_x = want_x.transpose(0, 2, 3, 1)
    if use_cutmix or lam == 1.0:   # pasted / untouched pixels are copies: exactly equal
        np.testing.assert_array_equal(np.asarray(got_x), want_x)
    else:
        np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(got_lam), want_lam, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_t).sum(-1), 1.0, atol=1e-6)


def test_cutmix_box_equals_timm_rand_bbox_everywhere():
    """Every centre of a 7 x 10 image for a spread of lams (odd and even cut sizes)."""
    h, w = 7, 10
    box = jax.jit(lambda lam, cy, cx: supervised.cutmix_box(lam, cy, cx, (h, w)))
    for lam in np.float32([0.0, 0.1, 0.25, 0.37, 0.5, 0.64, 0.81, 0.95, 0.999]):
        cy, cx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        (yl, yh, xl, xh), got_lam = jax.vmap(box, (None, 0, 0))(lam, cy.ravel(), cx.ravel())
        for i, (y, x) in enumerate(zip(cy.ravel(), cx.ravel())):
            centres = iter([y, x])
            want, want_lam = _timm_cutmix_bbox_and_lam((3, h, w), float(lam), lambda lo, hi, size=None: next(centres))
            assert (int(yl[i]), int(yh[i]), int(xl[i]), int(xh[i])) == tuple(int(v) for v in want), (lam, y, x)
            np.testing.assert_allclose(float(got_lam[i]), want_lam, atol=1e-7)


# -- the draws -------------------------------------------------------------------------------------

def _draws(n, **kw):
    keys = jax.random.split(jax.random.PRNGKey(42), n)
    f = jax.jit(jax.vmap(lambda k: supervised.sample_mix(k, image_hw=(H, W), **kw)))
    return [np.asarray(a) for a in f(keys)]


def test_sample_mix_distribution_deit():
    """DeiT / MAE settings: half CutMix (lam ~ Beta(1, 1)), half mixup (Beta(0.8, 0.8)), every
    batch mixed, the box centre uniform over the image."""
    n = 20000
    lam, cut, cy, cx = _draws(n, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    assert abs(cut.mean() - 0.5) < 0.02
    assert stats.kstest(lam[cut], stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(lam[~cut], stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest(lam[cut], stats.beta(0.8, 0.8).cdf).pvalue < 1e-6  # the test can tell them apart
    assert cy.min() == 0 and cy.max() == H - 1 and cx.min() == 0 and cx.max() == W - 1
    assert abs(np.bincount(cy, minlength=H) / n - 1 / H).max() < 0.01
    assert abs(np.bincount(cx, minlength=W) / n - 1 / W).max() < 0.01


@pytest.mark.parametrize("kw, p_cut, p_skip", [
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3), 0.6 * 0.3, 0.4),
    (dict(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0), 0.0, 0.0),
    (dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=0.5), 0.5, 0.5),
])
def test_sample_mix_switch_and_prob(kw, p_cut, p_skip):
    """``prob``: the unmixed share (lam = 1); ``switch_prob``: the CutMix share; the mixed
    lams of each kind ~ Beta(alpha, alpha). (A float32 Beta draw can
    round to 1.0 too: ~0.07% of Beta(0.4, 0.4) draws, ~2% of Beta(0.2, 0.2) ones; such a batch
    is mixed with weight 1 - lam < 6e-8, i.e. as good as unmixed.)"""
    n = 20000
    lam, cut, _, _ = _draws(n, **kw)
    assert abs(cut.mean() - p_cut) < 0.02 and abs((lam == 1.0).mean() - p_skip) < 0.02
    assert not (cut & (lam == 1.0)).any()   # timm: an unmixed batch has use_cutmix False
    for sel, alpha in ((cut, kw["cutmix_alpha"]), (~cut, kw["mixup_alpha"])):
        mixed = lam[sel & (lam < 1.0)]
        if alpha:
            assert stats.kstest(mixed, stats.beta(alpha, alpha).cdf).pvalue > 1e-3, (kw, alpha)
        else:
            assert mixed.size == 0


def test_sample_mix_is_deterministic():
    a = supervised.sample_mix(jax.random.PRNGKey(3), 0.8, 1.0, image_hw=(H, W))
    b = supervised.sample_mix(jax.random.PRNGKey(3), 0.8, 1.0, image_hw=(H, W))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- the objective -------------------------------------------------------------------------------

def _objective(**objective):
    c = load_config("finetune")
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    c.objective.update(objective)
    return c, supervised.make(c)


def _inputs(obj):
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % obj.num_classes
    batch = {"image": images, "label": labels}
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(5), p.shape), params)
    return params, extra, batch


def _old_loss(self, params, extra, batch, rng, step):
    """The supervised loss before mixup existed (verbatim)."""
    out = self.model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    logits = out["logits"].astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], self.num_classes), self.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    acc = (logits.argmax(-1) == batch["label"]).mean()
    return loss, ({"accuracy": acc}, extra)


def test_everything_off_is_the_old_loss_bit_for_bit():
    _, obj = _objective()     # the preset's keys, all off (drop path 0.1: the rng matters)
    assert not obj.mixing and obj.ema_decay == 0
    params, extra, batch = _inputs(obj)
    rng = jax.random.PRNGKey(7)
    new = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))(params, extra, batch, rng, 0)
    old = jax.jit(jax.value_and_grad(lambda *a: _old_loss(obj, *a), has_aux=True))(params, extra, batch, rng, 0)
    assert extra == {}
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_loss_is_soft_target_cross_entropy_of_the_mixed_batch():
    _, obj = _objective(mixup_alpha=0.8, cutmix_alpha=1.0)
    params, extra, batch = _inputs(obj)
    rng = jax.random.PRNGKey(7)
    loss, (metrics, extra_out) = jax.jit(obj.loss)(params, extra, batch, rng, 0)
    assert set(metrics) == {"accuracy", "mix_lam"} and extra_out == {}
    drop_rng, mix_rng = jax.random.split(rng)
    draws = supervised.sample_mix(mix_rng, 0.8, 1.0, 1.0, 0.5, (32, 32))
    x, t, lam = supervised.apply_mix(batch["image"], batch["label"], *draws, obj.num_classes, 0.1)
    logits = obj.model.apply({"params": params}, x, train=True, rngs={"dropout": drop_rng})["logits"]
    want = -(t * jax.nn.log_softmax(logits)).sum(-1).mean()   # DeiT's SoftTargetCrossEntropy
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mix_lam"]), float(lam))
    grads = jax.grad(lambda p: obj.loss(p, extra, batch, rng, 0)[0])(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_check_refuses_bad_values():
    for bad, match in ((dict(mixup_alpha=-1.0), "mixup_alpha"), (dict(mix_prob=1.5), "mix_prob"),
                       (dict(switch_prob=-0.1), "switch_prob"), (dict(ema_decay=1.0), "ema_decay")):
        c, obj = _objective(**bad)
        with pytest.raises(ConfigError, match=match):
            obj.check(c)
    c, obj = _objective(mixup_alpha=0.8)
    c.batch_size, c.grad_accum_steps = 30, 2   # micro-batch 15: odd
    with pytest.raises(ConfigError, match="even"):
        obj.check(c)
    c.batch_size = 32
    obj.check(c)
