"""The diffusion objective: EMA = diffusers ``EMAModel``, condition dropout uses the null
class, sampling sharded over 8 devices = 1 device, and a tiny run through the trainer."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.evals import generation as gen_lib
from fmjax.objectives.diffusion import ema_decay, make
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.testing import perturb
from fmjax.train import loop

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers.training_utils import EMAModel  # noqa: E402


def _perturb(tree, seed=0, scale=0.1):
    """Random offsets on every param: a fresh U-Net's zero-init output layers ignore the input."""
    return perturb(tree, seed, scale)


def _init(objective, batch_size=4, seed=0):
    size = int(objective.config.data.image_size)
    batch = {"image": jnp.zeros((batch_size, size, size, 3)), "label": jnp.zeros((batch_size,), jnp.int32)}
    params, extra = jax.jit(objective.init)(jax.random.PRNGKey(seed), batch)
    params = _perturb(params, seed)
    return params, dict(extra, ema=_perturb(params, seed + 1, 0.02))


# -- EMA ------------------------------------------------------------------------------------------

EMA_CASES = [
    dict(decay=0.9, min_decay=0.0, update_after_step=0, use_ema_warmup=False, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.999, min_decay=0.0, update_after_step=0, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4),
    dict(decay=0.95, min_decay=0.5, update_after_step=5, use_ema_warmup=False, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.9999, min_decay=0.0, update_after_step=3, use_ema_warmup=True, inv_gamma=2.0, power=2 / 3),
]


@pytest.mark.parametrize("ema", EMA_CASES, ids=["plain", "warmup", "after5_min", "warmup_after3_gamma2"])
def test_ema_equals_diffusers_ema_model(tiny_config, ema):
    """``ema_decay`` = ``EMAModel.get_decay`` and ``after_update`` = ``EMAModel.step`` for 30
    updates of changing params (step i of the trainer is diffusers' optimization_step i + 1)."""
    objective = make(tiny_config("diffusion", **{"objective.ema": ema}))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    reference = EMAModel(module.parameters(), **ema)
    as_tree = lambda: {n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()}
    extra = {"ema": as_tree()}
    rng = np.random.default_rng(0)
    for step in range(30):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        reference.step(module.parameters())
        params = as_tree()
        extra = objective.after_update(params, extra, jnp.int32(step))
        np.testing.assert_allclose(float(ema_decay(step + 1, **ema)), reference.cur_decay_value,
                                   rtol=1e-6, atol=1e-7, err_msg=f"decay at step {step}")
        np.testing.assert_allclose(float(ema_decay(step + 1, **ema)), reference.get_decay(step + 1),
                                   rtol=1e-6, atol=1e-7)
        for (name, _), shadow in zip(module.named_parameters(), reference.shadow_params):
            np.testing.assert_allclose(np.asarray(extra["ema"][name]), shadow.numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} at step {step}")
    assert reference.cur_decay_value > 0  # the comparison covered non-trivial decays


# -- loss -----------------------------------------------------------------------------------------

def test_condition_dropout_uses_the_null_class(tiny_config):
    """cond_drop_prob=1: every label is replaced by the null class (index num_classes), so the
    loss does not depend on the labels and equals the loss of explicit null labels."""
    dropped = make(tiny_config("diffusion", **{"objective.cond_drop_prob": 1.0}))
    kept = make(tiny_config("diffusion", **{"objective.cond_drop_prob": 0.0}))
    params, extra = _init(kept)
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
    rng = jax.random.PRNGKey(2)

    fns = {id(o): jax.jit(lambda p, e, x, y, o=o: o.loss(p, e, {"image": x, "label": y}, rng, 0)[0])
           for o in (dropped, kept)}

    def loss(objective, labels):
        return float(fns[id(objective)](params, extra, images, jnp.asarray(labels, jnp.int32)))

    null = kept.num_classes
    a, b = loss(dropped, [0, 1, 2, 3]), loss(dropped, [7, 6, 5, 4])
    assert a == b
    np.testing.assert_allclose(a, loss(kept, [null] * 4), rtol=1e-6)
    assert abs(loss(kept, [0, 1, 2, 3]) - loss(kept, [7, 6, 5, 4])) > 1e-6  # labels do matter


# -- sharded sampling -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [dict(sampler="ddim", eta=0.0), dict(sampler="ddpm")])
def test_sharded_sampling_equals_one_device(tiny_config, sampler):
    """The same seed gives the same images on 8 devices (batch split over 'data') as on 1,
    with classifier-free guidance; DDIM (eta 0) samples also do not depend on the batch size."""
    config = tiny_config("diffusion")
    objective = make(config)
    params, extra = _init(objective)
    labels = {"label": np.arange(8, dtype=np.int32) % objective.num_classes}
    rules = get_rules(config.sharding)
    kw = dict(num_steps=3, guidance_scale=2.0, **sampler)
    mesh8 = make_mesh(config.mesh)
    assert mesh8.shape["data"] == 8
    one = gen_lib.Generator(objective, make_mesh(config.mesh, jax.devices()[:1]), rules, 8, **kw)
    eight = gen_lib.Generator(objective, mesh8, rules, 8, **kw)
    a = one(params, extra, labels, seed=3)
    b = eight(params, extra, labels, seed=3)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert a.std() > 5  # not a constant picture
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (a == b).mean() > 0.999
    assert not np.array_equal(a, one(params, extra, labels, seed=4))
    if sampler["sampler"] == "ddim":
        # 12 samples in batches of 8 (the second padded) = in one batch of 16.
        twelve = {"label": np.arange(12, dtype=np.int32) % objective.num_classes}
        c = gen_lib.Generator(objective, mesh8, rules, 8, **kw)(params, extra, twelve, seed=3)
        d = gen_lib.Generator(objective, mesh8, rules, 16, **kw)(params, extra, twelve, seed=3)
        assert np.abs(c.astype(int) - d.astype(int)).max() <= 1
        assert np.abs(c[:8].astype(int) - b.astype(int)).max() <= 1


def test_generator_batch_rounds_up_to_the_data_parallel_size(tiny_config):
    config = tiny_config("diffusion")
    objective = make(config)
    g = gen_lib.Generator(objective, make_mesh(config.mesh), get_rules(config.sharding), 5)
    assert g.batch_size == 8


# -- training -------------------------------------------------------------------------------------

def test_tiny_training_run_writes_samples(tiny_config, tmp_path):
    """Two steps through the trainer; the ``images`` eval writes the EMA sample grid."""
    config = tiny_config("diffusion", total_steps=2, eval_every=2, checkpoint_every=2,
                         evals={"samples": {"type": "images", "split": "validation"}})
    final = loop.train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 2 and np.isfinite(final["train/loss"])
    pngs = os.listdir(tmp_path / "images")
    assert any("samples" in p and p.endswith(".png") for p in pngs), pngs
    from PIL import Image
    picture = np.asarray(Image.open(tmp_path / "images" / sorted(p for p in pngs if "samples" in p)[-1]))
    assert picture.ndim == 3 and picture.shape[0] > 8 * 32  # a row per class (8 classes)


def test_text_conditional_sampling(default_config):
    """Prompts tokenized with the config's ``data.tokenize`` condition the samples (8 devices)."""
    from fmjax.data.text_ops import tokenize_texts
    from fmjax.train.sample import parse_prompts
    config = default_config("diffusion", "text")
    config.model.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
    config.objective.text.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=16))
    objective = make(config)
    size = config.data.image_size
    batch = {"image": jnp.zeros((2, size, size, 3)), "tokens": jnp.zeros((2, 32), jnp.int32)}
    params, _ = jax.jit(objective.init)(jax.random.PRNGKey(0), batch)
    params = _perturb(params)
    prompts = parse_prompts(" a red circle ; a blue square;")
    assert prompts == ["a red circle", "a blue square"]
    tokens = tokenize_texts(config, prompts)
    assert tokens.shape == (2, config.data.tokenize.context_length) and tokens.dtype == np.int32
    g = gen_lib.Generator(objective, make_mesh(config.mesh), get_rules(config.sharding), 8, num_steps=2)
    images = g(params, {"ema": params}, {"tokens": np.repeat(tokens, 4, axis=0)}, seed=0)
    assert images.shape == (8, size, size, 3)
    # Sample 0 keeps its x_T (seed, index) but gets the other prompt: another picture.
    swapped = g(params, {"ema": params}, {"tokens": np.repeat(tokens[::-1], 4, axis=0)}, seed=0)
    assert np.abs(images[0].astype(int) - swapped[0].astype(int)).max() > 1
