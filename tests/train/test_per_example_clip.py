"""Per-example gradient clipping (``optimizer.clip_mode='per_example'``; scenic's
``per_example_clipping``, as OWL-ViT trains): the step's update is the mean of the examples'
gradients, each clipped to the norm on its own, and its refusals (the OWL options that go with
it: tests/objectives/test_owl.py; the whole recipe against scenic:
tests/reference/test_owl_trajectory.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import TrainState
from fmjax.train.step import make_train_step, per_example_clip_norm


class _Regression:
    """Squared error of a 2-layer MLP; dropout-like noise from the step's key, so the
    per-example keys are part of what is checked."""
    couples_examples = ""

    def __init__(self, noise=0.0):
        self.noise = noise

    def loss(self, params, extra, batch, rng, step):
        x = batch["x"] + self.noise * jax.random.normal(rng, batch["x"].shape)
        h = jnp.tanh(x @ params["w"] + params["b"])
        out = h @ params["v"]
        loss = jnp.mean(jnp.sum(jnp.square(out - batch["y"]), -1))
        return loss, ({"mean_out": out.mean()}, extra)

    def after_update(self, params, extra, step):
        return extra


def _setup(clip, mode="per_example", name="sgd"):
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"w": jax.random.normal(k[0], (4, 8)), "b": jax.random.normal(k[1], (8,)),
              "v": jax.random.normal(k[2], (8, 3))}
    batch = {"x": jax.random.normal(k[3], (6, 4)) * jnp.arange(1, 7)[:, None],   # spread-out norms
             "y": jax.random.normal(k[4], (6, 3))}
    opt = dict(name=name, lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0, decay="constant",
               clip_norm=clip, clip_mode=mode)
    tx, schedule = opt_lib.make_optimizer(opt, total_steps=4, global_batch=6)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra={},
                       rng=jax.random.PRNGKey(1))
    return opt, tx, schedule, state, batch


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_update_is_the_mean_of_the_clipped_per_example_gradients(noise):
    clip = 50.0
    opt, tx, schedule, state, batch = _setup(clip)
    objective = _Regression(noise)
    step = jax.jit(make_train_step(objective, tx, schedule, rules=(),
                                   per_example_clip=per_example_clip_norm(opt)))
    new, metrics = step(state, batch)

    rng = jax.random.fold_in(state.rng, state.step)      # the step's key; example i: fold_in(., i)
    grads, norms, losses = [], [], []
    for i in range(6):
        one = jax.tree.map(lambda x: x[i:i + 1], batch)
        (loss, _), g = jax.value_and_grad(objective.loss, has_aux=True)(
            state.params, {}, one, jax.random.fold_in(rng, i), state.step)
        n = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
        grads.append(jax.tree.map(lambda x: x / max(n / clip, 1.0), g))
        norms.append(n)
        losses.append(float(loss))
    assert 0 < sum(n > clip for n in norms) < 6, norms       # some clipped, some not
    want = jax.tree.map(lambda p, *gs: p - np.mean(gs, 0), state.params, *grads)   # SGD, lr 1
    # gradients of ~50 land on params of ~1: rounding of 1e-7 x 50
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5), new.params, want)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(metrics["clipped_fraction"]) == pytest.approx(np.mean([n > clip for n in norms]))


def test_a_large_norm_gives_the_batch_gradient():
    """Nothing clipped: a per-example-mean loss's step equals the plain batch step."""
    opt, tx, schedule, state, batch = _setup(1e9)
    per_example = jax.jit(make_train_step(_Regression(), tx, schedule, rules=(),
                                          per_example_clip=per_example_clip_norm(opt)))
    plain = jax.jit(make_train_step(_Regression(), tx, schedule, rules=()))
    a, ma = per_example(state, batch)
    b, mb = plain(state, batch)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(ma["clipped_fraction"]) == 0.0


def test_optimizer_side_of_per_example_clipping():
    # the optimizer leaves the clipping to the step: the transformation is the unclipped one
    opt, tx, schedule, state, batch = _setup(0.01)
    g = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), state.params)
    updates, _ = tx.update(g, tx.init(state.params), state.params)
    assert float(jnp.abs(updates["v"]).max()) == pytest.approx(100.0)
    assert per_example_clip_norm(opt) == 0.01
    assert per_example_clip_norm(dict(opt, clip_mode="global")) == 0.0
    assert per_example_clip_norm(dict(opt, clip_norm=0.0)) == 0.0
    with pytest.raises(ValueError, match="frozen"):
        opt_lib.make_optimizer(dict(opt, frozen=("w",)), total_steps=4, global_batch=6)
    with pytest.raises(ValueError, match="per_example"):
        opt_lib.make_optimizer(dict(opt, clip_mode="per_batch"), total_steps=4, global_batch=6)


def test_refused_for_coupled_losses_and_accumulation(tiny_config, tmp_path):
    from fmjax.train import loop
    _, tx, schedule, _, _ = _setup(1.0)
    coupled = _Regression()
    coupled.couples_examples = "a softmax over the batch"
    with pytest.raises(ValueError, match="couples the examples.*softmax over the batch"):
        make_train_step(coupled, tx, schedule, rules=(), per_example_clip=1.0)
    with pytest.raises(ValueError, match="grad_accum_steps=2"):
        make_train_step(_Regression(), tx, schedule, rules=(), accum_steps=2, per_example_clip=1.0)
    config = tiny_config("clip")           # CLIP's in-batch negatives couple the examples
    config.optimizer.update(dict(clip_norm=1.0, clip_mode="per_example"))
    with pytest.raises(ConfigError, match="clip_mode='per_example'.*objective 'clip'"):
        loop.check_config(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
