"""Adapters from outside the model (fmjax.adapt). LoRA: the merged forward pass equals the
unmerged one, rank 0 / alpha 0 is the base model bit for bit, the parameter count is the
formula, and a training run moves only the adapter (and the listed head) while the base stays
bit-identical. Houlsby (serial / parallel): identity at init, the count formula, training, and
export refusing it. Prefix tuning: one attention against a written-out reference, the count
formula, training only the prefixes. int8: the quantizer's grid and launch/eval.py --quantize."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax import adapt
from fmjax.adapt import lora
from fmjax.errors import ConfigError
from fmjax.models import inject
from fmjax.models.vit import ViT
from fmjax.objectives.base import make_objective, supports
from fmjax.train import loop

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, num_classes=5)


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


def _images(b=3):
    return jax.random.normal(jax.random.PRNGKey(1), (b, 32, 32, 3))


def _adapted(model, rank, alpha, targets, x):
    with inject.hooks(dense=lora.lora_hook(rank, alpha, targets)):
        params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
    return params


def _randomise_b(params, seed=3):
    """lora_b starts at zero (the model is unchanged at init); give it values to test merging."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))

    def walk(node):
        if not isinstance(node, dict):
            return node
        return {k: (0.1 * jax.random.normal(next(keys), v.shape) if k == "lora_b" else walk(v))
                for k, v in node.items()}
    return walk(params)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_forward_equals_unmerged(scan):
    model = ViT(**TINY, scan_layers=scan)
    x = _images()
    targets = r"attn/(query|value)$|mlp/fc1$"
    params = _randomise_b(_adapted(model, 4, 8.0, targets, x))
    with inject.hooks(dense=lora.lora_hook(4, 8.0, targets)):
        unmerged = model.apply(params, x)["pre_logits"]
    merged_params = lora.merge(params, 8.0, 4)
    assert not any(k.endswith(("lora_a", "lora_b")) for k in _flat(merged_params))
    merged = model.apply(merged_params, x)["pre_logits"]  # the plain model, no hook
    # float32: 1e-6 of the output's scale (the two sum W x + s A B x in different orders).
    err = float(jnp.max(jnp.abs(merged - unmerged)))
    assert err <= 1e-6 * float(jnp.max(jnp.abs(unmerged))), err
    plain = model.apply(lora.merge(_adapted(model, 4, 8.0, targets, x), 8.0, 4), x)["pre_logits"]
    assert float(jnp.max(jnp.abs(merged - plain))) > 1e-3  # the adapter changed the function


@pytest.mark.parametrize("rank, alpha", [(0, 16.0), (4, 0.0)])
def test_rank_0_or_alpha_0_is_the_base_model(rank, alpha):
    model = ViT(**TINY)
    x = _images()
    base = nn.unbox(model.init(jax.random.PRNGKey(0), x))
    params = _randomise_b(_adapted(model, rank, alpha, r"attn/(query|value)$", x))
    if rank == 0:
        assert _flat(params).keys() == _flat(base).keys()
    with inject.hooks(dense=lora.lora_hook(rank, alpha, r"attn/(query|value)$")):
        y = model.apply(params, x)["pre_logits"]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply(base, x)["pre_logits"]))


def test_param_count_is_the_formula():
    model = ViT(**TINY)
    x = _images()
    rank, d, heads = 4, TINY["width"], TINY["num_heads"]
    params = _adapted(model, rank, 8.0, r"attn/(query|value)$|mlp/fc2$", x)
    flat = _flat(params)
    # query / value: (D) -> (heads, D / heads); fc2: (mlp) -> (D); per layer.
    shapes = [((d,), (heads, d // heads))] * 2 + [((TINY["mlp_dim"],), (d,))]
    assert lora.count(params) == TINY["depth"] * lora.expected_count(shapes, rank)
    assert flat["params/encoder/block_0/attn/query/lora_a"].shape == (d, rank)
    assert flat["params/encoder/block_0/attn/query/lora_b"].shape == (rank, heads, d // heads)
    assert flat["params/encoder/block_1/mlp/fc2/lora_a"].shape == (TINY["mlp_dim"], rank)
    assert "params/encoder/block_0/attn/key/lora_a" not in flat
    # PEFT's init: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0.
    a = np.asarray(flat["params/encoder/block_0/attn/query/lora_a"])
    assert np.abs(a).max() <= 1 / math.sqrt(d) and np.abs(a).max() > 0.5 / math.sqrt(d)
    assert not np.any(np.asarray(flat["params/encoder/block_0/attn/query/lora_b"]))


@pytest.mark.parametrize("adapter, message", [
    (dict(name="qlora"), "config.adapter.name='qlora'; valid: ['lora', 'houlsby', 'prefix', 'prompt']"),
    (dict(name="prompt", length=2, dropout=0.1), "VPT-shallow's prompts are the ViT's register tokens"),
    (dict(name="lora", dropout=1.0), "config.adapter.dropout=1.0 must be in [0, 1"),
    (dict(name="lora", rank=-1), "config.adapter.rank=-1"),
    (dict(name="lora", targets="attn/(query"), "config.adapter.targets='attn/(query' is not a regex"),
    (dict(name="lora", ranks=4), "unknown keys ['ranks']"),
])
def test_bad_adapter_configs_are_one_line(default_config, adapter, message):
    c = default_config("supervised")
    c.adapter = adapter
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_objective(c)


def test_no_adapter_is_the_plain_objective(default_config):
    c = default_config("supervised")
    obj = make_objective(c)
    assert not isinstance(obj, adapt.AdaptedObjective)
    c.adapter.name = "lora"
    wrapped = make_objective(c)
    assert isinstance(wrapped, adapt.AdaptedObjective)
    for name in ("features", "visualize", "eval_metrics", "update_mask", "generate", "text_features"):
        assert supports(wrapped, name) == (supports(obj, name) or name == "update_mask"), name


def _restore(wd, step):
    return jax.device_get(ocp.StandardCheckpointer().restore(
        os.path.join(wd, "checkpoints", str(step), "state")))


def _short_adapter_run(default_config, tmp_path, **adapter):
    """A 4-step supervised run with ``adapter`` (checkpoints at 2 and 4 hold every array):
    ``(config, params at 2, params at 4, names of the params that moved)``."""
    c = default_config("supervised")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 0, 2
    c.eval_at_start = False
    c.keep_checkpoints = 5
    c.batch_size = 16
    c.adapter.update(dict(adapter, checkpoint="full"))
    loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    first, last = _flat(_restore(str(tmp_path), 2)["params"]), _flat(_restore(str(tmp_path), 4)["params"])
    moved = {k for k in first if not np.array_equal(np.asarray(first[k]), np.asarray(last[k]))}
    return c, first, last, moved


def test_training_moves_only_the_adapter_and_head(default_config, tmp_path, capsys):
    """A short supervised run with LoRA (rank 4 on q / v) and a trainable head: the base params
    of the step-3 and step-6 checkpoints are bit-identical, the LoRA B matrices and the head moved, the
    banner counts the trainable params, and eval / features run with the adapter."""
    c = default_config("supervised")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 3, 6, 3
    c.keep_checkpoints = 5
    c.batch_size = 16
    c.adapter.update(dict(name="lora", rank=4, train=("head/.*",), checkpoint="full",  # the base too
                          dropout=0.1))
    c.evals = dict(val=dict(type="metrics", split="validation", examples=64))
    out = loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    assert out["step"] == 6
    log = capsys.readouterr().out + capsys.readouterr().err
    assert "trainable, " in log and ": lora adapter)" in log
    first, last = _flat(_restore(str(tmp_path), 3)["params"]), _flat(_restore(str(tmp_path), 6)["params"])
    moved = {k for k in first if not np.array_equal(np.asarray(first[k]), np.asarray(last[k]))}
    assert moved, "nothing trained"
    for k in moved:
        assert k.endswith(("lora_a", "lora_b")) or k.startswith("head/"), f"frozen base param moved: {k}"
    assert any(k.endswith("lora_b") for k in moved) and any(k.startswith("head/") for k in moved)
    d, rank = c.model.width, 4
    n_lora = sum(math.prod(v.shape) for k, v in last.items() if k.endswith(("lora_a", "lora_b")))
    assert n_lora == c.model.depth * 2 * rank * (d + d)


# -- Houlsby bottleneck adapters (fmjax.adapt.houlsby) ------------------------------------------

@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_houlsby_starts_as_the_base_model_and_counts_like_the_formula(kind):
    from fmjax.adapt import houlsby
    model = ViT(**TINY)
    x = _images()
    base = nn.unbox(model.init(jax.random.PRNGKey(0), x))
    hook = houlsby.adapter_hook(8, r"attn/out$|mlp/fc2$", kind)
    with inject.hooks(dense=hook):
        params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
        y = model.apply(params, x)["pre_logits"]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply(base, x)["pre_logits"]))
    flat = _flat(params)
    n = sum(math.prod(v.shape) for k, v in flat.items() if k.split("/")[-1] in houlsby.PARAMS)
    d, mlp = TINY["width"], TINY["mlp_dim"]
    # attn/out: (heads, head_dim) -> D; fc2: mlp -> D.
    assert n == TINY["depth"] * houlsby.expected_count([(d, d), (mlp, d)], 8, kind)
    assert flat["params/encoder/block_0/mlp/fc2/adapter_down_kernel"].shape == ((d if kind == "serial" else mlp), 8)
    # A non-zero up-projection changes the function: the adapter is on the forward path.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (v + 0.1 * jax.random.normal(jax.random.PRNGKey(5), v.shape)
                      if str(p[-1].key) == "adapter_up_kernel" else v), params)
    with inject.hooks(dense=hook):
        y2 = model.apply(params, x)["pre_logits"]
    assert float(jnp.max(jnp.abs(y2 - y))) > 1e-3


def test_houlsby_trains_only_the_adapters_and_export_refuses_it(default_config, tmp_path):
    from fmjax.train import export as export_train
    _, _, _, moved = _short_adapter_run(default_config, tmp_path, name="houlsby", bottleneck=4)
    assert moved and all(k.split("/")[-1].startswith("adapter_") for k in moved), moved
    with pytest.raises(ConfigError, match="'houlsby' adapter, which the exported"):
        export_train.export_workdir(str(tmp_path), "hf", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_an_option_of_the_other_adapter_is_refused(default_config):
    c = default_config("supervised")
    c.adapter.update(dict(name="lora", bottleneck=16))
    with pytest.raises(ConfigError, match="config.adapter.bottleneck=16 is not an option of the 'lora' adapter"):
        make_objective(c)


# -- int8 post-training quantization (fmjax.adapt.quant) ----------------------------------------

def test_fake_quant_is_per_channel_symmetric_int8():
    from fmjax.adapt import quant
    w = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 8))
    q = quant.fake_quant_weight(w, contract=1)
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127
    levels = q / scale
    np.testing.assert_allclose(levels, jnp.round(levels), atol=1e-4)       # on the int8 grid
    assert float(jnp.max(jnp.abs(levels))) <= 127 + 1e-4
    assert float(jnp.max(jnp.abs(q - w) / scale)) <= 0.5 + 1e-4            # round to nearest
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 16))
    xq = quant.fake_quant_activation(x, 1)
    sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    assert float(jnp.max(jnp.abs(xq - x) / sx)) <= 0.5 + 1e-4


# launch/eval.py --quantize=int8 on a trained classifier: tests/train/test_learning.py
# (test_int8_eval_of_the_trained_classifier reuses its learning gate's run).


# -- prefix tuning (fmjax.adapt.prefix) ---------------------------------------------------------

def _reference_attention_with_prefix(q, k, v, pk, pv):
    """softmax(q [pk; k]^T / sqrt(d)) [pv; v], written out in numpy."""
    b = q.shape[0]
    k = np.concatenate([np.broadcast_to(pk, (b,) + pk.shape), k], 1)
    v = np.concatenate([np.broadcast_to(pv, (b,) + pv.shape), v], 1)
    logits = np.einsum("bqhd,bthd->bhqt", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqt,bthd->bqhd", p, v)


@pytest.mark.parametrize("scan", [False, True])
def test_prefix_attends_to_learned_keys_and_counts_like_the_formula(scan):
    from fmjax.adapt import prefix
    from fmjax.models.attention import MultiHeadAttention
    model = ViT(**TINY, scan_layers=scan)
    x = _images()
    with inject.hooks(attention=prefix.prefix_hook(3, r"attn$")):
        params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
        y = model.apply(params, x)["pre_logits"]
    flat = _flat(params)
    n = sum(math.prod(v.shape) for k, v in flat.items() if k.split("/")[-1] in prefix.PARAMS)
    heads, hd = TINY["num_heads"], TINY["width"] // TINY["num_heads"]
    assert n == prefix.expected_count(TINY["depth"], 3, heads, hd)
    plain = model.apply(_drop(params, prefix.PARAMS), x)["pre_logits"]
    assert float(jnp.max(jnp.abs(plain - y))) > 1e-4  # the prefixes change the function
    with inject.hooks(attention=prefix.prefix_hook(0, r"attn$")):
        same = model.apply(_drop(params, prefix.PARAMS), x)["pre_logits"]
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    # One attention module against the written-out reference.
    attn = MultiHeadAttention(num_heads=2)
    xs = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
    with inject.hooks(attention=prefix.prefix_hook(4, r".*")):
        p = nn.unbox(attn.init(jax.random.PRNGKey(4), xs))
        out = attn.apply(p, xs)
    pp = p["params"]
    proj = lambda name, inp: np.einsum("btd,dhk->bthk", inp, pp[name]["kernel"]) + pp[name]["bias"]
    xs_np = np.asarray(xs)
    ref = _reference_attention_with_prefix(proj("query", xs_np), proj("key", xs_np), proj("value", xs_np),
                                           np.asarray(pp["prefix_key"]), np.asarray(pp["prefix_value"]))
    ref = np.einsum("bqhk,hkd->bqd", ref, pp["out"]["kernel"]) + pp["out"]["bias"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def _drop(params, names):
    def walk(node):
        if not isinstance(node, dict):
            return node
        return {k: walk(v) for k, v in node.items() if k not in names}
    return walk(params)


def test_prefix_trains_only_the_prefixes(default_config, tmp_path):
    _, _, _, moved = _short_adapter_run(default_config, tmp_path, name="prefix", length=4)
    assert moved and all(k.split("/")[-1].startswith("prefix_") for k in moved), moved


# -- VPT-shallow prompt tuning (config.adapter.name='prompt') -----------------------------------

def test_prompt_tuning_trains_only_the_prompt_tokens(default_config, tmp_path):
    c, first, _, moved = _short_adapter_run(default_config, tmp_path, name="prompt", length=3,
                                            train=("head/.*",))
    assert first["reg_tokens"].shape == (1, 3, c.model.width)
    assert "reg_tokens" in moved and moved <= {"reg_tokens", "head/kernel", "head/bias"}, moved
    c.model.name = "mae"
    with pytest.raises(ConfigError, match="model 'mae' has no register tokens"):
        make_objective(c)


# -- VPT-deep (config.adapter.deep=True; fmjax.adapt.prompt through the block hook) -------------

@pytest.mark.parametrize("scan", [False, True])
def test_vpt_deep_replaces_the_prompt_slots_at_every_block(scan):
    """Against a written-out loop: embed, then before each block put that block's prompts in
    the slots after the class token and the model's own register, run the block; final norm.
    Scanned and unrolled models give the same function; the count is depth x length x width."""
    from fmjax.adapt import prompt
    from fmjax.models import scan as scan_lib
    from fmjax.models.blocks import Block
    from fmjax.models.core import layer_norm
    own, length = 1, 3
    model = ViT(**{**TINY, "num_registers": own + length})
    x = _images()
    hook = prompt.deep_hook(length, prompt.DEFAULT_TARGETS, offset=1 + own,
                            bound=prompt.init_bound(TINY["patch_size"], TINY["width"]))
    with inject.hooks(block=hook):
        params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
        out = model.apply(params, x)
    p = params["params"]
    assert sum(math.prod(v.shape) for k, v in _flat(params).items() if k.endswith("vpt_prompts")) == \
        prompt.expected_count(TINY["depth"], length, TINY["width"])
    bound = prompt.init_bound(TINY["patch_size"], TINY["width"])
    assert 0.5 * bound < float(jnp.abs(p["encoder"]["block_0"]["vpt_prompts"]).max()) <= bound

    # The reference loop, block by block, from the embedding (block 0's input, captured by an
    # outer block hook before the VPT hook runs).
    seen = {}

    def capture(blk, inp, call_next):
        seen.setdefault(lora.module_path(blk), inp)
        return call_next(inp)
    with inject.hooks(block=capture), inject.hooks(block=hook):
        model.apply(params, x)
    h = seen["encoder/block_0"]
    block = Block(num_heads=TINY["num_heads"], mlp_dim=TINY["mlp_dim"])
    for i in range(TINY["depth"]):
        bp = p["encoder"][f"block_{i}"]
        prompts = jnp.broadcast_to(bp["vpt_prompts"], (h.shape[0], length, TINY["width"]))
        h = jnp.concatenate([h[:, :1 + own], prompts, h[:, 1 + own + length:]], axis=1)
        h = block.apply({"params": {k: v for k, v in bp.items() if k != "vpt_prompts"}}, h)
    h = layer_norm(1e-6, jnp.float32, jnp.float32, "norm").apply({"params": p["encoder"]["norm"]}, h)
    np.testing.assert_allclose(np.asarray(out["tokens"]), np.asarray(h), atol=1e-5, rtol=1e-5)
    assert out["patch_tokens"].shape[1] == (32 // TINY["patch_size"]) ** 2

    if scan:
        scanned = ViT(**{**TINY, "num_registers": own + length, "scan_layers": True})
        with inject.hooks(block=hook):
            shapes = nn.unbox(scanned.init(jax.random.PRNGKey(0), x))
            stacked = scan_lib.stack_layers(params)
            assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, shapes)
            out_s = scanned.apply(stacked, x)
        np.testing.assert_allclose(np.asarray(out_s["tokens"]), np.asarray(out["tokens"]), atol=1e-5)


def test_vpt_deep_trains_only_the_per_block_prompts(default_config, tmp_path):
    c, first, _, moved = _short_adapter_run(default_config, tmp_path, name="prompt", length=3, deep=True,
                                            train=("head/.*",))
    obj = make_objective(c)
    assert obj.adapter["offset"] == 1 and obj.adapter["deep"]
    prompts = {f"encoder/block_{i}/vpt_prompts" for i in range(c.model.depth)}
    assert prompts <= moved <= prompts | {"head/kernel", "head/bias"}, moved
    assert first["encoder/block_0/vpt_prompts"].shape == (1, 3, c.model.width)
    c.adapter = dict(c.adapter.to_dict(), deep="yes")  # e.g. a config file's plain dict
    with pytest.raises(ConfigError, match="config.adapter.deep='yes' must be True"):
        make_objective(c)


def test_lora_dropout_is_on_the_branch_input_and_only_with_a_dropout_rng():
    """PEFT's lora_dropout: y = x W + b + s (drop(x) A) B. Without a 'dropout' rng (evaluation)
    the layer is the no-dropout LoRA layer bit for bit; with one, only the LoRA branch changes
    and it averages to the no-dropout output (inverted dropout)."""
    from fmjax.models.core import DenseND
    rank, alpha, p = 4, 8.0, 0.25
    layer = DenseND(features=(6,), kernel_axes=(None, None), bias_axes=(None,))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 10))
    with inject.hooks(dense=lora.lora_hook(rank, alpha, ".*")):
        params = _randomise_b(nn.unbox(layer.init(jax.random.PRNGKey(1), x)))
        plain = layer.apply(params, x)
    with inject.hooks(dense=lora.lora_hook(rank, alpha, ".*", dropout=p)):
        np.testing.assert_array_equal(np.asarray(layer.apply(params, x)), np.asarray(plain))
        drawn = layer.apply(params, x, rngs={"dropout": jax.random.PRNGKey(2)})
        many = jax.vmap(lambda k: layer.apply(params, x, rngs={"dropout": k}))(
            jax.random.split(jax.random.PRNGKey(3), 4000))
    w = params["params"]
    base = x @ w["kernel"] + w["bias"]
    assert float(jnp.abs(drawn - plain).max()) > 1e-3
    delta = (drawn - base) / (alpha / rank)  # = (drop(x) A) B
    full = (x @ w["lora_a"]) @ w["lora_b"]
    assert float(jnp.abs(delta - full).max()) > 1e-3  # dropout acted on the branch ...
    # ... and only there: with B = 0 the layer is x W + b whatever the rng.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if str(path[-1].key) == "lora_b" else v, params)
    with inject.hooks(dense=lora.lora_hook(rank, alpha, ".*", dropout=p)):
        np.testing.assert_allclose(np.asarray(layer.apply(zero_b, x, rngs={"dropout": jax.random.PRNGKey(2)})),
                                   np.asarray(base), atol=1e-6)
    np.testing.assert_allclose(np.asarray(many.mean(0)), np.asarray(plain), atol=0.05)
    # Merging is unaffected by dropout: the merged kernel is the no-dropout layer.
    merged = lora.merge(params, alpha, rank)
    np.testing.assert_allclose(np.asarray(layer.apply(merged, x)), np.asarray(plain), atol=1e-5)


@pytest.mark.parametrize("name", ["houlsby_serial", "houlsby_parallel", "prefix", "vpt_deep"])
def test_adapter_dropout_acts_only_in_training_passes(name):
    """config.adapter.dropout for the other adapters: without a 'dropout' rng (evaluation) the
    model is the dropout-0 model bit for bit; with one the output changes, differently for two
    copies of the same image (masks are per example), and in the bottleneck adapter (a single
    projection) the mean over draws is the dropout-0 output (inverted dropout of the branch)."""
    from fmjax.adapt import houlsby, prefix, prompt
    from fmjax.models.core import DenseND
    p = 0.3
    if name.startswith("houlsby"):
        kind = name.split("_")[1]
        model = DenseND(features=(32,), kernel_axes=(None, None), bias_axes=(None,))
        x = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (1, 10)), (4, 1))
        make = lambda rate: dict(dense=houlsby.adapter_hook(5, ".*", kind, 0.5, dropout=rate))  # noqa: E731
    else:
        x = jnp.tile(_images(1), (4, 1, 1, 1))
        if name == "prefix":
            model = ViT(**TINY)
            make = lambda rate: dict(attention=prefix.prefix_hook(3, r"attn$", dropout=rate))  # noqa: E731
        else:
            model = ViT(**{**TINY, "num_registers": 3})
            make = lambda rate: dict(block=prompt.deep_hook(  # noqa: E731
                3, prompt.DEFAULT_TARGETS, offset=1, bound=0.5, dropout=rate))
    with inject.hooks(**make(0.0)):
        params = nn.unbox(model.init(jax.random.PRNGKey(1), x))
        # a nonzero branch everywhere (the bottleneck's up projection starts at zero)
        params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(7), v.shape), params)
        plain = model.apply(params, x)
    plain = plain if name.startswith("houlsby") else plain["pre_logits"]
    rng = {"dropout": jax.random.PRNGKey(2)}
    with inject.hooks(**make(p)):
        ev = model.apply(params, x)
        drawn = model.apply(params, x, rngs=rng)
        if name.startswith("houlsby"):
            many = jax.vmap(lambda k: model.apply(params, x, rngs={"dropout": k}))(
                jax.random.split(jax.random.PRNGKey(3), 4000))
            np.testing.assert_allclose(np.asarray(many.mean(0)), np.asarray(plain), atol=0.03)
    if not name.startswith("houlsby"):
        ev, drawn = ev["pre_logits"], drawn["pre_logits"]
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(plain))
    assert float(jnp.abs(drawn - plain).max()) > 1e-3
    assert float(jnp.abs(drawn[0] - drawn[1]).max()) > 1e-4  # per-example masks


def test_adapter_dropout_reaches_the_hooks(default_config):
    """The checked spec carries dropout to every adapter's hook (deep VPT too)."""
    for adapter in (dict(name="houlsby", dropout=0.1), dict(name="prefix", length=2, dropout=0.1),
                    dict(name="prompt", length=2, deep=True, dropout=0.1)):
        c = default_config("supervised")
        c.adapter = adapter
        obj = make_objective(c)
        assert obj.adapter["dropout"] == 0.1, adapter


def test_clip_text_soft_prompts_train_alone(tiny_config, tmp_path):
    """CoOp on CLIP: adapter.text_length=4 (length=0: no image prompts) trains the text tower's
    prompt_embed alone; VPT image prompts on a model without register tokens are refused."""
    c = tiny_config("clip")
    c.keep_checkpoints = 5
    c.adapter.update(dict(name="prompt", length=0, text_length=4, checkpoint="full"))
    loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    first, last = _flat(_restore(str(tmp_path), 2)["params"]), _flat(_restore(str(tmp_path), 4)["params"])
    assert first["text/prompt_embed"].shape == (4, c.model.text_width)
    moved = {k for k in first if not np.array_equal(np.asarray(first[k]), np.asarray(last[k]))}
    assert moved == {"text/prompt_embed"}, moved
    c.adapter.length = 10
    c.model.image = dict(name="resnet", variant="18", stem="cifar", stem_width=8, dims=(8, 8, 8, 8))
    for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
        c.model[k] = None
    c.model.stem = "patch"
    with pytest.raises(ConfigError, match="image tower 'resnet'\" has no register tokens.*set length=0"):
        make_objective(c)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_on_clip_prompts_the_image_tower_alone(tiny_config, tmp_path, deep):
    """VPT on CLIP (with CoOp's text prompts): the flat image ViT gets the prompt slots
    (VPT-shallow: its reg_tokens; VPT-deep: per-block prompts in the image tower's blocks
    only, never the text tower's); they and the text prompts are all that train."""
    c = tiny_config("clip")
    c.keep_checkpoints = 5
    c.adapter.update(dict(name="prompt", length=3, deep=deep, text_length=2, checkpoint="full"))
    obj = make_objective(c)
    assert obj.config.model.num_registers == 3
    loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    first, last = _flat(_restore(str(tmp_path), 2)["params"]), _flat(_restore(str(tmp_path), 4)["params"])
    moved = {k for k in first if not np.array_equal(np.asarray(first[k]), np.asarray(last[k]))}
    if deep:
        prompts = {f"image/encoder/block_{i}/vpt_prompts" for i in range(c.model.depth)}
        assert not any(k.startswith("text/") and "vpt" in k for k in first)
        assert moved == prompts | {"text/prompt_embed"}, moved
    else:
        assert first["image/reg_tokens"].shape == (1, 3, c.model.width)
        assert moved == {"image/reg_tokens", "text/prompt_embed"}, moved




def test_an_adapter_without_a_base_warns_in_one_line(capsys, tmp_path):
    """LoRA on a random base is a valid (if odd) run, so a warning, not an error; with a
    model_init source there is none."""
    from fmjax.testing import load_config
    from fmjax.train import validate
    c = load_config("clip", "lora")
    validate.check_model_init(c)
    err = capsys.readouterr().err.strip()
    assert "RANDOMLY" in err and "model_init.workdir" in err and "\n" not in err, err
    c.adapter.name = ""
    validate.check_model_init(c)
    assert not capsys.readouterr().err


@pytest.mark.parametrize("name, model", [("dino", None), ("diffusion", "dit")])
def test_lora_trains_dino_and_diffusion_backbones_alone(tiny_config, tmp_path, name, model):
    """Issue 18: adapters work with every objective. LoRA (rank 2, the default q / v targets)
    on DINO's student ViT and a DiT, from a base trained 4 steps (at a fresh init DiT's
    adaLN-Zero gates give q / v no gradient): between the step-2 and step-4 checkpoints only
    LoRA params move; the base params are bit-identical. (The U-Net's attention blocks pass the
    same check, measured 2026-12-05, but its two compiles cost 44 s of the suite.)"""
    c = tiny_config(name)
    if model == "dit":
        from fmjax.testing import load_config
        c.model = dict(load_config("diffusion").model)
        c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    c.evals = {}
    base = c.copy_and_resolve_references()
    base.total_steps = 4
    loop.train_and_evaluate(base, str(tmp_path / "base"), devices=jax.devices()[:1])
    c.total_steps, c.checkpoint_every, c.keep_checkpoints = 4, 2, 5
    c.model_init.workdir = str(tmp_path / "base")
    c.adapter.update(dict(name="lora", rank=2, checkpoint="full"))
    loop.train_and_evaluate(c, str(tmp_path / "lora"), devices=jax.devices()[:1])
    first, last = (_flat(_restore(str(tmp_path / "lora"), s)["params"]) for s in (2, 4))
    moved = {k for k in first if not np.array_equal(np.asarray(first[k]), np.asarray(last[k]))}
    lora_keys = {k for k in first if k.endswith(("lora_a", "lora_b"))}
    assert lora_keys and moved and moved <= lora_keys, (sorted(moved - lora_keys)[:5], len(lora_keys))


def test_targets_that_reach_no_adaptable_layer_are_named():
    """A ``targets`` alternative that names layers the adapter's hooks never see is reported by
    ``unreached_targets`` (the trainer's one-line warning), the reachable ones are not: LoRA
    reaches the U-Net's convolutions (the conv injection point) and its time_emb_proj (before it
    went through the dense injection point it was skipped in silence), Houlsby the dense layers
    alone (the convolutions are reported), and LoRA no grouped convolution (ConvNeXt's depthwise
    dwconv, as PEFT)."""
    import jax.numpy as jnp
    from fmjax.objectives.base import make_objective
    from fmjax.testing import load_config
    c = load_config("diffusion", "lora")
    batch = dict(image=jnp.zeros((2, 32, 32, 3)), label=jnp.zeros((2,), jnp.int32))

    def missed(targets, name="lora"):
        c.adapter.name, c.adapter.targets = name, targets
        obj = make_objective(c)
        return obj.unreached_targets(jax.eval_shape(lambda: obj.init(jax.random.PRNGKey(0), batch))[0])
    assert missed(r"attn/query$|time_emb_proj$|resnets_0/conv1$") == []
    houlsby = missed(r"attn/out$|resnets_0/conv1$", "houlsby")
    assert houlsby and all(m.endswith("resnets_0/conv1") for m in houlsby), houlsby
    c = load_config("supervised", "convnext")
    c.adapter.update(dict(name="lora", targets=r"dwconv$|pwconv1$"))
    obj = make_objective(c)
    params = jax.eval_shape(lambda: obj.init(jax.random.PRNGKey(0), dict(
        image=jnp.zeros((1, 32, 32, 3)), label=jnp.zeros((1,), jnp.int32))))[0]
    dw = obj.unreached_targets(params)
    assert len(dw) == sum(c.model.depths) and all(m.endswith("dwconv") for m in dw), dw
    assert obj.reach == "dense layers, attention projections or ungrouped convolutions"


def test_diffusion_lora_preset_trains_lora_biases_norms_and_the_class_row():
    """configs/diffusion.py:lora (a class the base never saw): LoRA on the attention, AdaGN's
    time_emb_proj and the resnets' 3x3 convolutions; every bias and norm scale, the
    time-embedding MLP and the class-embedding table train whole beside it; every other kernel
    stays frozen. Without the biases / norms the new class was not learned (configs/diffusion.py)."""
    from fmjax.testing import load_config
    c = load_config("diffusion", "lora")
    assert c.data.repeat_classes == "heart:7"
    obj = make_objective(c)
    batch = dict(image=jnp.zeros((2, 32, 32, 3)), label=jnp.zeros((2,), jnp.int32))
    params = nn.unbox(jax.eval_shape(lambda: obj.init(jax.random.PRNGKey(0), batch))[0])
    mask = _flat(obj.update_mask(params, 0))
    trained = {k for k, m in mask.items() if m}
    for k in ("model/conv_in/bias", "model/conv_norm_out/scale", "model/time_embedding/linear_1/kernel",
              "model/class_embedding/embedding", "model/down_blocks_1/resnets_0/norm1/scale",
              "model/down_blocks_1/resnets_0/conv1/lora_a", "model/down_blocks_1/resnets_0/time_emb_proj/lora_b",
              "model/down_blocks_2/attentions_0/attn/query/lora_a"):
        assert k in trained, k
    for k in ("model/conv_in/kernel", "model/conv_out/kernel", "model/down_blocks_1/resnets_0/conv1/kernel",
              "model/down_blocks_1/resnets_0/conv_shortcut/kernel", "model/down_blocks_2/attentions_0/attn/query/kernel",
              "model/down_blocks_1/downsample/kernel"):
        assert k in mask and k not in trained, k
    assert all(k.rsplit("/", 1)[1] in ("bias", "scale", "embedding", "lora_a", "lora_b")
               or k.startswith("model/time_embedding/") for k in trained), sorted(trained)
    frac = obj.trainable_count(params) / sum(x.size for x in jax.tree.leaves(params))
    assert 0.10 < frac < 0.15, frac   # the banner's 13.70%


class _Convs(nn.Module):
    """Convolutions at every geometry LoRA must follow: explicit padding, 'SAME' with stride 2,
    dilation, 'CIRCULAR', a 1x1, a grouped one (no LoRA), and the 5-D input of a batch of clips."""

    @nn.compact
    def __call__(self, x):
        from fmjax.models import core
        x = core.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="pad")(x)
        x = core.Conv(8, (3, 3), strides=(2, 2), padding="SAME", name="stride")(nn.gelu(x))
        x = core.Conv(8, (3, 3), kernel_dilation=2, padding="VALID", name="dilated")(nn.gelu(x))
        x = core.Conv(8, (3, 3), padding="CIRCULAR", use_bias=False, name="circular")(x)
        x = core.Conv(8, (3, 3), padding="SAME", feature_group_count=8, name="grouped")(x)
        return core.Conv(4, (1, 1), name="point")(nn.gelu(x))


def test_conv_lora_is_peft_conv2d_and_merges_into_the_kernel():
    """LoRA on convolutions (the conv injection point, ``core.Conv``): ``lora_a`` (kh, kw, in, r)
    convolves at the layer's own geometry and ``lora_b`` (r, out) mixes, PEFT's Conv2d LoRA;
    identical to the base at init (B = 0), merged forward equals unmerged (any geometry, a leading
    batch of clips included), the count is rank * (kh * kw * in + out), grouped convolutions get none.
    Written out for one layer: conv(x, W) + b + (alpha / r) conv(x, A) . B."""
    from fmjax.models import core
    model, x = _Convs(), jax.random.normal(jax.random.PRNGKey(1), (2, 3, 12, 12, 3))
    hook = lora.lora_conv_hook(3, 6.0, "")  # every ungrouped conv (the bare one below has path "")
    base = nn.unbox(model.init(jax.random.PRNGKey(0), x))
    y_base = model.apply(base, x)
    with inject.hooks(conv=hook):
        params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
        flat = _flat(params)
        assert "params/grouped/lora_a" not in flat
        assert flat["params/pad/lora_a"].shape == (3, 3, 3, 3) and flat["params/pad/lora_b"].shape == (3, 6)
        assert flat["params/point/lora_a"].shape == (1, 1, 8, 3)
        np.testing.assert_array_equal(np.asarray(model.apply(params, x)), np.asarray(y_base))
        params = _randomise_b(params)
        unmerged = model.apply(params, x)
    shapes = [((3, 3, 3), (6,)), ((3, 3, 6), (8,)), ((3, 3, 8), (8,)), ((3, 3, 8), (8,)), ((1, 1, 8), (4,))]
    assert lora.count(params) == lora.expected_count(shapes, 3)
    a = np.asarray(flat["params/stride/lora_a"])  # PEFT's kaiming-uniform bound over kh * kw * in
    assert 0.5 / math.sqrt(54) < np.abs(a).max() <= 1 / math.sqrt(54)
    merged = model.apply(lora.merge(params, 6.0, 3), x)
    err = float(jnp.max(jnp.abs(merged - unmerged)))
    assert err <= 1e-5 * float(jnp.max(jnp.abs(unmerged))), err
    assert float(jnp.max(jnp.abs(merged - y_base))) > 1e-3
    # One layer written out with lax.conv (SAME, stride 2).
    p = _flat(params)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, 6))
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda k: jax.lax.conv_general_dilated(h, k, (2, 2), "SAME", dimension_numbers=dn)  # noqa: E731
    want = (conv(p["params/stride/kernel"]) + p["params/stride/bias"]
            + 2.0 * jnp.tensordot(conv(p["params/stride/lora_a"]), p["params/stride/lora_b"], axes=1))
    one = core.Conv(8, (3, 3), strides=(2, 2), padding="SAME")
    with inject.hooks(conv=hook):
        got = one.apply({"params": {k.split("/")[-1]: v for k, v in p.items() if "/stride/" in k}}, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_conv_is_nn_conv():
    """``core.Conv`` (every model's convolution) is ``nn.Conv``: same auto-name, params and numbers
    with no hook active, and ``convolve(x, kernel)`` is its convolution without the bias."""
    from fmjax.models import core

    class Two(nn.Module):
        cls: type

        @nn.compact
        def __call__(self, x):
            return self.cls(5, (3, 3), strides=(2, 2), kernel_dilation=1, padding="SAME")(x)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 3))
    p = Two(core.Conv).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, Two(nn.Conv).init(jax.random.PRNGKey(0), x))
    np.testing.assert_array_equal(np.asarray(Two(core.Conv).apply(p, x)), np.asarray(Two(nn.Conv).apply(p, x)))
    conv = core.Conv(5, (3, 3), strides=(2, 2), padding="SAME")
    inner = p["params"]["Conv_0"]
    got = conv.apply({"params": inner}, x, inner["kernel"], method=lambda m, x, k: m.convolve(x, k))
    np.testing.assert_array_equal(np.asarray(got + inner["bias"]), np.asarray(conv.apply({"params": inner}, x)))
