"""Setting up a run from its config: the objective, mesh and rules, and the batch spec.

Shared by training (``loop``), restoring (``restore``), evaluation and the benchmark, so
none of them imports another for it.
"""
from __future__ import annotations

import jax
import numpy as np

from fmjax.errors import ConfigError, DataError
from fmjax.objectives.base import make_objective
from fmjax.parallel import mesh as mesh_lib
from fmjax.parallel import rules as rules_lib


def batch_spec(source, transform, keys, global_batch):
    """Shapes of one global batch, from one transformed example (the iterator is untouched)."""
    try:
        example = transform(source[0], np.random.default_rng(0))
    except DataError:  # an unreadable first example: the data's fault, not pp_train's
        raise
    except (KeyError, ValueError, TypeError) as e:  # e.g. keep() of a key the data lacks
        raise ConfigError(f"config.data.pp_train fails on the first training example: "
                          f"{e}") from None
    missing = [k for k in keys if k not in example]
    if missing:
        raise ConfigError(
            f"the objective needs batch keys {list(keys)} but config.data.pp_train gives "
            f"{sorted(example)}: add {missing} to its keep(...) and the ops that make them"
            + (" (hard negatives: swap_words(words)|tokenize(..., key='neg_caption', "
               "outkey='neg_tokens'))" if "neg_tokens" in missing else "") + ".")
    return {k: jax.ShapeDtypeStruct((global_batch,) + np.asarray(example[k]).shape,
                                    jax.dtypes.canonicalize_dtype(np.asarray(example[k]).dtype))
            for k in keys}


def train_source(config):
    """The training split's random-access source, as ``config.data`` names it (only the classes
    ``config.data.classes`` / ``exclude_classes`` keep, ``repeat_classes`` repeated:
    ``fmjax.data.class_subset``)."""
    from fmjax.data import class_subset, sources
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"),
                                skip_bad_examples=config.data.get("skip_bad_examples", 0))
    classes, exclude = config.data.get("classes", ""), config.data.get("exclude_classes", "")
    repeat = config.data.get("repeat_classes", "")
    if not classes and not exclude and not repeat:
        return source
    return class_subset.select(source, classes, exclude,
                               sources.class_names(config.data.name, config.data.get("data_dir")), repeat)


def train_iterator(config, source, transform, spec):
    """The training batches of ``config``: the iterator the trainer draws from (and
    ``launch/store_logits.py`` replays), in ``config.data.order``."""
    from fmjax.data import elastic
    return elastic.make_train_iterator(
        source, order=config.data.get("order", "per_process"), global_batch_size=config.batch_size,
        transform=transform, seed=config.seed, worker_count=config.data.get("worker_count", 0),
        read_threads=int(config.data.get("read_threads", 4)),
        example_shapes={k: v.shape[1:] for k, v in spec.items()})


def host_arrays(local, spec):
    """The spec'd entries of a host batch, in the dtypes the step was compiled for (int64 -> int32)."""
    return {k: np.asarray(local[k], dtype=spec[k].dtype) for k in spec}


def build(config, devices=None):
    """(objective, mesh, logical rules) from a config; bad names are ``ConfigError``s."""
    try:
        return (make_objective(config), mesh_lib.make_mesh(config.mesh, devices),
                rules_lib.get_rules(config.get("sharding", "fsdp")))
    except ValueError as e:  # unknown names, impossible meshes: the user's input, not a bug
        raise ConfigError(str(e)) from None
