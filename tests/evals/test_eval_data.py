"""Evals that bring their own data (issue 13): kNN on another dataset than training's, few-shot
end to end, zero-shot class names and templates from files."""
import json
import os

import jax
import numpy as np

from fmjax.data import shapes
from fmjax.evals import fewshot
from fmjax.train import eval_only, loop, restore, setup
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train.evaluate import Evaluator
from fmjax.train.writer import MetricWriter

ONE_DEVICE = jax.devices()[:1]


def _fresh(config):
    """(objective, mesh, rules, a freshly initialised state) of ``config`` on one device."""
    objective, mesh, rules = setup.build(config, ONE_DEVICE)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    state, _ = state_lib.create_state(objective, tx, restore.train_batch_spec(config, objective),
                                      mesh, rules, config.seed)
    return objective, mesh, rules, state


def _run(config, objective, mesh, rules, state):
    evaluator = Evaluator(config, objective, mesh, rules)
    return evaluator, evaluator.run(list(config.evals), state, MetricWriter("", 1, enabled=False), 0)


def test_train_on_shapes32_evaluate_knn_on_shapes64_and_fewshot(tiny_config, tmp_path):
    c = tiny_config("mae", total_steps=2, checkpoint_every=2, eval_every=2, batch_size=8)
    data = dict(examples=32, train_examples=64)
    c.evals = dict(knn64=dict(type="knn", dataset="fmjax_shapes/64", **data),
                   few=dict(type="fewshot", shots=(1, 2), num_seeds=2, **data))
    final = loop.train_and_evaluate(c, str(tmp_path), devices=ONE_DEVICE)
    keys = ("eval/knn64_top1", "eval/knn64_top5", "eval/few_1shot_top1", "eval/few_2shot_top1")
    for k in keys:
        assert 0.0 <= final[k] <= 1.0, (k, final)
    assert not any(k.startswith("eval/few_") for k in final if k not in keys and k.startswith("eval/"))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert any("eval/few_2shot_top1" in r and r["step"] == 2 for r in logged)
    # launch/eval.py's path: the saved config and checkpoint give the same numbers.
    again = eval_only.evaluate_checkpoint(str(tmp_path))
    for k in keys:
        assert again[k] == final[k], k


def test_each_eval_reads_its_own_dataset_and_pipeline(tiny_config):
    c = tiny_config("mae", batch_size=8)  # trains on fmjax_shapes/32
    data = dict(examples=16, train_examples=32)
    c.evals = dict(knn=dict(type="knn", **data),
                   knn64=dict(type="knn", dataset="fmjax_shapes/64", **data),
                   knn64_small=dict(type="knn", dataset="fmjax_shapes/64",
                                    pp="resize(16)|normalize('imagenet')|keep('image', 'label')", **data),
                   few=dict(type="fewshot", shots=(1, 3), **data))
    objective, mesh, rules, state = _fresh(c)
    seen = []
    features = objective.features

    def spy(params, extra, images):
        seen.append(images.shape[1:3])
        return features(params, extra, images)

    objective.features = spy  # traced once per input shape
    evaluator, metrics = _run(c, objective, mesh, rules, state)
    assert sorted(set(seen)) == [(16, 16), (32, 32), (64, 64)]
    for name in ("knn", "knn64", "knn64_small"):
        assert 0.0 <= metrics[f"eval/{name}_top1"] <= metrics[f"eval/{name}_top5"] <= 1.0
    assert evaluator.evaluators["knn64"].dataset == "fmjax_shapes/64" and evaluator.evaluators["knn"].dataset == c.data.name
    # The few-shot numbers are fewshot_lsr on the train-split and eval-split features (8 classes).
    few = evaluator.evaluators["few"]
    (tr, tr_y), (te, te_y) = few.features(state, train=True), few.features(state)
    assert len(tr) == 32 and len(te) == 16 and few.num_classes(tr_y, te_y) == len(shapes.CLASS_NAMES)
    want = fewshot.fewshot_lsr(tr, tr_y, te, te_y, 8, shots=(1, 3))
    assert {k: metrics[f"eval/few_{k}"] for k in want} == want
    # Within one evaluation, 'few' reuses the features 'knn' computed (same splits, pipeline, batch).
    ctx, passes = evaluator.context, []
    batches = ctx.batches
    ctx.batches = lambda *a, **k: passes.append(1) or batches(*a, **k)
    assert evaluator.run(list(c.evals), state, MetricWriter("", 1, enabled=False), 0) == metrics
    assert len(passes) == 6  # knn, knn64, knn64_small: train + eval split each; few: none


def test_zero_shot_class_names_and_templates_from_files(tiny_config, tmp_path):
    c = tiny_config("clip", batch_size=8)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    (tmp_path / "names.txt").write_text("\n".join(shapes.CLASS_NAMES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n\n")
    c.evals = dict(inline=dict(type="zero_shot", examples=16, class_names=list(shapes.CLASS_NAMES),
                               templates=templates),
                   files=dict(type="zero_shot", examples=16, classnames_file=str(tmp_path / "names.txt"),
                              templates_file=str(tmp_path / "templates.txt")),
                   renamed=dict(type="zero_shot", examples=16, templates=templates,
                                class_names=[f"thing {i}" for i in range(8)]))
    _, metrics = _run(c, *_fresh(c))
    assert metrics["eval/files_top1"] == metrics["eval/inline_top1"]
    assert metrics["eval/files_top5"] == metrics["eval/inline_top5"]
    for k in ("top1", "top5"):
        assert 0.0 <= metrics[f"eval/renamed_{k}"] <= 1.0
    assert np.isfinite(list(metrics.values())).all()
