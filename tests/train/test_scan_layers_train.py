"""``scan_layers`` through the trainer and ``config.model_init``.

- A tiny MAE trains with ``scan_layers=True`` and a remat policy on a sharded mesh (stacked
  params split over fsdp), its checkpoint holds the stacked layout, and a resume with
  ``scan_layers=False`` is refused by the checkpoint fingerprint (one line).
- ``config.model_init`` loads an unrolled workdir into a scanned model (sharded) and the
  scanned MAE workdir into an unrolled MAE (sharded), bit for bit, with ``dont_load`` naming unrolled layer paths;
  and a converted torch checkpoint (HF ViT) into a scanned model.
- A scanned ViT exports (``fmjax.interop.export``) to the same files as the unrolled one.
- The fingerprint: ``remat`` may change on resume, ``scan_layers`` may not (False == absent).
"""
import json
import os

import jax
import numpy as np
import pytest

from fmjax.models import scan
from fmjax.testing import checkpoint_params, initial_state, load_config
from fmjax.train import loop
from fmjax.train.checkpoint import IncompatibleCheckpointError

MESH = dict(data=4, fsdp=2, tensor=1)


def _sup_config(shapes_data_dir, **model):
    c = load_config("supervised")
    c.data.data_dir = shapes_data_dir
    c.batch_size, c.log_every, c.eval_every, c.eval_at_start = 16, 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(dict(width=32, depth=3, num_heads=2, mlp_dim=64, stem="patch", **model))
    c.total_steps, c.checkpoint_every = 2, 2
    c.evals = {}
    return c


@pytest.fixture(scope="module")
def sup_workdir(tmp_path_factory, shapes_data_dir):
    """A tiny unrolled supervised ViT workdir trained 2 steps."""
    wd = str(tmp_path_factory.mktemp("sup_unrolled"))
    loop.train_and_evaluate(_sup_config(shapes_data_dir), wd)
    return wd


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_unrolled_workdir_into_scanned_model_sharded(sup_workdir, shapes_data_dir):
    src = checkpoint_params(sup_workdir)
    assert "block_2" in src["encoder"]
    c = _sup_config(shapes_data_dir, scan_layers=True)
    c.mesh = MESH
    c.model_init.workdir = sup_workdir
    state, text = initial_state(c)
    kernel = state.params["encoder"]["block_stack"]["mlp"]["fc1"]["kernel"]
    assert kernel.shape == (3, 32, 64) and kernel.sharding.spec[:2] == (None, "fsdp")
    _assert_trees_equal(jax.tree.map(np.asarray, state.params), scan.stack_layers(src))
    assert "0 missing" in text and "0 checkpoint arrays unused" in text, text

    # dont_load names unrolled layer paths: layer 1 of every stacked param keeps its fresh init
    c.model_init.dont_load = ("encoder/block_1/.*",)
    fresh_config = _sup_config(shapes_data_dir, scan_layers=True)
    fresh_config.mesh = MESH
    fresh, _ = initial_state(fresh_config)
    state, text = initial_state(c)
    got = jax.tree.map(np.asarray, state.params["encoder"]["block_stack"])
    init = jax.tree.map(np.asarray, fresh.params["encoder"]["block_stack"])
    want = scan.stack_layers(src)["encoder"]["block_stack"]
    for g, i, w in zip(jax.tree.leaves(got), jax.tree.leaves(init), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g[[0, 2]], w[[0, 2]])
        np.testing.assert_array_equal(g[1], i[1])
    assert not np.array_equal(got["attn"]["query"]["kernel"][1], want["attn"]["query"]["kernel"][1])
    n_block = len(jax.tree.leaves(src["encoder"]["block_1"]))
    assert f"{n_block} re-initialised" in text, text


def test_hf_vit_checkpoint_into_scanned_model(shapes_data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8,
                                 layer_norm_eps=1e-6)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(tmp_path / "hf"))
    c = _sup_config(shapes_data_dir, scan_layers=True, pool="cls")
    c.model_init.torch = str(tmp_path / "hf" / "model.safetensors")
    c.model_init.format = "hf_vit"
    c.model_init.dont_load = ("head/.*",)
    state, text = initial_state(c, jax.devices()[:1])
    from fmjax.interop.hf_vit import convert_hf_vit, load_safetensors
    ref = scan.stack_layers(convert_hf_vit(load_safetensors(c.model_init.torch), cfg))
    got = jax.tree.map(np.asarray, state.params)
    _assert_trees_equal(got["encoder"], ref["encoder"])
    np.testing.assert_array_equal(got["cls_token"], ref["cls_token"])
    assert "hf_vit checkpoint" in text, text


def test_hf_convnext_checkpoint_into_scanned_convnext_then_trains(shapes_data_dir, tmp_path):
    """ConvNeXt's per-stage stacks (stage_{i}_block_stack) load a converted transformers
    checkpoint through model_init, bit for bit, and train sharded with a remat policy."""
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 3], num_stages=2,
                                      image_size=32, layer_scale_init_value=0.5)
    transformers.ConvNextModel(cfg).save_pretrained(str(tmp_path / "hf"))
    c = _sup_config(shapes_data_dir)
    c.model = dict(name="convnext", depths=(2, 3), dims=(16, 32), layer_scale_init=0.5,
                   layernorm_eps=1e-12, head_norm_eps=1e-12, num_classes=8, scan_layers=True,
                   remat="dots_saveable", drop_path=0.1)
    c.model_init.torch = str(tmp_path / "hf" / "model.safetensors")
    c.model_init.format = "hf_convnext"
    c.model_init.dont_load = ("head/.*",)
    state, text = initial_state(c, jax.devices()[:1])
    from fmjax.interop.hf_convnext import convert_hf_convnext
    from fmjax.interop.hf_vit import load_safetensors
    ref = scan.stack_layers(convert_hf_convnext(load_safetensors(c.model_init.torch), cfg))
    got = jax.tree.map(np.asarray, state.params)
    assert got["stage_1_block_stack"]["fc1"]["kernel"].shape == (3, 32, 128)
    for key in ("stem", "stage_0_block_stack", "stage_1_block_stack", "downsample_1_conv"):
        _assert_trees_equal(got[key], ref[key])
    c.mesh = MESH
    wd = str(tmp_path / "wd")
    assert loop.train_and_evaluate(c, wd)["step"] == 2
    assert checkpoint_params(wd)["stage_0_block_stack"]["gamma"].shape == (2, 16)


def test_scanned_mae_trains_sharded_and_refuses_an_unrolled_resume(tiny_config, tmp_path):
    c = tiny_config("mae", total_steps=3, checkpoint_every=3)
    c.model.update(dict(depth=3, decoder_depth=2, scan_layers=True,
                        remat="dots_with_no_batch_dims_saveable"))
    c.mesh = MESH
    wd = str(tmp_path / "wd")
    final = loop.train_and_evaluate(c, wd)
    assert final["step"] == 3
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    params = checkpoint_params(wd)
    assert params["encoder"]["block_stack"]["attn"]["query"]["kernel"].shape == (3, 32, 2, 16)
    assert params["decoder"]["block_stack"]["mlp"]["fc2"]["bias"].shape == (2, 32)
    # the three layers were initialised independently and all moved
    k = params["encoder"]["block_stack"]["attn"]["query"]["kernel"]
    assert not np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2])

    unrolled = tiny_config("mae", total_steps=4)
    unrolled.model.update(dict(depth=3, decoder_depth=2,
                               remat="dots_with_no_batch_dims_saveable"))
    unrolled.mesh = MESH
    with pytest.raises(IncompatibleCheckpointError) as info:
        loop.train_and_evaluate(unrolled, wd)
    msg = str(info.value)
    assert "\n" not in msg and "scan_layers" in msg and "new --workdir" in msg, msg

    # ... but config.model_init loads the scanned workdir into the unrolled model, bit for bit
    unrolled.model_init.workdir = wd
    state, text = initial_state(unrolled)
    _assert_trees_equal(jax.tree.map(np.asarray, state.params), scan.unstack_layers(params))
    assert "0 missing" in text and "0 checkpoint arrays unused" in text, text


def test_scanned_vit_exports_as_the_unrolled_one(tmp_path):
    """``fmjax.interop.export`` unstacks a scanned model's params: the same files as unrolled."""
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    from fmjax.interop import export
    from fmjax.models.vit import ViT
    from fmjax.testing import perturb
    import flax.linen as nn
    kw = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8, num_classes=4)
    x = np.zeros((1, 32, 32, 3), np.float32)
    params = perturb(nn.meta.unbox(ViT(**kw).init(jax.random.PRNGKey(0), x)["params"]), seed=0,
                     scale=0.2)
    export.export(ViT(**kw), params, "hf", str(tmp_path / "unrolled"))
    export.export(ViT(**kw, scan_layers=True), scan.stack_layers(params), "hf",
                  str(tmp_path / "scanned"))
    a = load_file(str(tmp_path / "unrolled" / "model.safetensors"))
    b = load_file(str(tmp_path / "scanned" / "model.safetensors"))
    assert sorted(a) == sorted(b) and any("layer.2." in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fingerprint_remat_may_change_scan_layers_may_not():
    """remat is compute only (a resume may change the policy); scan_layers=False equals a
    config without the key (workdirs from before it existed resume); True is refused."""
    import ml_collections
    from fmjax.train import checkpoint

    def cfg(**model):
        return ml_collections.ConfigDict(dict(model=dict(dict(name="vit", width=32), **model),
                                              objective=dict(name="supervised")))
    old = dict(fingerprint=checkpoint.fingerprint(cfg()))                 # before the keys
    checkpoint.check_meta(old, cfg(remat="dots_saveable", scan_layers=False), "/wd")
    meta = dict(fingerprint=checkpoint.fingerprint(cfg(remat=False, scan_layers=False)))
    checkpoint.check_meta(meta, cfg(remat="offload"), "/wd")
    for saved, now in ((old, cfg(scan_layers=True)), (meta, cfg(scan_layers=True)),
                       (dict(fingerprint=checkpoint.fingerprint(cfg(scan_layers=True))), cfg())):
        with pytest.raises(IncompatibleCheckpointError, match="model.scan_layers: saved"):
            checkpoint.check_meta(saved, now, "/wd")
    with pytest.raises(IncompatibleCheckpointError, match="model.width"):
        checkpoint.check_meta(meta, cfg(width=64, remat=True), "/wd")
