"""config.data.classes / exclude_classes: training on some of a dataset's classes."""
import numpy as np
import pytest

from fmjax.data import class_subset
from fmjax.errors import ConfigError
from fmjax.testing import load_config
from fmjax.train import setup

NAMES = ["circle", "square", "heart"]


class _Labelled:
    """A source with a ``labels`` array (as image folders have)."""
    class_names = NAMES

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(label=int(self.labels[i]), index=i)


class _Records(_Labelled):
    """A source whose labels are only in its records (as TFDS splits)."""

    def __init__(self, labels):
        self._l = list(labels)

    def __len__(self):
        return len(self._l)

    def __getitem__(self, i):
        return dict(label=self._l[i], index=i)


def test_parse_ids_and_names():
    assert class_subset.parse("", "x", NAMES) == ()
    assert class_subset.parse("heart, 0", "x", NAMES) == (2, 0)
    assert class_subset.parse("1,square", "x", NAMES) == (1,)          # one class once
    assert class_subset.parse(("heart",), "x", NAMES) == (2,)
    assert class_subset.parse("5", "x", None) == (5,)                    # no names: ids only


@pytest.mark.parametrize("spec, text", [("blob", "unknown class 'blob'; use ids or names of 0=circle"),
                                        ("3", "class id 3 is out of range; the dataset has 3 classes"),
                                        ("-1", "class id -1 is out of range")])
def test_bad_classes_are_one_line_errors(spec, text):
    with pytest.raises(ConfigError, match=text) as e:
        class_subset.parse(spec, "config.data.classes", NAMES)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make", [_Labelled, _Records])
def test_select_keeps_the_classes_in_source_order(make):
    src = make([0, 2, 1, 2, 0, 2])
    assert class_subset.select(src) is src
    kept = class_subset.select(src, classes="heart", class_names=NAMES)
    assert len(kept) == 3 and [kept[i]["index"] for i in range(3)] == [1, 3, 5]
    assert kept.class_names == NAMES and kept.classes == (2,)
    rest = class_subset.select(src, exclude_classes="heart", class_names=NAMES)
    assert [rest[i]["label"] for i in range(len(rest))] == [0, 1, 0]
    both = class_subset.select(src, classes="0,2", exclude_classes="0", class_names=NAMES)
    assert [both[i]["index"] for i in range(len(both))] == [1, 3, 5]
    with pytest.raises(ConfigError, match="leave no training example"):
        class_subset.select(src, classes="square", exclude_classes="1", class_names=NAMES)


def test_a_source_without_labels_is_refused():
    class _NoLabels(_Records):
        def __getitem__(self, i):
            return dict(image=i)
    with pytest.raises(ConfigError, match="has no 'label' feature"):
        class_subset.select(_NoLabels([0]), classes="0")


def test_train_source_of_the_bundled_data(shapes_data_dir):
    """On fmjax_shapes by name; the pipeline reads the subset (pickled, as grain's workers do)."""
    import pickle
    c = load_config("diffusion", "cpu")
    c.data.data_dir = shapes_data_dir
    c.data.classes = "heart"
    src = setup.train_source(c)
    labels = {int(src[i]["label"]) for i in range(0, len(src), 97)}
    assert labels == {6} and 0 < len(src) < 10000 // 4, (labels, len(src))
    again = pickle.loads(pickle.dumps(src))
    assert len(again) == len(src) and again[3]["label"] == 6
    c.data.classes, c.data.exclude_classes = "", "heart,ring"
    rest = setup.train_source(c)
    assert len(rest) + len(src) < 10000 and {int(rest[i]["label"]) for i in range(0, len(rest), 50)} <= set(range(6))
    c.data.exclude_classes = "hearts"
    with pytest.raises(ConfigError, match="config.data.exclude_classes='hearts': unknown class 'hearts'"):
        setup.train_source(c)


@pytest.mark.parametrize("make", [_Labelled, _Records])
def test_repeat_classes_lists_their_examples_that_many_times(make):
    src = make([0, 2, 1, 2, 0])
    more = class_subset.select(src, repeat_classes="heart:3", class_names=NAMES)
    assert [more[i]["index"] for i in range(len(more))] == [0, 1, 1, 1, 2, 3, 3, 3, 4]
    assert more.classes == (0, 1, 2)
    both = class_subset.select(src, exclude_classes="square", repeat_classes="heart:2, 0:2", class_names=NAMES)
    assert [both[i]["index"] for i in range(len(both))] == [0, 0, 1, 1, 3, 3, 4, 4]
    assert class_subset.parse_repeat("", NAMES) == {} and class_subset.parse_repeat("2:1", NAMES) == {2: 1}


@pytest.mark.parametrize("spec, text", [
    ("heart", "'heart' is not 'class:count' with a count >= 1; write e.g. 'heart:7'"),
    ("heart:0", "'heart:0' is not 'class:count'"),
    ("heart:x", "'heart:x' is not 'class:count'"),
    (":3", "':3' is not 'class:count'"),
    ("hearts:2", "unknown class 'hearts'"),
    ("square:2", r"names class\(es\) \[1\] that the training subset does not have"),
])
def test_bad_repeat_classes_are_one_line_errors(spec, text):
    with pytest.raises(ConfigError, match=text) as e:
        class_subset.select(_Labelled([0, 2, 1]), exclude_classes="square", repeat_classes=spec,
                            class_names=NAMES)
    assert "\n" not in str(e.value) and "config.data.repeat_classes=" in str(e.value)


def test_repeat_classes_from_the_config(shapes_data_dir):
    c = load_config("diffusion", "cpu")
    c.data.data_dir = shapes_data_dir
    plain = setup.train_source(c)
    c.data.repeat_classes = "heart:3"
    src = setup.train_source(c)
    assert len(src) - len(plain) == 2 * len(setup.train_source(_only(c, "heart"))) > 0


def _only(c, name):
    c = c.copy_and_resolve_references()
    c.data.classes, c.data.repeat_classes = name, ""
    return c
