"""A TFDS-free reader for a user's own image folders (TFDS's ImageFolder needs TF).

Layout:
  root/<split>/<class_name>/*.{png,jpg,jpeg}     labelled images
  root/<split>/*.{png,jpg,jpeg}                  unlabelled images (label -1)

Optional captions, in `<split>/captions.{tsv,jsonl}` or `root/captions.{tsv,jsonl}`
(the first found), with image paths relative to the folder holding the file:
  captions.tsv:    <relative/path.jpg>\t<caption>          one per line
  captions.jsonl:  {"image": "<relative/path.jpg>", "caption": "..."}   one per line
When a captions file is present, every image of the split needs a caption. A bad captions
file (a line that is not JSON, lacks a key, names a missing image, has an empty caption)
is a one-line ``fmjax.errors.DataError`` naming file:line, raised when the source is opened.
An image that does not decode is a ``bad_examples.BadExampleError`` (a ``DataError``)
naming the file, raised when it is read (see ``bad_examples`` for skipping such files).

Class indices are the sorted union of class folder names over all splits, so
they agree between splits. Named ``image_folder:<path>`` in ``fmjax.data.sources``.
"""
import json
import os

import numpy as np
from PIL import Image

from fmjax.data.bad_examples import BadExampleError
from fmjax.data.registry import SourceKind, register_source
from fmjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CAPTION_FILES = ("captions.tsv", "captions.jsonl")


def _is_image(filename):
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def _split_dir(root, split):
    """Checks root and root/split exist; returns the split directory."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root!r} does not exist: create it as {root}/<split>/<class_name>/*.jpg "
            f"or fix the path in 'image_folder:<path>'.")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise FileNotFoundError(
            f"Split folder {split_dir!r} does not exist (splits found: {found}): "
            f"put the {split!r} images in {split_dir}/<class_name>/.")
    return split_dir


def folder_class_names(root):
    """Sorted union of class folder names over every split under `root`."""
    if not os.path.isdir(root):
        return []
    names = set()
    for split in os.listdir(root):
        split_dir = os.path.join(root, split)
        if os.path.isdir(split_dir):
            names.update(d for d in os.listdir(split_dir)
                         if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    return sorted(names)


def _list_images(root, split):
    """Returns [(relative path from the split dir, label)] sorted by path."""
    split_dir = _split_dir(root, split)
    class_to_index = {name: i for i, name in enumerate(folder_class_names(root))}
    items = []
    for entry in sorted(os.listdir(split_dir)):
        path = os.path.join(split_dir, entry)
        if os.path.isdir(path) and entry in class_to_index:
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for f in sorted(filenames):
                    if _is_image(f):
                        rel = os.path.relpath(os.path.join(dirpath, f), split_dir)
                        items.append((rel, class_to_index[entry]))
        elif _is_image(entry):
            items.append((entry, -1))
    if not items:
        raise FileNotFoundError(
            f"No images found in {split_dir!r}: add {'/'.join(IMAGE_EXTENSIONS)} files "
            f"under {split_dir}/<class_name>/.")
    return items


def find_captions_file(root, split):
    """The captions file for a split, or None."""
    for folder in (os.path.join(root, split), root):
        for name in CAPTION_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


class MissingCaptionedImageError(DataError, FileNotFoundError):
    """A captions line names an image file that does not exist."""


_CAPTION_EXAMPLE = '{"image": "cls/a.jpg", "caption": "..."}'


def _caption_lines(captions_file):
    """Yields (line number, line) of a UTF-8 text file; bad bytes are a DataError at file:line."""
    try:
        f = open(captions_file, "rb")
    except OSError as e:
        raise DataError(f"cannot read captions file {captions_file} ({e.strerror or e}): "
                        "fix its permissions or path.") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{captions_file}:{lineno}: not UTF-8 text ({e.reason} at byte "
                                f"{e.start}); save the file as UTF-8.") from None
            yield lineno, line.rstrip("\n").rstrip("\r")


def _parse_caption_line(captions_file, where, line):
    """(relative image path, caption) of one non-blank line of a captions file."""
    if captions_file.endswith(".jsonl"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}); write one object per line "
                            f"like {_CAPTION_EXAMPLE}.") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; "
                            f"write one object per line like {_CAPTION_EXAMPLE}.")
        rel = record.get("image", record.get("file", record.get("path")))
        caption = record.get("caption", record.get("text"))
        if not isinstance(rel, str) or caption is None:
            raise DataError(f'{where}: need keys "image" and "caption"; write {_CAPTION_EXAMPLE}.')
        if not isinstance(caption, str):
            raise DataError(f"{where}: the caption of {rel!r} is a {type(caption).__name__}, not a "
                            f"string; write it as text, like {_CAPTION_EXAMPLE}.")
    else:
        if "\t" not in line:
            raise DataError(f"{where}: expected '<image path><TAB><caption>'; "
                            "fix the line: separate the path and the caption with a tab.")
        rel, caption = line.split("\t", 1)
    return rel, caption


def _read_captions(captions_file):
    """Returns {absolute normalized image path: (caption, line number)}.

    Any bad line is a one-line ``DataError`` naming ``file:line`` and the fix.
    """
    base = os.path.dirname(os.path.abspath(captions_file))
    captions = {}
    for lineno, line in _caption_lines(captions_file):
        if not line.strip():
            continue
        where = f"{captions_file}:{lineno}"
        rel, caption = _parse_caption_line(captions_file, where, line)
        if not caption.strip():
            raise DataError(f"{where}: empty caption for {rel!r}; write a caption or remove the line "
                            "(and the image).")
        path = os.path.normpath(os.path.join(base, rel))
        if not os.path.isfile(path):
            raise MissingCaptionedImageError(
                f"{where}: image {rel!r} does not exist (looked for {path}); "
                "fix the path (relative to the captions file) or remove the line.")
        captions[path] = (caption.strip(), lineno)
    return captions


def check_image_folder(root, split):
    """Cheap validation: the folders exist and hold images."""
    _list_images(root, split)


def read_rgb(path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB (grayscale / alpha converted); PIL's errors pass."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


class ImageFolderSource:
    """Random-access source over root/<split>/<class_name>/*.{png,jpg,jpeg}.

    `source[i]` is dict(image=uint8 (H, W, 3) RGB, label=int (-1 without a
    class folder), caption=str when a captions file exists, file_name=str).
    """

    def __init__(self, root, split, captions_file=None):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.split = split
        self.class_names = folder_class_names(self.root)
        items = _list_images(self.root, split)
        split_dir = os.path.join(self.root, split)
        self.paths = [os.path.join(split_dir, rel) for rel, _ in items]
        self.labels = np.array([label for _, label in items], np.int64)
        self.captions = None
        if captions_file is None:
            captions_file = find_captions_file(self.root, split)
        elif not os.path.isfile(captions_file):
            raise FileNotFoundError(f"Captions file {captions_file!r} does not exist: fix the path "
                                    "or omit it to use <root>/captions.tsv.")
        self.captions_file = captions_file
        if captions_file:
            table = _read_captions(captions_file)
            self.captions = []
            for path in self.paths:
                entry = table.get(os.path.normpath(path))
                if entry is None:
                    raise DataError(f"{captions_file}: no caption for image {path!r}; "
                                    "add a line for it or remove the image.")
                self.captions.append(entry[0])

    @property
    def num_classes(self):
        return len(self.class_names)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        index = int(index)
        path = self.paths[index]
        try:
            image = read_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise BadExampleError(f"image {path}", str(e) or type(e).__name__,
                                  "replace or remove the file") from None
        out = dict(image=image, label=int(self.labels[index]),
                   file_name=os.path.relpath(path, self.root))
        if self.captions is not None:
            out["caption"] = self.captions[index]
        return out

    def __repr__(self):
        return f"ImageFolderSource({self.root!r}, split={self.split!r}, len={len(self)})"


PREFIX = "image_folder:"


@register_source("image_folder", forms=f"'{PREFIX}<path>'")
class ImageFolderKind(SourceKind):
    """``image_folder:<path>`` names; ``get`` takes ``captions_file``."""

    @staticmethod
    def root(name):
        if not name.startswith(PREFIX):
            raise ValueError(f"Unknown dataset name {name!r}: use '{PREFIX}/path/to/root'.")
        path = name[len(PREFIX):]
        if not path:
            raise ValueError(f"Empty path in {name!r}: use '{PREFIX}/path/to/root'.")
        return os.path.expanduser(path)

    def check(self, name, split, data_dir):
        check_image_folder(self.root(name), split)

    def get(self, name, split, data_dir, **options):
        return ImageFolderSource(self.root(name), split, **options)

    def class_names(self, name, data_dir):
        return folder_class_names(self.root(name)) or None
