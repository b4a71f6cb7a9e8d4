"""CLIP through the trainer: steps run, evals report, the logit scale is clamped, LiT locks a tower."""
import math

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax.data import shapes, sources
from fmjax.evals.swap_caption import swap_words
from fmjax.objectives.clip import MAX_LOGIT_SCALE, make
from fmjax.train import loop


def _params(workdir, step):
    mngr = ocp.CheckpointManager(str(workdir / "checkpoints"))
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def test_clip_trains_and_evaluates(tiny_config, tmp_path):
    c = tiny_config("clip", total_steps=2, checkpoint_every=2, eval_every=2)
    c.evals = dict(zero_shot=dict(type="zero_shot", split="validation", examples=64,
                                  templates=["a photo of a {}."]),
                   retrieval=dict(type="retrieval", split="validation", examples=64),
                   comp=dict(type="swap_caption", split="validation", examples=64,
                             words=dict(attribute=shapes.COLOR_NAMES, object=shapes.CLASS_NAMES)))
    final = loop.train_and_evaluate(c, str(tmp_path))
    assert math.isfinite(final["train/loss"])
    # as many pairs as captions with two distinct colours / shapes; accuracies in [0, 1]
    src = sources.get_source(c.data.name, "validation", c.data.data_dir)
    caps = [src[i]["caption"] for i in range(64)]
    for group, words in (("attribute", shapes.COLOR_NAMES), ("object", shapes.CLASS_NAMES)):
        n = sum(swap_words(cap, words) is not None for cap in caps)
        assert final[f"eval/comp_{group}_pairs"] == n > 5 and 0.0 <= final[f"eval/comp_{group}_acc"] <= 1.0
    assert 0.0 <= final["eval/zero_shot_top1"] <= 1.0 and "eval/retrieval_i2t_r@5" in final
    assert final["eval/retrieval_chance_r@1"] == 1 / 64
    # launch/eval.py's path: the saved config + latest checkpoint reproduce the numbers.
    from fmjax.train.eval_only import evaluate_checkpoint
    again = evaluate_checkpoint(str(tmp_path))
    for k in ("eval/zero_shot_top1", "eval/retrieval_i2t_r@5", "eval/retrieval_t2i_r@1"):
        assert again[k] == final[k], k


def test_logit_scale_is_clamped_after_update(tiny_config):
    obj = make(tiny_config("clip"))
    params = {"logit_scale": np.float32(9.0), "other": np.ones(2)}
    out = obj.project_params(params, 0)
    assert float(out["logit_scale"]) == np.float32(MAX_LOGIT_SCALE)
    assert float(obj.project_params({"logit_scale": np.float32(2.0)}, 0)["logit_scale"]) == 2.0


def test_lit_locked_image_tower_does_not_move(tiny_config, tmp_path):
    c = tiny_config("clip", total_steps=2, checkpoint_every=1)
    c.objective.lock = "image"
    loop.train_and_evaluate(c, str(tmp_path))
    p1, p2 = _params(tmp_path, 1), _params(tmp_path, 2)
    for a, b in zip(jax.tree.leaves(p1["image"]), jax.tree.leaves(p2["image"])):
        np.testing.assert_array_equal(a, b)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p1["text"]), jax.tree.leaves(p2["text"]))]
    assert max(moved) > 0
