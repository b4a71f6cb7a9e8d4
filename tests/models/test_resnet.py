"""fmjax.models.resnet: the variants' sizes (torchvision's parameter counts), the stems, the
width multiplier, zero-init residuals, remat, the backbone contract and one-line errors.
Parity with transformers' ResNet is tests/interop/test_resnet_parity.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fmjax.models.registry import build_model, capabilities, state_collections
from fmjax.models.resnet import ResNet, resnet_kwargs


def _count(tree):
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


@pytest.mark.parametrize("variant, count", [("18", 11_689_512), ("34", 21_797_672), ("50", 25_557_032),
                                            ("101", 44_549_160)])
def test_variants_have_torchvisions_parameter_counts(variant, count):
    m = ResNet(**resnet_kwargs(variant, num_classes=1000))
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    assert _count(shapes["params"]) == count
    out = jax.eval_shape(lambda: m.apply(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))),
                                         jnp.zeros((2, 224, 224, 3))))
    assert out["logits"].shape == (2, 1000) and out["patch_tokens"].shape == (2, 49, m.width)
    assert [f.shape[1] for f in out["feature_maps"]] == [56, 28, 14, 7]


def test_width_multiplier_and_cifar_stem():
    kw = resnet_kwargs("50", width_multiplier=2)
    assert kw["stem_width"] == 128 and tuple(kw["dims"]) == (512, 1024, 2048, 4096)
    shapes = jax.eval_shape(lambda: ResNet(**kw).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    assert 93e6 < _count(shapes["params"]) < 94e6    # SimCLR's ResNet-50 (2x): 94M with its head
    m = ResNet(**resnet_kwargs("18", stem="cifar", num_classes=10))
    out = jax.eval_shape(lambda: m.apply(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))),
                                         jnp.zeros((2, 32, 32, 3))))
    assert [f.shape[1] for f in out["feature_maps"]] == [32, 16, 8, 4] and m.patch_size == 8
    with pytest.raises(ValueError, match="width_multiplier=0"):
        resnet_kwargs("50", width_multiplier=0)


def _small(**kw):
    return ResNet(**{**dict(depths=(1, 2), dims=(16, 32), stem_width=8, stem="cifar", num_classes=4), **kw})


def test_zero_init_residual_makes_each_block_its_input_after_relu():
    m = _small(zero_init_residual=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    v = m.init(jax.random.PRNGKey(1), x)
    scales = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(v["params"])
              if "conv3" in jax.tree_util.keystr(p) and "scale" in jax.tree_util.keystr(p)]
    assert len(scales) == 3 and all(float(jnp.abs(s).max()) == 0.0 for s in scales)
    maps = m.apply(v, x)["feature_maps"]
    # stage 1's block 1 has no shortcut conv: with conv3's BN scale 0 it returns relu(input) =
    # its input, so dropping it changes nothing; without zero init it does.
    drop = lambda tree: {k: val for k, val in tree.items() if k != "stage_1_block_1"}  # noqa: E731
    short = _small(zero_init_residual=True, depths=(1, 1))
    v_short = {c: drop(t) for c, t in v.items()}
    np.testing.assert_array_equal(np.asarray(short.apply(v_short, x)["feature_maps"][1]), np.asarray(maps[1]))
    plain = _small()
    vp = plain.init(jax.random.PRNGKey(1), x)
    assert not np.allclose(np.asarray(_small(depths=(1, 1)).apply({c: drop(t) for c, t in vp.items()}, x)["feature_maps"][1]),
                           np.asarray(plain.apply(vp, x)["feature_maps"][1]))


def test_remat_gives_the_same_outputs_and_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    plain, rem = _small(), _small(remat=True)
    v = plain.init(jax.random.PRNGKey(1), x)

    def loss(model, p):
        out, state = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(out["logits"] ** 2), state
    (l1, s1), g1 = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(v["params"])
    (l2, s2), g2 = jax.value_and_grad(lambda p: loss(rem, p), has_aux=True)(v["params"])
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_backbone_contract_and_registry():
    cfg = ml_collections.ConfigDict(dict(name="resnet", variant="18", num_classes=0, stem="cifar"))
    m = build_model(cfg, "float32")
    assert capabilities(m) == {"pooled", "tokens", "any_resolution"}
    assert state_collections(m) == ("batch_stats",)
    cfg.num_classes = 8
    assert "classifier" in capabilities(build_model(cfg, "float32"))


@pytest.mark.parametrize("kw, match", [(dict(block="wide"), "block='wide'"), (dict(stem="patch"), "stem='patch'"),
                                       (dict(dims=(16, 30)), "must divide by 4"),
                                       (dict(depths=(1,)), "differ in length")])
def test_errors_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        _small(**kw).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
