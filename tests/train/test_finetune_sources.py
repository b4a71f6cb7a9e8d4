"""``configs/finetune.py`` from every kind of pretrained source (issue 13's "done means"): a
supervised, a DINO and a CLIP fmjax workdir, and a converted HF ViT checkpoint. Each source is
a tiny run of its own config; the fine-tune (the default preset, its model set to the source's
architecture) keeps the encoder frozen, so its final encoder params must equal the source's
bit for bit, while the new head trains."""
import json
import os

import jax
import numpy as np
import pytest

from fmjax.testing import load_config
from fmjax.train import loop
from fmjax.train import model_init as mi_lib
from fmjax.train import restore

pytestmark = pytest.mark.slow   # eight tiny trainings (a source and a fine-tune each): ~1 min per test

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _tree(workdir, part):
    _, _, _, _, state, _ = restore.load_checkpoint(workdir)
    tree = {"params": state.params, "extra": state.extra}
    for key in part.split("/"):
        tree = tree[key]
    return mi_lib.flatten(jax.tree.map(np.asarray, tree))


def _source(name, tiny_config, tmp_path_factory):
    c = tiny_config(name, total_steps=2, checkpoint_every=2)
    wd = str(tmp_path_factory.mktemp(name))
    loop.train_and_evaluate(c, wd)
    return c, wd


def _finetune(shapes_data_dir, model, tmp_path, **model_init):
    c = load_config("finetune")
    c.data.data_dir = shapes_data_dir
    c.total_steps, c.batch_size, c.checkpoint_every = 2, 16, 2
    c.log_every, c.eval_every, c.eval_at_start = 1, 0, False
    c.optimizer.warmup_steps = 1
    c.evals = {}
    c.model = dict(model, num_classes=c.model.num_classes, drop_path=0.0)
    c.model_init.mapping = {}
    c.model_init.update(model_init)
    c.optimizer.frozen = (r"(?!head/).*",)   # everything but the new head: the end equals the start
    out = str(tmp_path / "ft")
    loop.train_and_evaluate(c, out)
    return _tree(out, "params")


def _assert_loaded(ft, src, strip=""):
    encoder = [k for k in ft if k.startswith("encoder/")]
    assert len(encoder) > 10
    for k in encoder:
        np.testing.assert_array_equal(ft[k], src[strip + k], err_msg=k)
    assert np.abs(ft["head/bias"]).max() > 0   # zero init, then trained


def test_from_a_supervised_workdir(tiny_config, shapes_data_dir, tmp_path, tmp_path_factory):
    c, wd = _source("supervised", tiny_config, tmp_path_factory)
    ft = _finetune(shapes_data_dir, c.model, tmp_path, workdir=wd,
                   mapping={"params": ""}, dont_load=("head/.*",))
    src = _tree(wd, "params")
    _assert_loaded(ft, src)
    assert not np.array_equal(ft["head/bias"], src["head/bias"])


def test_from_a_dino_workdir_teacher(tiny_config, shapes_data_dir, tmp_path, tmp_path_factory):
    c, wd = _source("dino", tiny_config, tmp_path_factory)
    mapping = load_config("finetune", "dino_vit_b16_imagenet").model_init.mapping   # the preset's
    assert dict(mapping) == {"extra/teacher/backbone": ""}
    ft = _finetune(shapes_data_dir, c.model, tmp_path, workdir=wd, mapping=dict(mapping))
    _assert_loaded(ft, _tree(wd, "extra/teacher/backbone"))


def test_from_a_clip_workdir_image_tower(tiny_config, shapes_data_dir, tmp_path, tmp_path_factory):
    """FT-CLIP's model (configs/finetune.py:clip_vit_b16_imagenet: pool 'mean' over
    fc_norm'd tokens, no final norm) at the tiny CLIP's sizes, loaded with the preset's
    mapping and dont_load."""
    c, wd = _source("clip", tiny_config, tmp_path_factory)
    m, preset = c.model, load_config("finetune", "clip_vit_b16_imagenet")
    model = dict(preset.model.to_dict(), width=m.width, depth=m.depth, num_heads=m.num_heads,
                 mlp_dim=m.mlp_dim, patch_size=m.patch_size, activation=m.get("activation", "gelu"),
                 stem=m.get("stem", "patch"))
    model.pop("variant")
    assert model["fc_norm"] == "tokens" and model["pool"] == "mean" and model["pre_norm"]
    ft = _finetune(shapes_data_dir, model, tmp_path, workdir=wd,
                   mapping=dict(preset.model_init.mapping), dont_load=preset.model_init.dont_load)
    src = _tree(wd, "params/image")
    _assert_loaded(ft, src)
    assert "encoder/norm/scale" in src and "encoder/norm/scale" not in ft
    np.testing.assert_array_equal(ft["fc_norm/scale"], 1.0)   # new (and frozen here)


def test_from_a_converted_hf_vit(shapes_data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from fmjax.interop import hf_vit
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(hf_dir / "model.safetensors"))
    with open(hf_dir / "config.json", "w") as f:
        json.dump(cfg.to_dict(), f)
    model = dict(name="vit", **hf_vit.vit_kwargs_from_hf_config(cfg))
    model.pop("num_classes", None)
    ft = _finetune(shapes_data_dir, model, tmp_path, torch=str(hf_dir / "model.safetensors"),
                   format="hf_vit", mapping={"params": ""})
    src = mi_lib.flatten(jax.tree.map(np.asarray, hf_vit.convert_hf_vit(hf.state_dict(), cfg)))
    _assert_loaded(ft, src)
