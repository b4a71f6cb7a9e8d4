"""Helpers for tests of fmjax models (also handy when checking a converted checkpoint).

``perturb`` moves every param off its initial value: freshly initialised diffusion models
(U-Net, DiT) zero their output layers, so a parity or gradient test on raw init would
compare zeros.
"""
import jax
import jax.numpy as jnp
import numpy as np


def perturb(params, seed: int = 0, scale: float = 0.1):
    """``params`` plus ``scale`` * N(0, 1) noise on every leaf (NumPy RNG ``seed``), dtypes kept."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(np.shape(p)), p.dtype),
        params)


def normal_images(b: int = 2, size: int = 16, c: int = 3, seed: int = 0) -> jax.Array:
    """(b, size, size, c) float32 N(0, 1) images (channels last)."""
    return jax.random.normal(jax.random.PRNGKey(seed), (b, size, size, c))
