"""Getting a trained model back from a workdir: its config, its checkpoint, a classifier.

A lower-level service than both the training loop and the evaluators: ``launch/eval.py``,
``launch/sample.py``, the ``generation`` evaluator (which loads a classifier from another
workdir) and notebooks use it; it imports neither ``loop`` nor ``evaluate``.
"""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from fmjax.data import sources, transforms
from fmjax.errors import ConfigError, NonFiniteError
from fmjax.evals import generation as gen_lib
from fmjax.train import adapter_ckpt
from fmjax.train import checkpoint as ckpt
from fmjax.train import model_init as model_init_lib
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train import files
from fmjax.train import workdir as workdir_lib
from fmjax.train.setup import batch_spec, build


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = files.join(workdir_lib.resolve(workdir), "config.json")
    if not files.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by launch/train.py.")
    return ml_collections.ConfigDict(json.loads(files.read_text(path)))


def train_batch_spec(config, objective):
    """The global batch spec of ``config``'s training run, from its first training example."""
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"))
    return batch_spec(source, transforms.parse(config.data.pp_train), objective.batch_keys,
                      config.batch_size)


def abstract_state(config, objective, mesh, rules, spec=None):
    """``(abstract TrainState, shardings)`` of ``config``'s training run on ``mesh``.

    ``spec``: the batch spec (from a checkpoint's meta); without it, it is computed from the
    first training example, which needs the training data.
    """
    abstract, shardings, _, _ = _abstract_state(config, objective, mesh, rules, spec)
    return abstract, shardings


def _abstract_state(config, objective, mesh, rules, spec=None):
    if spec is None:
        spec = train_batch_spec(config, objective)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    abstract, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    return abstract, shardings, tx, spec


def read_workdir(workdir: str, step: int | None = None):
    """``({'params/...' | 'extra/...': host array}, step)`` of a workdir's checkpoint (latest
    readable or ``step``): ``config.model_init``'s workdir source reader."""
    _, _, _, _, state, step = load_checkpoint(workdir, step=step)
    tree = {"params": state.params, "extra": state.extra}
    return {k: model_init_lib._to_host(v) for k, v in model_init_lib.flatten(tree).items()}, step


def fresh_state(config, objective, tx, spec, mesh, rules, shardings, log=print):
    """The TrainState a fresh run of ``config`` starts from: ``create_state`` with
    ``config.model_init``'s weights put in (a workdir source read by ``read_workdir``)."""
    load = None
    if model_init_lib.is_set(config):
        load = lambda params, sh: model_init_lib.apply(  # noqa: E731
            config, params, sh, log=log, read_workdir=read_workdir)[0]
    return state_lib.create_state(objective, tx, spec, mesh, rules, config.seed, shardings,
                                  load_params=load)[0]


def _adapter_store(config, objective, mesh, rules, tx, spec, abstract, shardings):
    """The ``AdapterStore`` that puts an adapter checkpoint's base back (None: no adapter)."""
    return adapter_ckpt.for_run(config, tx, abstract, lambda: fresh_state(
        config, objective, tx, spec, mesh, rules, shardings, log=lambda *_: None))


def load_checkpoint(workdir: str, config=None, step: int | None = None, devices=None):
    """Restores the sharded TrainState of ``workdir`` (latest readable checkpoint or ``step``).

    ``config`` defaults to ``DIR/config.json``; ``devices`` to all (the mesh comes from
    ``config.mesh`` over them, so a checkpoint restores onto any device count).
    Returns ``(config, objective, mesh, rules, state, step)``; ``state.opt_state`` is None
    (not read from disk: evaluation and sampling do not need it). A missing workdir, config
    or checkpoint, a config whose model / objective differ from the checkpoint's, and a
    checkpoint holding NaN / inf params are one-line errors. An unreadable latest step is
    skipped with a warning (nothing is moved or deleted).
    """
    workdir = workdir_lib.resolve(workdir)
    config = config or load_workdir_config(workdir)
    objective, mesh, rules = build(config, devices)
    if not files.isdir(files.join(workdir, "checkpoints")):  # the manager would create it
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints; available: [] "
                          "(train first with launch/train.py --workdir=...).")
    manager = ckpt.make_manager(workdir, async_save=False)
    try:
        if step is None and manager.latest_step() is None:
            raise ConfigError(f"no checkpoint in {workdir}/checkpoints; available: [] "
                              "(train first with launch/train.py --workdir=...).")
        abstract, shardings, tx, spec = _abstract_state(config, objective, mesh, rules,
                                                        _saved_spec(manager, step))
        store = _adapter_store(config, objective, mesh, rules, tx, spec, abstract, shardings)
        step, state = ckpt.restore_latest(manager, config, abstract, shardings, step=step,
                                          with_opt_state=False, store=store)
    finally:
        manager.close()
    check_finite_params(state, step, workdir)
    return config, objective, mesh, rules, state, step


def _saved_spec(manager, step):
    """The batch spec stored in the meta of ``step`` (or the latest step), or None (older
    checkpoints, an unreadable meta: the caller computes it from the training data)."""
    try:
        meta = ckpt.read_meta(manager, manager.latest_step() if step is None else int(step))
        return ckpt.spec_from_json(meta["batch_spec"]) if meta.get("batch_spec") else None
    except Exception:  # noqa: BLE001 - any failure falls back to the data
        return None


def check_finite_params(state, step, workdir) -> None:
    """A checkpoint with NaN / inf params is an error naming its step (evaluating it would
    report plausible-looking numbers: kNN on NaN features still picks neighbours)."""
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(
        (state.params, state.extra))[0] if not bool(jax.numpy.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"checkpoint step {step} in {workdir}/checkpoints holds non-finite values "
                             f"({len(bad)} arrays, e.g. {bad[0]}); evaluate an earlier step with --step=N.")


def load_classifier(workdir: str, num_classes: int, image_shape=None, devices=None,
                    batch_size: int | None = None):
    """A ``generation.Classifier`` from a workdir trained with the ``supervised`` objective.

    Checks (before restoring anything) that the workdir exists and classifies
    ``num_classes`` classes, and that its eval transform maps ``image_shape`` (H, W, C)
    pictures to the size it was trained on. Returns ``(classifier, classifier_config)``.
    """
    try:
        gen_lib.check_classifier_workdir(workdir, num_classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config, objective, mesh, rules, state, _ = load_checkpoint(workdir, devices=devices)
    try:
        clf = gen_lib.Classifier(objective, mesh, rules, state.params, state.extra,
                                 config.data.pp_eval, batch_size or config.batch_size, num_classes)
    except ValueError as e:
        raise ConfigError(f"classifier_workdir {workdir}: {e}") from None
    size = config.data.get("image_size")
    if image_shape is not None and size:
        got = clf.preprocess(np.zeros((1,) + tuple(image_shape), np.uint8)).shape[1:3]
        if tuple(got) != (int(size), int(size)):
            raise ConfigError(
                f"the classifier in {workdir} takes {size}x{size} images but its pp_eval maps the "
                f"generated {image_shape[0]}x{image_shape[1]} samples to {got[0]}x{got[1]}; train the "
                "classifier at the diffusion model's image size.")
    return clf, config
