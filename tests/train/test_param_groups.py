"""Parameter groups (issue 13, item 4): frozen, lr_mult, wd_mult and layer-wise lr decay."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.models.vit import ViT
from fmjax.train import optimizer as opt_lib
from fmjax.train import param_groups as pg
from fmjax.train.state import TrainState
from fmjax.train.step import make_train_step


def _vit_params(depth=3, **kw):
    m = ViT(width=8, depth=depth, num_heads=2, mlp_dim=16, patch_size=4, num_classes=3, **kw)
    return nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])


def _flat(tree):
    return {pg.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _adamw(**kw):
    opt = dict(name="adamw", lr=0.1, weight_decay=0.0, warmup_steps=0, decay="constant", eps=1e-8)
    opt.update(kw)
    return opt_lib.make_optimizer(opt, total_steps=10, global_batch=8)[0]


# -- Layer-wise lr decay against facebookresearch/mae util/lr_decay.py ----------------------------

def _mae_get_layer_id_for_vit(name, num_layers):  # transcribed from mae's util/lr_decay.py
    if name in ["cls_token", "pos_embed"]:
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def _mae_layer_scales(model_blocks, layer_decay):  # param_groups_lrd's scales
    num_layers = model_blocks + 1
    return [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]


def _timm_name(path):
    """fmjax ViT path -> the timm VisionTransformer parameter name it corresponds to."""
    m = re.fullmatch(r"encoder/block_(\d+)/(.*)", path)
    if m:
        return f"blocks.{m.group(1)}." + m.group(2).replace("/", ".")
    if path.startswith("encoder/norm/"):
        return "norm." + path.split("/")[-1]
    return path.replace("/", ".")


@pytest.mark.parametrize("prefix", ["", "backbone/"])
def test_llrd_multipliers_match_maes_param_groups_lrd(prefix):
    depth, decay = 3, 0.75
    params = _vit_params(depth)
    if prefix:
        params = {"backbone": params}
    mults = pg.lr_multipliers(pg.parse(dict(llrd=dict(decay=decay, num_layers=None))), params)
    scales = _mae_layer_scales(depth, decay)
    assert len(mults) == len(_flat(params)) > 30
    for path, mult in mults.items():
        name = _timm_name(path[len(prefix):])
        want = scales[_mae_get_layer_id_for_vit(name, depth + 1)]
        assert mult == pytest.approx(want, rel=1e-12), (path, name)
    assert mults[prefix + "head/kernel"] == 1.0 and mults[prefix + "encoder/norm/scale"] == 1.0
    assert mults[prefix + "pos_embed"] == pytest.approx(decay ** 4)
    assert mults[prefix + "encoder/block_0/attn/query/kernel"] == pytest.approx(decay ** 3)
    # An explicit num_layers (e.g. 5 for a checkpoint whose top blocks were dropped) is used as is.
    mults5 = pg.lr_multipliers(pg.parse(dict(llrd=dict(decay=decay, num_layers=5))), params)
    assert mults5[prefix + "pos_embed"] == pytest.approx(decay ** 6)


def test_llrd_registers_and_pre_norm_sit_with_the_embeddings():
    mults = pg.lr_multipliers(pg.parse(dict(llrd=dict(decay=0.5))),
                              _vit_params(2, num_registers=1, pre_norm=True))
    assert mults["reg_tokens"] == mults["pre_norm/scale"] == mults["cls_token"] == 0.5 ** 3


def test_single_step_update_is_lr_times_mult_times_adam_direction():
    """One AdamW step from zero moments: update = -lr * mult * (g / (|g| + eps) + wd * wd_mult * p)."""
    params = _vit_params(2)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) * jnp.sign(jnp.arange(p.size).reshape(p.shape) - 1.5),
                         params)
    lr, wd, eps = 0.1, 0.05, 1e-8
    tx = _adamw(lr=lr, weight_decay=wd, llrd=dict(decay=0.75), lr_mult=(("head/.*", 10.0),),
                wd_mult=(("encoder/block_1/.*", 0.5),))
    updates, _ = tx.update(grads, tx.init(params), params)
    groups = pg.parse(dict(llrd=dict(decay=0.75), lr_mult=(("head/.*", 10.0),)))
    mults = pg.lr_multipliers(groups, params)
    decays = _flat(opt_lib.decay_mask(params))
    flat_p, flat_g = _flat(params), _flat(grads)
    for path, u in _flat(updates).items():
        g, p = np.asarray(flat_g[path], np.float64), np.asarray(flat_p[path], np.float64)
        wd_p = wd * (0.5 if path.startswith("encoder/block_1/") else 1.0) if decays[path] else 0.0
        want = -lr * mults[path] * (g / (np.abs(g) + eps) + wd_p * p)
        np.testing.assert_allclose(np.asarray(u), want, rtol=2e-6, atol=1e-9, err_msg=path)
    assert mults["head/kernel"] == 10.0 and mults["encoder/block_0/mlp/fc1/kernel"] == pytest.approx(0.75 ** 2)


def test_first_match_wins_and_wd_mult_never_overrides_no_decay():
    params = {"head": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "w": jnp.ones((4, 4))}
    zero = jax.tree.map(jnp.zeros_like, params)
    # lr_mult: 'head/kernel' is matched by both; the first pattern (2.0) wins.
    tx = _adamw(weight_decay=0.5, lr_mult=(("head/kernel", 2.0), ("head/.*", 3.0)),
                wd_mult=(("head/.*", 0.0), ("w", 4.0), (".*", 100.0)))
    u = tx.update(zero, tx.init(params), params)[0]
    np.testing.assert_allclose(u["head"]["kernel"], 0.0)              # wd_mult 0, lr_mult irrelevant
    np.testing.assert_allclose(u["head"]["bias"], 0.0)                # a bias never decays, even under '.*'
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 * 4.0, rtol=1e-6)   # first match 'w' (4.0), not '.*'
    tx = _adamw(weight_decay=0.5, lr_mult=(("head/kernel", 2.0), ("head/.*", 3.0)))
    u = tx.update(zero, tx.init(params), params)[0]
    np.testing.assert_allclose(u["head"]["kernel"], -0.1 * 2.0 * 0.5, rtol=1e-6)
    # decay_all: the bias decays too, and wd_mult scales it
    tx = _adamw(weight_decay=0.5, decay_all=True, wd_mult=(("head/bias", 2.0),))
    u = tx.update(zero, tx.init(params), params)[0]
    np.testing.assert_allclose(u["head"]["bias"], -0.1 * 0.5 * 2.0, rtol=1e-6)


class _Regression:
    """A tiny objective: squared error of a 2-layer MLP on a fixed batch."""

    def loss(self, params, extra, batch, rng, step):
        h = jnp.tanh(batch["x"] @ params["backbone"]["w"] + params["backbone"]["b"])
        out = h @ params["head"]["kernel"] + params["head"]["bias"]
        loss = jnp.mean(jnp.square(out - batch["y"]))
        return loss, ({}, extra)

    def after_update(self, params, extra, step):
        return extra


@pytest.mark.parametrize("name,clip_mode", [("adamw", "global"), ("adamw", "per_param"), ("sgd", "global")])
def test_frozen_params_stay_bit_identical_through_the_train_step(name, clip_mode):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(k[0], (4, 8)).at[0, 0].set(-0.0)  # -0.0 must stay -0.0
    params = {"backbone": {"w": w, "b": jax.random.normal(k[1], (8,))},
              "head": {"kernel": jax.random.normal(k[2], (8, 2)), "bias": jnp.zeros(2)}}
    batch = {"x": jax.random.normal(k[3], (16, 4)), "y": jnp.ones((16, 2))}
    opt = dict(name=name, lr=0.05, weight_decay=0.1, warmup_steps=2, decay="cosine", no_decay=(),
               clip_norm=0.5, clip_mode=clip_mode, frozen=("backbone/.*",), lr_mult=(("head/.*", 2.0),))
    tx, schedule = opt_lib.make_optimizer(opt, total_steps=6, global_batch=16)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra={},
                       rng=jax.random.PRNGKey(1))
    # The frozen params keep no optimizer state: only the head's moments / momenta exist.
    state_shapes = {x.shape for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0}
    assert state_shapes == {(8, 2), (2,)}
    step = jax.jit(make_train_step(_Regression(), tx, schedule, rules=()))
    before = jax.tree.map(np.asarray, params)
    for _ in range(5):
        state, metrics = step(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    for key in ("w", "b"):
        assert after["backbone"][key].tobytes() == before["backbone"][key].tobytes()
    assert np.signbit(after["backbone"]["w"][0, 0])
    assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])
    assert float(metrics["loss"]) < float(_Regression().loss(params, {}, batch, None, 0)[0])


def test_frozen_grads_stay_out_of_clipping():
    """torch's clip_grad_norm_ over the trainable params only: a huge frozen gradient does
    not shrink the trained params' step."""
    params = {"frozen": jnp.ones((2, 2)), "w": jnp.ones((2, 2))}
    grads = {"frozen": jnp.full((2, 2), 1e6), "w": jnp.full((2, 2), 0.1)}
    opt = dict(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0, decay="constant",
               clip_norm=1.0, frozen=("frozen",))
    tx, _ = opt_lib.make_optimizer(opt, total_steps=10, global_batch=8)
    u = tx.update(grads, tx.init(params), params)[0]
    np.testing.assert_allclose(u["w"], -0.1, rtol=1e-6)   # global norm 0.2 < 1: not clipped
    assert np.all(np.signbit(u["frozen"])) and np.all(u["frozen"] == 0)


def test_no_groups_is_the_transformation_without_groups():
    """All group keys empty (the defaults of configs/common.py) build the old transformation:
    same state structure, same updates bit for bit."""
    import configs.common as common
    opt = dict(common.base_config().optimizer)
    opt.update(clip_norm=1.0)
    base = {k: v for k, v in opt.items() if k not in pg.GROUP_KEYS}
    params = _vit_params(2)
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)
    outs = []
    for o in (opt, base):
        tx = opt_lib.make_optimizer(o, total_steps=10, global_batch=8)[0]
        s = tx.init(params)
        outs.append((jax.tree.structure(s), tx.update(grads, s, params)[0]))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("kw,expected", [
    (dict(frozen=("backbone/(",)), "config.optimizer.frozen: 'backbone/(' is not a valid regex"),
    (dict(frozen="backbone/.*"), "give a tuple of regexes"),
    (dict(frozen=("/backbone/.*",)), "starts with '/'"),
    (dict(lr_mult=(("head/.*", "ten"),)), "multiplier 'ten' of 'head/.*' is not a number"),
    (dict(lr_mult=(("head/.*", 0.0),)), "must be > 0 (freeze params with config.optimizer.frozen)"),
    (dict(lr_mult=("head/.*",)), "is not a (regex, multiplier) pair"),
    (dict(wd_mult=(("head/.*", -1.0),)), "config.optimizer.wd_mult: multiplier -1.0 of 'head/.*' must be >= 0"),
    (dict(llrd=dict(decay=-0.75)), "config.optimizer.llrd.decay=-0.75; must be a number in (0, 1]"),
    (dict(llrd=dict(decay="0.75")), "config.optimizer.llrd.decay='0.75'"),
    (dict(llrd=dict(decay=0.75, num_layers=-1)), "config.optimizer.llrd.num_layers=-1"),
    (dict(llrd=dict(decay=0.75, depth=12)), "unknown keys ['depth']"),
])
def test_bad_groups_are_one_line_config_errors(kw, expected):
    with pytest.raises(ConfigError) as e:
        _adamw(**kw)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_pattern_that_matches_no_param_is_a_config_error():
    tx = _adamw(frozen=("backbne/.*",))
    with pytest.raises(ConfigError, match=r"config.optimizer.frozen: 'backbne/\.\*' matches no param"):
        jax.eval_shape(tx.init, {"backbone": {"w": jnp.ones((2, 2))}})
    tx = _adamw(lr_mult=(("head", 2.0),))  # fullmatch: 'head' is not 'head/kernel'
    with pytest.raises(ConfigError, match="matches no param"):
        tx.init({"head": {"kernel": jnp.ones((2, 2))}})


def test_bad_group_through_the_config_check(tiny_config, tmp_path):
    """The trainer's config check reports it before anything is written."""
    from fmjax.train import loop
    config = tiny_config("supervised")
    config.optimizer.lr_mult = (("head/.*", -2.0),)
    with pytest.raises(ConfigError, match="must be > 0"):
        loop.check_config(config, str(tmp_path / "w"))
    config.optimizer.lr_mult = ()
    config.optimizer.frozen = ("enc/.*",)  # a typo of 'encoder/.*'
    with pytest.raises(ConfigError, match=r"'enc/\.\*' matches no param .*'encoder/block_0/"):
        loop.check_config(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


class _WarmupFreeze(_Regression):
    """An objective hook freeze (DINO's last layer) beside optimizer.frozen."""

    def update_mask(self, params, step):
        return {"backbone": jax.tree.map(lambda _: True, params["backbone"]),
                "head": jax.tree.map(lambda _: step >= 2, params["head"])}


def test_frozen_composes_with_the_update_mask_hook_and_a_wd_schedule():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"backbone": {"w": jax.random.normal(k[0], (4, 8)), "b": jax.random.normal(k[1], (8,))},
              "head": {"kernel": jax.random.normal(k[2], (8, 2)), "bias": jnp.zeros(2)}}
    batch = {"x": jax.random.normal(k[3], (16, 4)), "y": jnp.ones((16, 2))}
    opt = dict(name="adamw", lr=0.05, weight_decay=0.04, weight_decay_end=0.4, warmup_steps=0,
               adam_count="per_param", frozen=("backbone/b",), llrd=dict(decay=0.5, num_layers=0))
    tx, schedule = opt_lib.make_optimizer(opt, total_steps=6, global_batch=16)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra={},
                       rng=jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(_WarmupFreeze(), tx, schedule, rules=()))
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    assert after["head"]["kernel"].tobytes() == np.asarray(params["head"]["kernel"]).tobytes()
    assert not np.array_equal(after["backbone"]["w"], params["backbone"]["w"])
    for _ in range(2):
        state, _ = step(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    assert not np.array_equal(after["head"]["kernel"], params["head"]["kernel"])
    assert after["backbone"]["b"].tobytes() == np.asarray(params["backbone"]["b"]).tobytes()
    counts = [int(c) for c in jax.tree.leaves(state.opt_state) if getattr(c, "dtype", None) == jnp.int32
              and c.ndim == 0]
    assert 2 in counts and 4 in counts  # the head's own Adam count (2 steps) and the backbone's (4)


def test_frozen_and_llrd_through_the_training_loop(tiny_config, tmp_path):
    """The real loop (sharded state, checkpoints, config.json round trip): block 0 is the same
    at steps 2 and 4 bit for bit while block 1 trains; the restored config keeps the groups."""
    from fmjax.train import loop, restore
    config = tiny_config("supervised")
    config.optimizer.frozen = ("encoder/block_0/.*",)
    config.optimizer.llrd.decay = 0.5
    config.optimizer.lr_mult = (("head/.*", 2.0),)
    config.keep_checkpoints = 3
    workdir = str(tmp_path / "w")
    loop.train_and_evaluate(config, workdir)
    states = {s: jax.tree.map(np.asarray, restore.load_checkpoint(workdir, step=s)[4].params) for s in (2, 4)}
    a, b = _flat(states[2]), _flat(states[4])
    frozen = [k for k in a if k.startswith("encoder/block_0/")]
    assert frozen and all(a[k].tobytes() == b[k].tobytes() for k in frozen)
    assert not np.array_equal(a["encoder/block_1/mlp/fc1/kernel"], b["encoder/block_1/mlp/fc1/kernel"])
    saved = restore.load_workdir_config(workdir).optimizer
    assert tuple(saved.frozen) == ("encoder/block_0/.*",) and saved.llrd.decay == 0.5
