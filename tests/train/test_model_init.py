"""``config.model_init``: a fresh run's params partly initialised from a pretrained checkpoint.

A tiny supervised workdir (2 steps) loads into a DINO run's backbone (``mapping``), on a
sharded mesh, with ``dont_load`` keeping fresh init; the teacher starts as the loaded
student. Also: learned pos-embed resizing (16 -> 64 patches) equals the ViT's helper, a
shape mismatch and a missing file / unknown format are one-line ConfigErrors, an HF
``ViTModel`` checkpoint (safetensors + config.json) loads through the interop converter,
and the loop prints the table and applies model_init on a fresh start only.
"""

import jax
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.models.vit import resize_pos_embed
from fmjax.testing import checkpoint_params, initial_state, load_config
from fmjax.train import loop
from fmjax.train import model_init as mi_lib


def _tiny_supervised(tiny_config, **kw):
    c = tiny_config("supervised", **kw)
    c.model.update(dict(stem="patch"))
    c.total_steps, c.checkpoint_every = 2, 2
    return c


@pytest.fixture(scope="module")
def sup_workdir(tmp_path_factory, shapes_data_dir):
    """A supervised ViT workdir trained for 2 steps (the checkpoint tests load from)."""
    c = load_config("supervised")
    c.data.data_dir = shapes_data_dir
    c.batch_size, c.log_every, c.eval_every, c.eval_at_start = 16, 1, 0, False
    c.optimizer.warmup_steps = 1
    c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, stem="patch"))
    c.total_steps, c.checkpoint_every = 2, 2
    c.evals = {}
    wd = str(tmp_path_factory.mktemp("sup"))
    loop.train_and_evaluate(c, wd)
    return wd


def test_workdir_into_dino_backbone_sharded(sup_workdir, tiny_config):
    c = tiny_config("dino")
    c.mesh = dict(data=4, fsdp=2, tensor=1)  # params sharded over fsdp: loaded arrays must follow
    c.model_init.workdir = sup_workdir
    c.model_init.mapping = {"params": "backbone"}
    c.model_init.dont_load = ("backbone/encoder/block_1/.*",)
    fresh, _ = initial_state(tiny_config("dino", **{"mesh": dict(data=4, fsdp=2, tensor=1)}))
    state, text = initial_state(c)
    src = checkpoint_params(sup_workdir)
    got = jax.tree.map(np.asarray, state.params)
    np.testing.assert_array_equal(got["backbone"]["encoder"]["block_0"]["attn"]["query"]["kernel"],
                                  src["encoder"]["block_0"]["attn"]["query"]["kernel"])
    np.testing.assert_array_equal(got["backbone"]["pos_embed"], src["pos_embed"])
    np.testing.assert_array_equal(got["backbone"]["patch_embed"]["proj"]["kernel"],
                                  src["patch_embed"]["proj"]["kernel"])
    fresh_p = jax.tree.map(np.asarray, fresh.params)
    # dont_load and the params the checkpoint lacks (DINO's head) keep their fresh init.
    np.testing.assert_array_equal(got["backbone"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"],
                                  fresh_p["backbone"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, got["head"], fresh_p["head"])
    # The EMA teacher starts as the loaded student; the loaded params keep their shardings.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.extra["teacher"]), got)
    loaded = state.params["backbone"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert loaded.sharding == fresh.params["backbone"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"].sharding
    assert not loaded.sharding.is_fully_replicated, loaded.sharding
    assert "model_init from workdir" in text and "re-initialised" in text
    assert "backbone" in text and "head" in text, text


def test_pos_embed_resize_and_plan_errors():
    rng = np.random.default_rng(0)
    src = {"params/pos_embed": rng.standard_normal((1, 17, 8)).astype(np.float32),
           "params/head/kernel": rng.standard_normal((8, 3)).astype(np.float32),
           "params/cls_token": rng.standard_normal((1, 1, 8)).astype(np.float32)}
    target = {"pos_embed": (1, 65, 8), "head/kernel": (8, 5), "cls_token": (1, 1, 8)}
    loads, status, unused = mi_lib.plan(target, src, {"dont_load": ["head/.*"]})
    want = resize_pos_embed(src["params/pos_embed"], (4, 4), (8, 8), 1)
    np.testing.assert_allclose(loads["pos_embed"], np.asarray(want), rtol=1e-6, atol=1e-6)
    assert status == {"pos_embed": "resized", "head/kernel": "reinit", "cls_token": "loaded"}
    assert unused == 1  # the checkpoint's head
    with pytest.raises(ConfigError, match=r"params/head/kernel has shape \(8, 3\) but param "
                                          r"head/kernel has shape \(8, 5\)") as e:
        mi_lib.plan(target, src, {})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no subtree 'params/backbone'"):
        mi_lib.plan(target, src, {"mapping": "params/backbone:backbone"})


def test_missing_sources_are_config_errors(tiny_config, tmp_path):
    c = tiny_config("supervised")
    c.model_init.workdir = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model_init.workdir=.*config.json"):
        loop.check_config(c, str(tmp_path / "run"))
    c = tiny_config("supervised")
    c.model_init.torch = str(tmp_path / "model.safetensors")
    c.model_init.format = "hf_vit"
    with pytest.raises(ConfigError, match="no such file"):
        loop.check_config(c, str(tmp_path / "run"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    c.model_init.format = "timm_vitt"
    with pytest.raises(ConfigError, match="format='timm_vitt'; valid: .*hf_vit"):
        loop.check_config(c, str(tmp_path / "run"))


def test_hf_vit_safetensors(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=8,
                                 layer_norm_eps=1e-6)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").exists()
    c = tiny_config("supervised")  # 32x32 images, patch 8: the 2x2 HF grid is resized to 4x4
    c.model.update(dict(stem="patch", pool="cls"))
    c.model_init.torch = str(tmp_path / "hf" / "model.safetensors")
    c.model_init.format = "hf_vit"
    c.model_init.dont_load = ("head/.*",)
    state, text = initial_state(c, jax.devices()[:1])
    from fmjax.interop.hf_vit import convert_hf_vit, load_safetensors
    ref = convert_hf_vit(load_safetensors(c.model_init.torch), cfg)
    got = jax.tree.map(np.asarray, state.params)
    np.testing.assert_array_equal(got["encoder"]["block_1"]["attn"]["out"]["kernel"],
                                  ref["encoder"]["block_1"]["attn"]["out"]["kernel"])
    np.testing.assert_array_equal(got["cls_token"], ref["cls_token"])
    np.testing.assert_allclose(got["pos_embed"], np.asarray(resize_pos_embed(
        ref["pos_embed"], (2, 2), (4, 4), 1)), rtol=1e-6, atol=1e-6)
    print(text)
    assert "hf_vit checkpoint" in text and "1 pos-embed resized" in text, text


def test_loop_prints_table_and_resume_skips(sup_workdir, tiny_config, tmp_path, capsys):
    c = _tiny_supervised(tiny_config)
    c.total_steps, c.checkpoint_every = 1, 1
    c.model_init.workdir = sup_workdir
    c.model_init.dont_load = ("head/.*",)
    wd = str(tmp_path / "ft")
    loop.train_and_evaluate(c, wd)
    out = capsys.readouterr()
    assert "model_init from workdir" in out.out + out.err
    # A resume restores its own checkpoint; the source is not read again (even if it is gone).
    c.total_steps = 2
    c.model_init.workdir = str(tmp_path / "gone")
    final = loop.train_and_evaluate(c, wd)
    assert final["step"] == 2
    out = capsys.readouterr()
    assert "model_init" not in out.out + out.err and "resuming from step 1" in out.out + out.err


def test_mapping_picks_teacher_and_string_form():
    src = {"params/backbone/w": np.zeros((2,), np.float32),
           "extra/teacher/backbone/w": np.ones((2,), np.float32)}
    for m in ({"extra/teacher/backbone": ""}, "extra/teacher/backbone:",
              "{'extra/teacher/backbone': ''}"):
        loads, status, unused = mi_lib.plan({"w": (2,), "head/b": (3,)}, src, {"mapping": m})
        np.testing.assert_array_equal(loads["w"], 1.0)
        assert status == {"w": "loaded", "head/b": "missing"} and unused == 0


def test_cli_missing_workdir_one_line(tmp_path):
    from fmjax.testing import assert_one_line_error, run_cli
    proc = run_cli("train", "--config=configs/supervised.py", f"--workdir={tmp_path / 'run'}",
                   "--check_only", f"--config.model_init.workdir={tmp_path / 'nope'}",
                   "--config.model_init.mapping=params/backbone:backbone", timeout=300)
    assert_one_line_error(proc, "config.model_init.workdir=", "config.json")


def test_more_sources_apply_in_order_and_name_their_key(sup_workdir, tiny_config, tmp_path):
    """``more``: a second source fills what the first left out (Flamingo: LM + vision)."""
    c = tiny_config("dino")
    c.model_init.workdir = sup_workdir
    c.model_init.mapping = {"params": "backbone"}
    c.model_init.dont_load = ("backbone/encoder/block_1/.*",)
    c.model_init.more = {"second": dict(workdir=sup_workdir,
                                        mapping={"params/encoder/block_1": "backbone/encoder/block_1"})}
    state, text = initial_state(c)
    src = checkpoint_params(sup_workdir)
    got = jax.tree.map(np.asarray, state.params)
    for block in ("block_0", "block_1"):
        np.testing.assert_array_equal(got["backbone"]["encoder"][block]["mlp"]["fc1"]["kernel"],
                                      src["encoder"][block]["mlp"]["fc1"]["kernel"])
    assert text.count("model_init from workdir") == 2, text
    c.model_init.more.second.workdir = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"config.model_init.more.second.workdir=.*config.json"):
        mi_lib.check(c)
    c.model_init.more.second = dict(workdir=sup_workdir, more={})
    with pytest.raises(ConfigError, match=r"config.model_init.more.second has unknown keys \['more'\]"):
        mi_lib.check(c)
