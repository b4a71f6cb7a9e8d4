"""bf16 compute with f32 params: the step runs, params stay float32, the loss is finite."""
import math

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fmjax.train import loop


def test_bfloat16_compute_keeps_float32_params(tiny_config, tmp_path):
    c = tiny_config("mae", dtype="bfloat16", total_steps=2, checkpoint_every=2)
    final = loop.train_and_evaluate(c, str(tmp_path))
    assert math.isfinite(final["train/loss"])
    mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    state = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    assert dtypes == {jnp.dtype("float32")}
