"""Random-access data sources by name.

Names:
  fmjax_shapes, fmjax_shapes/<resolution>  the bundled procedural dataset; it
                                           prepares itself on first use.
  fmjax_shapes/simple_<resolution>         its simple variant (main object only,
                                           plain background; see fmjax.data.shapes).
  image_folder:<path>                      root/<split>/<class>/*.{png,jpg,jpeg}
  array_record:<dir or glob>               ArrayRecord shards of FMJ1 records
                                           (fmjax.data.records; launch/make_shards.py)
  wds:<dir or glob>                        webdataset-style tars of image + caption
                                           (fmjax.data.wds)
  sa1b:<dir>                               SA-1B as released: sa_*.jpg + sa_*.json pairs,
                                           up to 64 instance masks each (fmjax.data.sa1b)
  <tfds name>[/<config>][:<version>]       any prepared TFDS catalog dataset,
  tfds:<tfds name>...                      read with `tfds.data_source`.

A name's kind is its head before the first ':' or '/' when that is a registered source kind
(``fmjax.data.registry``: ``@register_source('coco')`` on a ``SourceKind`` adds ``coco``,
``coco/<rest>`` and ``coco:<rest>`` names from any module; the built-in kinds' modules are
imported on first use); any other name is a TFDS catalog name. An unknown name is a
one-line ValueError naming the valid forms.

Every source has `len()` and `__getitem__(i)` returning a dict of numpy values:
`image` uint8 (H, W, 3) RGB, `label` int when the dataset has labels,
`caption` str when it has captions, plus the dataset's other fields (text
decoded to str). Sources are picklable (grain worker processes): the
underlying readers are reopened lazily after unpickling.

An example that cannot be read (a corrupt image file, a TFDS record that does not
decode) raises ``bad_examples.BadExampleError``, a one-line ``fmjax.errors.DataError``
naming it; ``get_source(..., skip_bad_examples=N)`` skips up to N of them instead.
"""
import contextlib
import fcntl
import logging
import os
import re
import shutil

import numpy as np

from fmjax.data import bad_examples
from fmjax.data import registry
from fmjax.data import shapes
from fmjax.data.registry import SourceKind, register_source


class _DropOpenCVAdvice(logging.Filter):
    """TFDS logs "OpenCV is not installed ... recommend" the first time a data thread decodes an
    image with PIL. PIL is the decoder we ship with, and the line, printed from a prefetch thread at
    a random moment, would land between a launcher's progress output and its one-line error."""

    def filter(self, record):
        return not str(record.msg).startswith("OpenCV is not installed")


logging.getLogger("absl").addFilter(_DropOpenCVAdvice())

SHAPES_NAME = "fmjax_shapes"
IMAGE_FOLDER_PREFIX = "image_folder:"
TFDS_PREFIX = "tfds:"


def valid_forms():
    """Every kind of dataset name, for errors."""
    return registry.source_forms()


def _unknown(name):
    return ValueError(f"Unknown dataset name {name!r}: use {valid_forms()}.")


def default_data_dir(data_dir=None):
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (absolute)."""
    data_dir = str(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    if "://" in data_dir:  # a bucket (gs://...): TFDS reads it through etils.epath
        return data_dir.rstrip("/")
    return os.path.abspath(os.path.expanduser(data_dir))


def _shapes_config(name):
    """The builder config name ('64', 'simple_32') of an fmjax_shapes name, or None if
    `name` is not one."""
    if name == SHAPES_NAME:
        return shapes.config_name(shapes.DEFAULT_RESOLUTION)
    if not name.startswith(SHAPES_NAME + "/"):
        return None
    config = name.split("/", 1)[1].split(":")[0]
    variant, _, res = config.rpartition("_")
    variant = variant or "full"
    if variant not in shapes.VARIANTS or variant == "full" and "_" in config:
        raise ValueError(f"Unknown {SHAPES_NAME} variant in {name!r}: use '{SHAPES_NAME}/<resolution>' "
                         f"or '{SHAPES_NAME}/simple_<resolution>', e.g. '{SHAPES_NAME}/simple_32'.")
    if not res.isdigit() or int(res) not in shapes.RESOLUTIONS:
        raise ValueError(f"Unknown {SHAPES_NAME} resolution {res!r} in {name!r}: "
                         f"use one of {list(shapes.RESOLUTIONS)}, e.g. '{SHAPES_NAME}/64'.")
    return shapes.config_name(int(res), variant)


def _shapes_resolution(name):
    """Resolution of an fmjax_shapes name, or None if `name` is not one."""
    config = _shapes_config(name)
    return None if config is None else int(config.rpartition("_")[2])


_SLICE = re.compile(r"^\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*$")


def _check_split(split, valid, name):
    """A split name, or TFDS's slice of one (``heldout[:500]``, ``train[10%:]``), or TFDS's
    concatenation of those (``heldout[:500]+train``) for the TFDS and fmjax_shapes kinds: e.g.
    adapting on half of a split (with some of the original data) and evaluating on the other."""
    if isinstance(split, str) and "+" in split:
        for part in split.split("+"):
            _check_split(part.strip(), valid, name)
        return
    base, bracket, rest = split.partition("[") if isinstance(split, str) else (split, "", "")
    if base not in valid:
        raise ValueError(f"Unknown split {split!r} for dataset {name!r}: use one of {sorted(valid)}"
                         f" (or a slice of one, e.g. '{sorted(valid)[0]}[:50%]').")
    if bracket and not (rest.endswith("]") and _SLICE.match(rest[:-1])):
        raise ValueError(f"Bad split slice {split!r} for dataset {name!r}: write '<split>[start:end]' "
                         f"with examples or percents, e.g. '{base}[:500]' or '{base}[50%:]'.")


def _to_numpy(example):
    """Makes every value numpy (or str/int), decodes bytes text, RGB images."""
    out = {}
    for key, value in example.items():
        if isinstance(value, dict):
            value = _to_numpy(value)
        elif isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            value = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v,
                                 otypes=[object])(value) if value.size else value
        elif key == "label" and isinstance(value, (int, np.integer)):
            value = int(value)
        out[key] = value
    image = out.get("image")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 1:
        out["image"] = np.repeat(image, 3, axis=-1)  # grayscale -> RGB
    return out


@contextlib.contextmanager
def _file_lock(path):
    """Exclusive advisory lock, so processes on one host prepare only once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_shapes(resolution=shapes.DEFAULT_RESOLUTION, data_dir=None):
    """Prepares fmjax_shapes/<resolution> in data_dir if needed; returns the builder.
    ``resolution`` may also be a builder config name such as 'simple_32'.

    TFDS writes into an `incomplete.*` folder and renames it when done, so an
    interrupted preparation leaves no half dataset; its leftovers are removed
    here and the preparation is redone.
    """
    data_dir = default_data_dir(data_dir)
    config_dir = os.path.join(data_dir, SHAPES_NAME, str(resolution))
    with _file_lock(os.path.join(data_dir, SHAPES_NAME, f".{resolution}.lock")):
        builder = shapes.FmjaxShapes(config=str(resolution), data_dir=data_dir,
                                     file_format="array_record")
        if not builder.is_prepared():
            if os.path.isdir(config_dir):
                for entry in os.listdir(config_dir):
                    if entry.startswith("incomplete."):
                        shutil.rmtree(os.path.join(config_dir, entry), ignore_errors=True)
            builder.download_and_prepare()
    return builder


class TfdsSource:
    """A picklable wrapper over `tfds.data_source` returning numpy dicts."""

    def __init__(self, name, split, data_dir):
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds
            if _shapes_config(self.name) is not None:
                shapes_builder = prepare_shapes(_shapes_config(self.name), self.data_dir)
                self._source = shapes_builder.as_data_source(split=self.split)
            else:
                self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        return self._source

    def __len__(self):
        return self._len

    def __getitem__(self, index):
        index = int(index)
        source = self._open()
        try:
            return _to_numpy(source[index])
        except IndexError:
            raise
        except Exception as e:  # noqa: BLE001 - a record that does not decode (TFDS / PIL / utf-8)
            raise bad_examples.BadExampleError(
                f"example {index} of {self.name!r} split {self.split!r} in {self.data_dir}",
                f"{type(e).__name__}: {e}",
                "prepare the dataset again (delete its folder under the data_dir and rerun, or run "
                f"`tfds build {self.name.split(':')[0]} --data_dir={self.data_dir}`)") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self):
        return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, len={self._len})"


def _not_prepared(name, data_dir):
    return FileNotFoundError(
        f"Dataset {name!r} is not prepared in {data_dir}: run `pip install 'fmjax[tf]'` then "
        f"`tfds build {name.split(':')[0]} --data_dir={data_dir}`, or point --config.data.data_dir "
        f"(or $TFDS_DATA_DIR) at a directory that holds it.")


def _catalog_builder(name, data_dir):
    """The TFDS builder for a catalog name, with one-line errors for bad names."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered
    try:
        return tfds.builder(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
        raise _unknown(name) from None
    except Exception as e:  # Some catalog builders import TensorFlow; read from files.
        try:
            return tfds.builder_from_directories([os.path.join(data_dir, name.split(":")[0])])
        except Exception:
            raise _not_prepared(name, data_dir) from e


def _no_options(name, options):
    if options:
        raise ValueError(f"Unexpected options {sorted(options)} for dataset {name!r}; "
                         "only image folders take options.")


@register_source(SHAPES_NAME)
class ShapesKind(SourceKind):
    """``fmjax_shapes[/<resolution>|/simple_<resolution>]``: prepared on first use."""

    forms = (f"'{SHAPES_NAME}', '{SHAPES_NAME}/<resolution>' or '{SHAPES_NAME}/simple_<resolution>' "
             f"(resolution in {list(shapes.RESOLUTIONS)})")

    @staticmethod
    def config(name):
        config = _shapes_config(name)
        if config is None:
            raise _unknown(name)
        return config

    def check(self, name, split, data_dir):
        self.config(name)
        _check_split(split, shapes.SPLITS, name)

    def get(self, name, split, data_dir, **options):
        _no_options(name, options)
        config = self.config(name)
        _check_split(split, shapes.SPLITS, name)
        return TfdsSource(f"{SHAPES_NAME}/{config}", split, data_dir)

    def class_names(self, name, data_dir):
        return list(shapes.CLASS_NAMES)


@register_source("tfds")
class TfdsKind(SourceKind):
    """A prepared TFDS catalog dataset: ``<name>[/<config>][:<version>]``, or the same after
    ``tfds:`` (to read a TFDS name that a registered kind would otherwise claim)."""

    forms = f"'{TFDS_PREFIX}<tfds name>'"

    @staticmethod
    def catalog_name(name):
        if name.startswith(TFDS_PREFIX):
            name = name[len(TFDS_PREFIX):]
        if not name or name == "tfds" or name.startswith("tfds/"):
            raise _unknown(name)
        return name

    def check(self, name, split, data_dir):
        name = self.catalog_name(name)
        builder = _catalog_builder(name, data_dir)
        if not builder.is_prepared():
            raise _not_prepared(name, data_dir)
        _check_split(split, set(builder.info.splits.keys()), name)

    def get(self, name, split, data_dir, **options):
        _no_options(name, options)
        self.check(name, split, data_dir)
        return TfdsSource(self.catalog_name(name), split, data_dir)

    def class_names(self, name, data_dir):
        names = getattr(_catalog_label(self.catalog_name(name), data_dir), "names", None)
        return list(names) if names else None

    def num_classes(self, name, data_dir):
        return getattr(_catalog_label(self.catalog_name(name), data_dir), "num_classes", None)


def _kind(name):
    """The ``SourceKind`` of a dataset name (a registered kind, else TFDS)."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(name)
    kind = registry.source_kind_name(name)
    if kind is None:
        if ":" in name and not name.split(":")[-1].replace(".", "").isdigit():
            raise _unknown(name)
        kind = "tfds"
    return registry.get_source_kind(kind)


def check_source(name, split, data_dir=None):
    """Validates a dataset name, split and availability cheaply, before any compile.

    Does not prepare fmjax_shapes (it prepares itself on first use). Raises
    ValueError (bad name or split) or FileNotFoundError (missing data) with a
    one-line message naming the fix.
    """
    _kind(name).check(name, split, default_data_dir(data_dir))


def get_source(name, split, data_dir=None, skip_bad_examples=0, **kw):
    """Returns a random-access source for dataset `name` and `split`.

    `skip_bad_examples` (config.data.skip_bad_examples): up to that many unreadable
    examples are replaced by the next readable one, each with a one-line warning
    (see `bad_examples.SkipBadExamples`); 0 makes the first one a `DataError`.
    Extra keyword arguments go to the source kind (e.g. `captions_file` for image
    folders); the built-in TFDS and fmjax_shapes kinds take none.
    """
    max_bad = bad_examples.check_budget(skip_bad_examples)
    source = _kind(name).get(name, split, default_data_dir(data_dir), **kw)
    return bad_examples.skip_bad_examples(source, max_bad)


def _catalog_label(name, data_dir):
    """The `label` feature of a TFDS catalog dataset, or None."""
    features = _catalog_builder(name, default_data_dir(data_dir)).info.features
    try:
        return features["label"]
    except (KeyError, TypeError):
        return None


def class_names(name, data_dir=None):
    """Class names of a dataset's `label`, or None where unknown."""
    return _kind(name).class_names(name, default_data_dir(data_dir))


def num_classes(name, data_dir=None):
    """Number of classes of a dataset's `label`, or None where unknown."""
    return _kind(name).num_classes(name, default_data_dir(data_dir))
