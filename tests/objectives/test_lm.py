"""The 'lm' objective (causal LM on tokenized captions) and configs/gpt.py: the target mask,
the loss against a direct computation, config checks, and a short run whose validation
perplexity falls; generated captions decode through the words tokenizer."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import tokenizer as tk
from fmjax.errors import ConfigError
from fmjax.objectives import lm
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import make_mesh
from fmjax.testing import train_in_fresh_process
from fmjax.train import validate


def test_target_mask_stops_after_the_first_eot():
    eot = 9
    tokens = jnp.array([[8, 1, 2, 9, 0, 0], [8, 3, 9, 9, 4, 0]])
    np.testing.assert_array_equal(np.asarray(lm.target_mask(tokens, eot)),
                                  [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_loss_is_the_mean_nll_of_the_targets(tiny_config):
    c = tiny_config("gpt")
    obj = make_objective(c)
    assert obj.eot_token_id == 2047 and obj.batch_keys == ("tokens",)
    tok = tk.get_tokenizer("words", vocab_size=2048)
    batch = {"tokens": jnp.asarray(tok(["a red circle.", "a small blue star on the left."], 32))}
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    loss, (metrics, _) = obj.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
    logits = obj.model.apply({"params": params}, batch["tokens"])["logits"]
    logp = jax.nn.log_softmax(logits, -1)
    nll = []
    for row in np.asarray(batch["tokens"]):
        n = int(np.flatnonzero(row == 2047)[0])          # targets: tokens 1..n (eot included)
        nll.append([-float(logp[len(nll), t, row[t + 1]]) for t in range(n)])
    want = np.mean([v for r in nll for v in r])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert int(metrics["targets"]) == sum(map(len, nll))
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(want), rtol=1e-5)


def test_config_checks(tiny_config):
    c = tiny_config("gpt", **{"model.vocab_size": 1000})
    with pytest.raises(ConfigError, match="vocab_size"):
        validate.check(c, make_objective(c), make_mesh(c.mesh, jax.devices()[:1]), evals=False)
    c = tiny_config("gpt", **{"model.max_length": 16})
    with pytest.raises(ConfigError, match="max_length"):
        validate.check(c, make_objective(c), make_mesh(c.mesh, jax.devices()[:1]), evals=False)


@pytest.mark.optimized
@pytest.mark.slow
def test_default_preset_perplexity_falls(default_config, tmp_path):
    """configs/gpt.py shortened to 120 steps: the validation loss (log perplexity) falls far
    below its start (a uniform guess over 2048 ids is ln 2048 = 7.6)."""
    c = default_config("gpt")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 120, 20, 120, 120
    c.evals.val_loss.examples = 256
    state = train_in_fresh_process(c, str(tmp_path))   # one device, a fresh process: 11-16% faster
    assert state["step"] == 120
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    val = [r["eval/val_loss"] for r in rows if "eval/val_loss" in r]
    print("val loss", val)
    assert val[0] > 7.0 and val[-1] < 2.5
