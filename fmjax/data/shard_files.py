"""Finding the shard files of a split, and the ``fmjax_shards.json`` summary next to them.

Shared by the sharded source kinds (``array_record:`` in ``fmjax.data.records``, ``wds:`` in
``fmjax.data.wds``) and by ``launch/make_shards.py``.

A sharded dataset name is ``<kind>:<location>``; the files of split ``S`` are:

  ``<kind>:DIR``                        ``DIR/S-<digits>*.<ext>`` and ``DIR/S/*.<ext>`` (sorted)
  ``<kind>:/d/{split}-*.<ext>``         a glob; ``{split}`` is replaced by ``S``
  ``<kind>:/d/part-*.<ext>`` or a file  a glob (or one file) without ``{split}``: the ``train``
                                        split only (any other split is an error naming the fix)

Examples are numbered through the files in sorted path order, so every host agrees on
``source[i]``. ``make_shards.py`` names shards ``S-00000-of-00004.<ext>`` and writes
``DIR/fmjax_shards.json``::

  {"record_format": "FMJ1", "class_names": [...] | null,
   "shards": {"array_record": {"train": {"files": ["train-00000-of-00004.array_record", ...],
                                         "counts": [2500, ...], "num_examples": 10000,
                                         "source": "<what was converted>"}, ...},
              "wds": {...}}}

Sources use ``counts`` when the split's files are exactly ``files`` (so a web-scale dataset
opens no shard to learn its length), and ``class_names`` for zero-shot evals and
``num_classes``. The summary is optional: without it every shard is opened once to count.

Paths are local (or a FUSE mount such as gcsfuse): the ArrayRecord reader and the tar reader
here read local files.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

SUMMARY_FILE = "fmjax_shards.json"
SPLIT_FIELD = "{split}"
DEFAULT_SPLIT = "train"
_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_NAME = re.compile(r"^(?P<split>.+?)-\d+(-of-\d+)?\.")


def shard_name(split: str, index: int, count: int, ext: str) -> str:
    """``train-00003-of-00016.array_record``."""
    return f"{split}-{index:05d}-of-{count:05d}.{ext}"


def location(kind: str, name: str) -> str:
    """The ``<location>`` of ``<kind>:<location>``, user-expanded; one-line errors otherwise."""
    prefix = f"{kind}:"
    if not name.startswith(prefix) or not name[len(prefix):].strip():
        raise ValueError(f"Bad dataset name {name!r}: use '{prefix}/path/to/shards_dir' or "
                         f"'{prefix}/path/to/{{split}}-*.<ext>'.")
    return os.path.expanduser(name[len(prefix):])


def is_pattern(loc: str) -> bool:
    return bool(_GLOB_CHARS.search(loc)) or SPLIT_FIELD in loc


def summary_dir(loc: str) -> str:
    """The folder whose ``fmjax_shards.json`` describes ``loc`` (a dir, a glob or a file)."""
    if os.path.isdir(loc) and not is_pattern(loc):
        return loc
    return os.path.dirname(loc) or "."


def splits_found(loc: str, ext: str) -> list:
    """Split names that have shards in folder ``loc`` (prefix or sub-folder form)."""
    if not os.path.isdir(loc):
        return []
    found = set()
    for entry in os.listdir(loc):
        path = os.path.join(loc, entry)
        m = _SHARD_NAME.match(entry)
        if m and entry.endswith("." + ext):
            found.add(m.group("split"))
        elif os.path.isdir(path) and glob.glob(os.path.join(glob.escape(path), f"*.{ext}")):
            found.add(entry)
    return sorted(found)


def split_files_in_dir(loc: str, split: str, ext: str) -> list:
    """``DIR/<split>-[0-9]*.<ext>`` and ``DIR/<split>/*.<ext>``, sorted (may be empty)."""
    d, s = glob.escape(loc), glob.escape(split)
    files = set(glob.glob(os.path.join(d, f"{s}-[0-9]*.{ext}")))  # train-00000-of-00004, train-000123
    files |= set(glob.glob(os.path.join(d, s, f"*.{ext}")))
    return sorted(f for f in files if os.path.isfile(f))


def find_shards(kind: str, name: str, split: str, ext: str, what: str) -> list:
    """The sorted shard files of ``split`` for dataset ``name`` (see the module docstring).

    ``what`` names the file type in errors (e.g. ``'ArrayRecord'``). A missing folder, split
    or an empty glob is a one-line ``FileNotFoundError`` naming the path and the fix; a glob
    without ``{split}`` asked for another split than ``train`` is a ``ValueError``.
    """
    loc = location(kind, name)
    fmt = " --format=wds" if ext == "tar" else ""
    fix = f"write them with `python launch/make_shards.py --source=<data> --split={split} --out=<dir>{fmt}`"
    if is_pattern(loc) or os.path.isfile(loc):
        if SPLIT_FIELD not in loc and split != DEFAULT_SPLIT:
            raise ValueError(
                f"{kind}:{loc} has no {SPLIT_FIELD} in it, so it only names the {DEFAULT_SPLIT!r} "
                f"split, not {split!r}: name a folder ('{kind}:/path/to/dir') or a pattern with "
                f"{SPLIT_FIELD} ('{kind}:/path/to/{SPLIT_FIELD}-*.{ext}').")
        pattern = loc.replace(SPLIT_FIELD, split)
        files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"No {what} shards match {pattern!r} (split {split!r}): fix the "
                                    f"path in '{kind}:{loc}', or {fix}.")
        return files
    if not os.path.isdir(loc):
        raise FileNotFoundError(f"Shard folder {loc!r} does not exist: fix the path in "
                                f"'{kind}:{loc}', or {fix}.")
    files = split_files_in_dir(loc, split, ext)
    if not files:
        raise FileNotFoundError(
            f"No {split!r} {what} shards in {loc!r} (looked for {os.path.join(loc, split)}-[0-9]*.{ext} "
            f"and {os.path.join(loc, split, '*.' + ext)}; splits found: {splits_found(loc, ext)}): "
            f"{fix}.")
    return files


def read_summary(folder: str) -> dict:
    """``folder/fmjax_shards.json`` as a dict, or ``{}`` when absent or unreadable."""
    path = os.path.join(folder, SUMMARY_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summary_counts(files: list, ext: str) -> Optional[list]:
    """Per-file record counts from the summary, when it lists exactly these files, else None."""
    if not files:
        return None
    folder = os.path.dirname(files[0])
    if any(os.path.dirname(f) != folder for f in files):
        return None
    shards = read_summary(folder).get("shards")
    by_split = shards.get(FORMAT_OF_EXT.get(ext, ext)) if isinstance(shards, dict) else None
    for info in (by_split.values() if isinstance(by_split, dict) else ()):
        names, counts = (info.get("files"), info.get("counts")) if isinstance(info, dict) else (0, 0)
        if (isinstance(names, list) and isinstance(counts, list) and len(names) == len(counts)
                and sorted(names) == sorted(os.path.basename(f) for f in files)):
            by_name = dict(zip(names, counts))
            return [int(by_name[os.path.basename(f)]) for f in files]
    return None


FORMAT_OF_EXT = {"array_record": "array_record", "tar": "wds"}


def summary_class_names(kind: str, name: str) -> Optional[list]:
    """``class_names`` from the summary next to dataset ``name``'s shards, or None."""
    names = read_summary(summary_dir(location(kind, name))).get("class_names")
    return list(names) if isinstance(names, list) and names else None


def write_summary(folder: str, split: str, fmt: str, files: list, counts: list,
                  class_names: Optional[list], source: str) -> str:
    """Adds (or replaces) the ``fmt`` / ``split`` entry of ``folder/fmjax_shards.json``, atomically."""
    data = read_summary(folder)
    data["record_format"] = "FMJ1"
    if class_names:
        data["class_names"] = list(class_names)
    else:
        data.setdefault("class_names", None)
    if not isinstance(data.get("shards"), dict):
        data["shards"] = {}
    data["shards"].setdefault(fmt, {})[split] = dict(
        files=[os.path.basename(f) for f in files], counts=[int(c) for c in counts],
        num_examples=int(sum(counts)), source=source)
    path = os.path.join(folder, SUMMARY_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
