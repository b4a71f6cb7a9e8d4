"""fmjax.models.heads.MLPHead against a NumPy transcription of the references' heads."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from flax import traverse_util

from fmjax.models.heads import MLPHead


def _bn(x, scale=None, bias=None, eps=1e-5):
    m = x.mean(-2, keepdims=True)
    v = ((x - m) ** 2).mean(-2, keepdims=True)          # biased, as torch / TF / haiku in training
    y = (x - m) / np.sqrt(v + eps)
    return y * (1 if scale is None else scale) + (0 if bias is None else bias)


@pytest.mark.parametrize("kw,names", [
    (dict(hidden_bias=False, last_bn="scale", num_layers=3),              # SimCLR
     {"fc_0/kernel", "bn_0_scale", "bn_0_bias", "fc_1/kernel", "bn_1_scale", "bn_1_bias",
      "fc_2/kernel", "bn_2_scale"}),
    (dict(hidden_bias=False, last_bn="plain", num_layers=3),              # MoCo v3 projector
     {"fc_0/kernel", "bn_0_scale", "bn_0_bias", "fc_1/kernel", "bn_1_scale", "bn_1_bias", "fc_2/kernel"}),
    (dict(hidden_bias=True, last_bias=False, last_bn="none", num_layers=2),  # BYOL
     {"fc_0/kernel", "fc_0/bias", "bn_0_scale", "bn_0_bias", "fc_1/kernel"}),
])
def test_head_matches_numpy(kw, names):
    head = MLPHead(hidden_dim=12, out_dim=5, **kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6))
    params = nn.unbox(head.init(jax.random.PRNGKey(1), x)["params"])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    flat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
    assert set(flat) == names
    h = np.asarray(x, np.float64)
    n = kw["num_layers"]
    for i in range(n):
        h = h @ flat[f"fc_{i}/kernel"] + flat.get(f"fc_{i}/bias", 0)
        if i < n - 1 or kw["last_bn"] != "none":
            h = _bn(h, flat.get(f"bn_{i}_scale"), flat.get(f"bn_{i}_bias"))
        if i < n - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(head.apply({"params": params}, x)), h, rtol=1e-4, atol=1e-5)


def test_statistics_per_group():
    """[G, B, D]: each group is normalised by its own statistics (per-view BN)."""
    head = MLPHead(hidden_dim=4, out_dim=3, num_layers=1, last_bn="plain")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
    params = nn.unbox(head.init(jax.random.PRNGKey(1), x)["params"])
    both = head.apply({"params": params}, x)
    one = head.apply({"params": params}, x[1:] * 3.0 + 1.0)  # an affine change of one group's input
    np.testing.assert_allclose(np.asarray(both[1:]), np.asarray(one), atol=1e-4)
    np.testing.assert_allclose(np.asarray(both.mean(1)), 0, atol=1e-5)


def test_bad_args():
    with pytest.raises(ValueError, match="last_bn"):
        MLPHead(last_bn="x").init(jax.random.PRNGKey(0), jnp.ones((1, 2, 3)))
    with pytest.raises(ValueError, match="groups, batch, dim"):
        MLPHead().init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
