"""The pp-op and data-source registries (fmjax/data/registry.py): decorators, lazy imports,
one-line errors naming the valid names."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fmjax.data import registry, sources, text_ops
from fmjax.data import transforms as tr
from fmjax.data.registry import SourceKind, register_op, register_source
from fmjax.data.transform_base import Transform
from fmjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@register_op
class scale_pixels_for_test(Transform):  # noqa: N801
    """A custom op defined outside fmjax (as a future fmjax/data/sam_ops.py would)."""

    def __init__(self, factor, key="image"):
        self.factor, self.key = factor, key

    def __call__(self, example, rng):
        out = dict(example)
        out[self.key] = np.asarray(example[self.key]) * self.factor
        return out


@register_op("add_constant_for_test")
def _make_add(value, key="image"):
    """A function may be an op too: it returns the transform."""
    return tr.Compose([scale_pixels_for_test(1, key)]) if value == 0 else _Add(value, key)


class _Add(Transform):
    def __init__(self, value, key):
        self.value, self.key = value, key

    def __call__(self, example, rng):
        return {**example, self.key: example[self.key] + self.value}


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_registered_op_is_usable_from_a_pp_string():
    t = tr.parse("flip_lr(1.0)|scale_pixels_for_test(3)|add_constant_for_test(1)|keep('image')")
    img = np.arange(6, dtype=np.int64).reshape(1, 2, 3)
    out = t({"image": img, "label": 1}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], img[:, ::-1] * 3 + 1)
    assert set(out) == {"image"}
    assert "scale_pixels_for_test" in tr.OPS and "scale_pixels_for_test" in registry.available_ops()
    assert tr.parse_pp("scale_pixels_for_test(factor=2)", "k").transforms[0].factor == 2


def test_register_op_refuses_clashes():
    with pytest.raises(ValueError, match="built-in of fmjax.data.transforms"):
        @register_op("flip_lr")
        class other_flip(Transform):  # noqa: N801
            pass
    with pytest.raises(ValueError, match="already registered"):
        @register_op("scale_pixels_for_test")
        class other(Transform):  # noqa: N801
            pass
    with pytest.raises(ValueError, match="identifier"):
        register_op("not an identifier")(_Add)
    # Re-registering the same class (a module imported twice, importlib.reload) is fine.
    assert register_op(scale_pixels_for_test) is scale_pixels_for_test


def test_unknown_op_is_one_line_naming_the_valid_ops():
    with pytest.raises(ValueError) as excinfo:
        tr.parse("resize(32)|nosuchop(1)")
    message = _one_line(excinfo)
    assert message.startswith("unknown op 'nosuchop' in 'nosuchop(1)'; valid ops: ")
    for name in ("flip_lr", "tokenize", "randaugment", "random_erasing", "apply_crop", "scale_pixels_for_test"):
        assert name in message
    with pytest.raises(ConfigError) as excinfo:
        tr.parse_pp("resize(32)|nosuchop", "config.data.pp_train")
    assert _one_line(excinfo).startswith("config.data.pp_train: unknown op 'nosuchop'")
    with pytest.raises(ValueError, match="unknown op 'zzz'; valid ops: .*keep"):
        registry.get_op("zzz")


def test_builtin_table_matches_what_the_modules_register():
    for name, module in registry._BUILTIN_OPS.items():
        op = registry.get_op(name)
        assert op.__module__ == module and op.__name__ == name
    assert tr.OPS["tokenize"] is text_ops.tokenize and tr.tokenize is text_ops.tokenize
    assert sorted(tr.OPS) == registry.available_ops() and len(tr.OPS) == len(registry.available_ops())
    with pytest.raises(KeyError):
        tr.OPS["nope"]


def test_ops_and_sources_are_imported_on_first_use():
    code = (
        "import sys\n"
        "from fmjax.data import sources, transforms as tr\n"
        "assert 'fmjax.data.autoaugment' not in sys.modules\n"
        "assert 'fmjax.data.image_folder' not in sys.modules\n"
        "assert 'randaugment' in tr.OPS and 'randaugment' in tr.available_ops()\n"
        "assert 'fmjax.data.autoaugment' not in sys.modules\n"
        "t = tr.parse('randaugment(2, 9)')\n"
        "assert 'fmjax.data.autoaugment' in sys.modules\n"
        "try:\n"
        "    sources.check_source('image_folder:/nonexistent/x', 'train')\n"
        "except FileNotFoundError:\n"
        "    pass\n"
        "assert 'fmjax.data.image_folder' in sys.modules\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


class _MemorySource:
    def __init__(self, n, split):
        self.n, self.split = n, split

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 2}


@register_source("memtest")
def _memtest(name, split, data_dir, **options):
    return _MemorySource(int(name.split(":", 1)[1]), split)


@register_source("memkind")
class _MemKind(SourceKind):
    forms = "'memkind/<n>'"

    def check(self, name, split, data_dir):
        if split != "train":
            raise ValueError(f"Unknown split {split!r} for dataset {name!r}: use one of ['train'].")

    def get(self, name, split, data_dir, **options):
        self.check(name, split, data_dir)
        return _MemorySource(int(name.split("/", 1)[1]), split)

    def class_names(self, name, data_dir):
        return ["even", "odd"]


def test_registered_source_kinds():
    src = sources.get_source("memtest:5", "train")
    assert isinstance(src, _MemorySource) and len(src) == 5 and src[3]["label"] == 1
    sources.check_source("memtest:5", "validation")  # a function kind has no check
    assert sources.class_names("memtest:5") is None and sources.num_classes("memtest:5") is None
    src = sources.get_source("memkind/3", "train", skip_bad_examples=2)
    assert len(src) == 3
    assert sources.class_names("memkind/3") == ["even", "odd"] and sources.num_classes("memkind/3") == 2
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        sources.check_source("memkind/3", "test")
    assert registry.source_kind_name("memkind/3") == "memkind"
    assert registry.source_kind_name("memkindx/3") is None  # a TFDS name
    assert {"memtest", "memkind", "image_folder", "fmjax_shapes", "tfds"} <= set(registry.available_sources())


def test_register_source_refuses_clashes():
    with pytest.raises(ValueError, match="built-in of fmjax.data.image_folder"):
        register_source("image_folder")(_memtest)
    with pytest.raises(ValueError, match="already registered"):
        @register_source("memtest")
        def _other(name, split, data_dir):
            return None
    with pytest.raises(ValueError, match="without ':' or '/'"):
        register_source("a:b")


def test_unknown_source_is_one_line_naming_the_valid_ones():
    for name in ("imagefolder:/data/x", "no_such_dataset_xyz", "", "tfds:"):
        with pytest.raises(ValueError) as excinfo:
            sources.get_source(name, "train")
        message = _one_line(excinfo)
        assert message.startswith("Unknown dataset name")
        for form in ("'fmjax_shapes/<resolution>'", "'image_folder:<path>'", "'memkind/<n>'",
                     "'memtest:<arg>'", "TFDS catalog name"):
            assert form in message, message
    with pytest.raises(ValueError, match="Unexpected options"):
        sources.get_source("fmjax_shapes/32", "train", captions_file="x")


def test_existing_names_resolve_to_the_same_kinds(tmp_path):
    kinds = {"fmjax_shapes": "fmjax_shapes", "fmjax_shapes/32": "fmjax_shapes",
             "fmjax_shapes/simple_32": "fmjax_shapes", "image_folder:/x/y": "image_folder",
             "imagenet2012": None, "mnist:3.0.1": None, "coco/2017": None, "tfds:mnist": "tfds"}
    for name, kind in kinds.items():
        assert registry.source_kind_name(name) == kind, name
    assert sources.num_classes("tfds:mnist", data_dir=str(tmp_path)) == 10
    assert sources.class_names("fmjax_shapes/32")[0] == "circle"
