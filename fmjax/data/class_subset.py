"""Training on some of a dataset's classes: ``config.data.classes`` / ``config.data.exclude_classes``.

A researcher holds classes out of a base run and adapts to them later (issue 18: LoRA on a
diffusion model for a class its base never saw), or trains a few-class model without
rewriting the dataset. Both options name classes by id or by name, comma-separated
(``'heart'``, ``'0,3'``, ``'ring, heart'``); ``classes`` keeps only those, ``exclude_classes``
drops those; '' (the default) is every class. ``repeat_classes`` ('heart:7', 'heart:7, 0:2')
lists each kept example of those classes that many times, so a class takes a larger share of the
training stream (a new class beside the ones a base run knew, as DreamBooth balances a new
concept against its prior). Only the training split is filtered: evals read
their own splits whole (a generation eval still samples every class, so a held-out class's
``eval/<name>_accuracy_<class>`` shows what the base makes of it).

The subset is the source's examples with a matching ``label``, in source order; the
pipeline shuffles, shards and resumes it like any source (its positions are the stream's).
Finding them reads every label of the split once when the run starts (an image folder's labels
are its file list; a TFDS split decodes each record: the 10 000 bundled
training examples, 2 s). Bad names, unknown ids, an empty subset or a dataset without labels are
one-line ``ConfigError``s in the check phase, before anything is written.
"""
from __future__ import annotations

import numpy as np

from fmjax.errors import ConfigError


def _items(spec) -> list[str]:
    """The non-empty items of a comma-separated string or a list / tuple (None -> [])."""
    if spec is None:
        return []
    raw = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    return [s for s in (str(s).strip() for s in raw) if s]


def parse(spec, option: str, class_names) -> tuple[int, ...]:
    """Class ids of a comma-separated list of ids or names ('' -> ())."""
    items = _items(spec)
    names = [str(n) for n in class_names] if class_names is not None else None
    out = []
    for item in items:
        if item.lstrip("-").isdigit():
            c = int(item)
            if c < 0 or (names is not None and c >= len(names)):
                raise ConfigError(f"{option}={spec!r}: class id {c} is out of range; the dataset has "
                                  f"{len(names) if names is not None else 'no known'} classes"
                                  + (f" ({', '.join(f'{i}={n}' for i, n in enumerate(names))})" if names else "")
                                  + ".")
        elif names is not None and item in names:
            c = names.index(item)
        else:
            raise ConfigError(f"{option}={spec!r}: unknown class {item!r}; use ids or names of "
                              + (", ".join(f"{i}={n}" for i, n in enumerate(names)) if names
                                 else "the dataset's integer labels (it has no class names)") + ".")
        if c not in out:
            out.append(c)
    return tuple(out)


def parse_repeat(spec, class_names) -> dict[int, int]:
    """{class id: count} of ``repeat_classes``' 'name_or_id:count' items ('' -> {})."""
    option = "config.data.repeat_classes"
    out = {}
    for item in _items(spec):
        name, sep, count = item.rpartition(":")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"{option}={spec!r}: {item!r} is not 'class:count' with a count >= 1; "
                              "write e.g. 'heart:7' (every heart example 7 times per pass).")
        for c in parse(name, option, class_names):
            out[c] = int(count)
    return out


def _labels(source) -> np.ndarray:
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels, np.int64)
    out = np.empty(len(source), np.int64)
    for i in range(len(source)):
        label = source[i].get("label")
        if label is None:
            raise ConfigError(f"config.data.classes / exclude_classes filter by label, but {source!r} "
                              "has no 'label' feature: unset them for this dataset.")
        out[i] = int(label)
    return out


class ClassSubset:
    """``source``'s examples whose label is kept, in source order. Other attributes
    (``class_names``, ``paths``, ...) are the source's."""

    def __init__(self, source, indices, classes):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.classes = tuple(int(c) for c in classes)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[int(self.indices[int(index)])]

    def __getattr__(self, name):
        if name.startswith("_") or name in ("source", "indices", "classes"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self):
        return f"ClassSubset({self.source!r}, classes={list(self.classes)}, len={len(self)})"


def select(source, classes="", exclude_classes="", class_names=None, repeat_classes=""):
    """``source`` itself when no option is set, else a ``ClassSubset`` of it."""
    keep = parse(classes, "config.data.classes", class_names)
    drop = parse(exclude_classes, "config.data.exclude_classes", class_names)
    repeat = parse_repeat(repeat_classes, class_names)
    if not keep and not drop and not repeat:
        return source
    labels = _labels(source)
    present = sorted(set(labels.tolist()))
    wanted = [c for c in (keep or present) if c not in drop]
    mask = np.isin(labels, wanted)
    if not mask.any():
        raise ConfigError(f"config.data.classes={classes!r} / exclude_classes={exclude_classes!r} leave "
                          f"no training example (the split's labels are {present}): keep at least one "
                          "class that it has.")
    kept = sorted(set(labels[mask].tolist()))
    if any(c not in kept for c in repeat):
        raise ConfigError(f"config.data.repeat_classes={repeat_classes!r} names class(es) "
                          f"{sorted(c for c in repeat if c not in kept)} that the training subset does not "
                          f"have (it has {kept}): repeat only classes that are trained on.")
    indices = np.nonzero(mask)[0]
    if repeat:  # each example of a repeated class `count` times in a row (the pipeline shuffles)
        counts = np.ones(len(labels), np.int64)
        for c, n in repeat.items():
            counts[labels == c] = n
        indices = np.repeat(indices, counts[indices])
    return ClassSubset(source, indices, kept)
