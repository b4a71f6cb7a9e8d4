"""Gradient accumulation that keeps the full batch's loss (``config.grad_accum_steps``).

CLIP's negatives, DINO's center and the linear probe's batch norm couple the examples of a
batch, so summing micro-batch gradients is not the full batch's gradient (shown below for
CLIP). Their ``embed`` / ``loss_from_embeddings`` hooks let the trainer cache every
micro-batch's embeddings and run the loss once on the whole batch
(``fmjax.train.step.cached_embedding_loss_and_grad``, open_clip's ``accum_freq``): loss,
metrics, objective state and gradients (the logit scale and bias included) equal the
unaccumulated step's, also with dropout (the same per-micro-batch draws in both passes), on
8 devices and with ``loss_impl='ring'``. A loss that couples examples without the hooks, and
DINO with a BatchNorm head, are refused with one line.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import pipeline
from fmjax.errors import ConfigError
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.testing import load_config
from fmjax.train import optimizer as opt_lib
from fmjax.train import validate
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import (_merge_micro, _split_micro, cached_embedding_loss_and_grad,
                              jit_train_step, make_train_step)

pytestmark = pytest.mark.optimized  # reads the compiled program's memory analysis (tests/conftest.py)

K = 4  # micro-batches
RTOL, ATOL = 1e-5, 1e-5
CTX, VOCAB = 8, 64


def _clip_config(kind="softmax", batch_size=16, **model):
    c = load_config("clip")
    c.model.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, embed_dim=8,
                        text_width=16, text_depth=1, text_heads=2, text_mlp_dim=32,
                        vocab_size=VOCAB, context_length=CTX, stem="patch",
                        loss=kind.split("_")[0], **model))
    c.data.tokenize = dict(c.data.tokenize, vocab_size=VOCAB, context_length=CTX)
    c.objective.hard_negatives = kind.endswith("_neg")
    c.batch_size = batch_size
    return c


def _clip_batch(config, b, seed=0):
    r = np.random.default_rng(seed)
    batch = dict(image=r.normal(size=(b, 16, 16, 3)).astype(np.float32),
                 tokens=r.integers(1, VOCAB, size=(b, CTX)).astype(np.int32))
    if config.objective.hard_negatives:
        batch.update(neg_tokens=r.integers(1, VOCAB, size=(b, CTX)).astype(np.int32),
                     neg_valid=(np.arange(b) % 4 != 3).astype(np.int32))  # some missing
    return batch


def _unbox(tree):
    return nn.meta.unbox(tree)  # init's LogicallyPartitioned boxes -> arrays


def _full(objective, params, extra, batch, rng):
    """The unaccumulated step's (loss, metrics, extra, grads)."""
    vg = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, (metrics, extra)), grads = jax.jit(vg)(params, extra, batch, rng, 0)
    return jax.device_get((loss, metrics, extra, grads))


def _cached(objective, params, extra, batch, rng, k=K):
    fn = jax.jit(lambda p, e, b: cached_embedding_loss_and_grad(objective, p, e, b, rng, 0, k))
    return jax.device_get(fn(params, extra, batch))


def _assert_close(a, b, what, rtol=RTOL, atol=ATOL):
    """Each leaf within rtol, with atol relative to the leaf's largest entry: a gradient summed
    over micro-batches cancels to near zero in some entries of a tensor whose scale is ~60, and
    float32's summation order then shows as ~2e-5 absolute there (seen once in a full suite:
    text pos_embed, 0.64153 vs 0.64155 in a tensor up to 61)."""
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for (path, x), y in zip(la, lb):
        scale = max(1.0, float(np.max(np.abs(np.asarray(y))))) if np.size(y) else 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _setup(config, b=16):
    objective = make_objective(config)
    batch = _clip_batch(config, b)
    params, extra = _unbox(objective.init(jax.random.PRNGKey(0), batch))
    return objective, batch, params, extra


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "softmax_neg"])
def test_cached_accumulation_equals_the_full_batch(kind):
    """Loss, accuracies and every gradient (towers, logit scale, SigLIP's bias) of 4
    micro-batches equal the full batch's to float32 noise."""
    objective, batch, params, extra = _setup(_clip_config(kind))
    rng = jax.random.PRNGKey(1)
    loss, metrics, _, grads = _full(objective, params, extra, batch, rng)
    loss_k, metrics_k, _, grads_k = _cached(objective, params, extra, batch, rng)
    np.testing.assert_allclose(loss_k, loss, rtol=RTOL)
    for k in ("i2t_acc", "t2i_acc", "logit_scale"):
        assert float(metrics_k[k]) == float(metrics[k]), k
    assert abs(float(grads["logit_scale"])) > 1e-3  # the loss's own params get a gradient ...
    if kind.startswith("sigmoid"):
        assert abs(float(grads["logit_bias"])) > 1e-3
    _assert_close(grads_k, grads, "grads")          # ... once, not once per micro-batch


def test_plain_micro_batch_accumulation_is_not_the_full_batch_gradient():
    """What ``grad_accum_steps`` did before for CLIP (each micro-batch's loss over its own
    negatives, gradients averaged) is far from the full batch's gradient: the test above
    can tell the two apart."""
    objective, batch, params, extra = _setup(_clip_config("softmax"))
    rng = jax.random.PRNGKey(1)
    loss, _, _, grads = _full(objective, params, extra, batch, rng)
    vg = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    micro = _split_micro(batch, K)
    outs = [vg(params, extra, jax.tree.map(lambda x: x[i], micro), jax.random.fold_in(rng, i), 0)
            for i in range(K)]
    plain = jax.tree.map(lambda *g: sum(g) / K, *[o[1] for o in outs])
    plain_loss = sum(float(o[0][0]) for o in outs) / K
    assert plain_loss < float(loss) - 0.5  # 4 negatives instead of 16: an easier task
    rel = [np.abs(a - b).max() / np.abs(b).max()
           for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads))]
    assert max(rel) > 0.05, max(rel)


def test_exact_with_dropout():
    """With dropout and drop path, micro-batch i draws ``fold_in(rng, i)`` in the cached and
    in the recomputed pass: the gradient is exactly that of the full-batch loss of those
    draws (here differentiated in one piece, without caching)."""
    objective, batch, params, extra = _setup(_clip_config("sigmoid_neg", dropout=0.3,
                                                          drop_path=0.2))
    rng = jax.random.PRNGKey(1)

    def reference(p):
        micro = _split_micro(batch, K)
        embs = [objective.embed(p, extra, jax.tree.map(lambda x: x[i], micro),
                                jax.random.fold_in(rng, i), 0) for i in range(K)]
        emb = _merge_micro(jax.tree.map(lambda *e: jnp.stack(e), *embs))
        return objective.loss_from_embeddings(p, extra, emb, batch, rng, 0)

    (loss, _), grads = jax.device_get(jax.jit(jax.value_and_grad(reference, has_aux=True))(params))
    loss_k, _, _, grads_k = _cached(objective, params, extra, batch, rng)
    np.testing.assert_allclose(loss_k, loss, rtol=RTOL)
    _assert_close(grads_k, grads, "grads")
    loss_1 = _full(objective, params, extra, batch, rng)[0]
    assert abs(float(loss_1) - float(loss)) > 1e-4  # the dropout draws really differ from K=1's


def _train_step(config, batch, devices=8):
    """One jitted trainer step (SGD, lr 0.5) on (data, fsdp) = (2, 4): (metrics, init params,
    new params, compiled HLO text)."""
    objective = make_objective(config)
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices()[:devices])
    rules = get_rules(config.sharding)
    config.optimizer.update(dict(name="sgd", lr=0.5, lr_scaling="none", momentum=0.0,
                                 warmup_steps=0, decay="constant", clip_norm=0.0))
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    init = jax.device_get(state.params)
    step = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps)
    jitted = jit_train_step(step, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    with mesh_context(mesh):  # as fmjax/train/loop.py: the ring finds the mesh
        compiled = jitted.lower(state, spec).compile()
    state, metrics = compiled(state, pipeline.global_batch(batch, mesh))
    return jax.device_get(metrics), init, jax.device_get(state.params), compiled.as_text()


def test_train_step_on_8_devices_gathered_and_ring():
    """The trainer's step on 8 devices (4 micro-batches of 8, one example per device each):
    the same loss, accuracies, gradient norm and updated params as the unaccumulated step,
    with the gathered loss and with the ring (which runs on the merged full batch)."""
    def config(accum, impl):
        c = _clip_config("sigmoid_neg", batch_size=32)
        c.grad_accum_steps, c.objective.loss_impl = accum, impl
        return c

    batch = _clip_batch(config(1, "gathered"), 32)
    metrics, init, params, _ = _train_step(config(1, "gathered"), batch)
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(init)))
    assert moved > 1e-3
    for impl in ("gathered", "ring"):
        metrics_k, init_k, params_k, hlo = _train_step(config(K, impl), batch)
        assert ("collective-permute" in hlo) == (impl == "ring")
        _assert_close(init_k, init, "init", rtol=0, atol=0)
        for k in ("loss", "i2t_acc", "t2i_acc", "logit_scale", "grad_norm"):
            np.testing.assert_allclose(metrics_k[k], metrics[k], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{impl} {k}")
        _assert_close(params_k, params, f"{impl} params")


# -- the other objectives whose loss couples examples ----------------------------------------

def _dino(**objective):
    c = load_config("dino")
    c.model.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, drop_path=0.0))
    c.objective.update(dict(out_dim=32, hidden_dim=16, bottleneck_dim=8, num_local_crops=2,
                            **objective))
    r = np.random.default_rng(0)
    batch = dict(global_crops=r.normal(size=(16, 2, 16, 16, 3)).astype(np.float32),
                 local_crops=r.normal(size=(16, 2, 8, 8, 3)).astype(np.float32))
    objective = make_objective(c)
    params, extra = _unbox(objective.init(jax.random.PRNGKey(0), batch))
    extra = dict(extra, center=extra["center"] + 0.3 * r.normal(size=extra["center"].shape))
    extra = dict(extra, teacher=jax.tree.map(lambda p: p * 1.1, extra["teacher"]))
    return c, objective, batch, params, extra


def test_dino_center_and_loss_are_the_full_batch_ones():
    """DINO: loss, monitors, the new center (one EMA step of the full batch's teacher mean,
    not K of micro-batch means) and the gradients equal the unaccumulated step's."""
    _, objective, batch, params, extra = _dino()
    rng = jax.random.PRNGKey(1)
    loss, metrics, extra1, grads = _full(objective, params, extra, batch, rng)
    loss_k, metrics_k, extra_k, grads_k = _cached(objective, params, extra, batch, rng)
    np.testing.assert_allclose(loss_k, loss, rtol=RTOL)
    _assert_close(metrics_k, metrics, "metrics")
    _assert_close(extra_k["center"], extra1["center"], "center")
    assert np.abs(extra1["center"] - extra["center"]).max() > 1e-3
    _assert_close(grads_k, grads, "grads")


def test_linear_probe_batch_norm_uses_the_full_batch():
    c = load_config("linear_probe")
    c.model = dict(name="vit", width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8,
                   num_classes=0, pool="mean")
    c.objective.num_classes = 5
    objective = make_objective(c)
    r = np.random.default_rng(0)
    batch = dict(image=r.normal(size=(16, 16, 16, 3)).astype(np.float32),
                 label=r.integers(0, 5, size=16).astype(np.int32))
    params, extra = _unbox(objective.init(jax.random.PRNGKey(0), batch))
    rng = jax.random.PRNGKey(1)
    loss, _, extra1, grads = _full(objective, params, extra, batch, rng)
    loss_k, _, extra_k, grads_k = _cached(objective, params, extra, batch, rng)
    np.testing.assert_allclose(loss_k, loss, rtol=RTOL)
    _assert_close(extra_k, extra1, "running statistics")
    _assert_close(grads_k, grads, "grads")


# -- refused where it cannot be exact --------------------------------------------------------

def _check(config, objective):
    validate.check(config, objective, make_mesh(dict(data=-1), jax.devices()[:1]), evals=False)


def test_a_coupled_loss_without_the_hooks_is_refused(shapes_data_dir):
    """An objective that couples examples but has no embed / loss_from_embeddings: one line
    from the config check, and make_train_step refuses it too (no silent plain accumulation).
    Per-example losses (MAE) and CLIP with its hooks pass."""
    c = _clip_config("softmax")
    c.data.data_dir = shapes_data_dir
    c.grad_accum_steps = K
    objective = make_objective(c)
    _check(c, objective)
    objective.embed = None  # the hooks hidden: the old behaviour
    with pytest.raises(ConfigError, match=r"^grad_accum_steps=4: the loss of objective 'clip' "
                                          r"couples the examples of a batch \(the other examples "
                                          r".*contrastive negatives\).*grad_accum_steps=1") as e:
        _check(c, objective)
    assert "\n" not in str(e.value)
    tx, schedule = opt_lib.make_optimizer(c.optimizer, c.total_steps, c.batch_size)
    with pytest.raises(ValueError, match="couples the examples"):
        make_train_step(objective, tx, schedule, get_rules(c.sharding), K)
    make_train_step(objective, tx, schedule, get_rules(c.sharding), 1)  # K = 1: nothing to refuse

    mae = load_config("mae")
    mae.data.data_dir, mae.grad_accum_steps = shapes_data_dir, 2
    _check(mae, make_objective(mae))


def test_dino_with_a_batchnorm_head_is_refused(shapes_data_dir):
    c, objective, *_ = _dino(use_bn_in_head=True)
    c.data.data_dir = shapes_data_dir
    c.grad_accum_steps = 2
    with pytest.raises(ConfigError, match=r"^grad_accum_steps=2 with config.objective.use_bn_in_head"
                                          r"=True: the head's BatchNorm .*use_bn_in_head=False"):
        _check(c, objective)
    c.grad_accum_steps = 1
    _check(c, objective)
    c.objective.use_bn_in_head = False
    c.grad_accum_steps = 2
    _check(c, make_objective(c))
