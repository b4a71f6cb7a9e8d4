"""webdataset-style tar shards of image + caption: ``wds:<dir or glob>`` dataset names.

Names are those of ``array_record:`` with ``.tar`` files (``fmjax.data.shard_files``):
``wds:DIR`` reads split S from ``DIR/S-<digits>*.tar`` and ``DIR/S/*.tar``; ``wds:/d/{split}-*.tar`` is a
glob. Examples are numbered through the tars in sorted path order, samples in tar order.

A sample is the tar members that share a key (webdataset's convention: the member path up to
the first '.' of its file name); its members, by extension (case-insensitive):

  <key>.jpg .jpeg .png .webp .bmp .gif .tif .tiff   the image (required)  -> image: uint8 (H, W, 3) RGB
  <key>.txt                                          UTF-8 caption         -> caption: str (stripped)
  <key>.cls                                          decimal class index   -> label: int
  <key>.json                                         a JSON object; its keys are added unless the
                                                     members above already set them

Other members are ignored; ``file_name`` is ``<tar name>/<key>``. A sample without an image is
skipped with a one-line warning when its shard is indexed. Tars must be uncompressed:
``.tar.gz`` cannot be read at random (decompress them, or convert with ``launch/make_shards.py``).

Random access (what grain's shuffle and exact resume need): each tar's index (per sample, the
byte offset and size of each member) is built once by reading the tar headers, and cached in a
sidecar ``<tar>.fmjax_index.npz`` next to it when the folder is writable (else kept in memory,
and rebuilt by each process). A sidecar is used while its tar has the recorded size and either
the recorded mtime or the recorded hash of its first and last 64 KiB (so a copied dataset keeps
its sidecars); otherwise it is rebuilt. ``launch/make_shards.py --format=wds`` writes the
sidecars and ``fmjax_shards.json`` (record counts, so no index is read to learn ``len``).
Reading a sample is one ``open`` and a seek + read per member, from any thread or process.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import sys
import tarfile
import threading
from typing import Optional

import numpy as np
from PIL import Image

from fmjax.data import records, shard_files
from fmjax.data.bad_examples import BadExampleError
from fmjax.data.registry import SourceKind, register_source
from fmjax.errors import DataError

KIND = "wds"
EXT = "tar"
INDEX_SUFFIX = ".fmjax_index.npz"
INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
COLUMNS = ("image", "txt", "cls", "json")          # index columns: (offset, size) each; -1 absent
_COLUMN = {**{e: 0 for e in IMAGE_EXTS}, "txt": 1, "cls": 2, "json": 3}
_HASH_SPAN = 64 * 1024
_CACHE_SHARDS = 64                                  # indexes kept loaded per process


def index_path(tar_path: str) -> str:
    return tar_path + INDEX_SUFFIX


def _warn(msg: str) -> None:
    print(f"fmjax: warning: {msg}", file=sys.stderr, flush=True)


def _edge_hash(path: str, size: int) -> str:
    """sha1 of the first and last 64 KiB: identifies a tar's contents cheaply."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > _HASH_SPAN:
            f.seek(max(_HASH_SPAN, size - _HASH_SPAN))
            h.update(f.read(_HASH_SPAN))
    return h.hexdigest()


def build_index(path: str) -> tuple:
    """``(rows, keys)`` of a tar: ``rows`` int64 (n, 8) = (offset, size) of the image, txt, cls
    and json members of each sample (-1: absent), ``keys`` the sample keys (str array)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" \
            or head[:4] == b"\x28\xb5\x2f\xfd":
        raise DataError(f"{path} is a compressed tar, which cannot be read at random: decompress it "
                        "(e.g. `gunzip -c x.tar.gz > x.tar`) or convert it with launch/make_shards.py.")
    samples: dict = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, fname = m.name.rpartition("/")
                stem, dot, ext = fname.partition(".")
                if not dot or not stem or fname.startswith("."):
                    continue
                col = _COLUMN.get(ext.lower())
                if col is None:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                row = samples.setdefault(key, [-1] * 8)
                if row[2 * col] < 0:
                    row[2 * col], row[2 * col + 1] = m.offset_data, m.size
    except tarfile.TarError as e:
        raise DataError(f"{path} is not a readable tar file ({e}): rewrite it, or remove it from "
                        "the shard folder.") from None
    missing = [k for k, r in samples.items() if r[0] < 0]
    if missing:
        _warn(f"{path}: {len(missing)} sample(s) without an image member ({'/'.join(IMAGE_EXTS)}) "
              f"skipped, e.g. {missing[0]!r}.")
    keys = [k for k, r in samples.items() if r[0] >= 0]
    rows = np.array([samples[k] for k in keys], np.int64).reshape(-1, 8)
    return rows, np.array(keys, dtype=str)


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def save_index(path: str, rows: np.ndarray, keys: np.ndarray) -> bool:
    """Writes ``<tar>.fmjax_index.npz`` atomically; False when the folder is not writable."""
    size, mtime = _stat(path)
    out = index_path(path)
    tmp = f"{out}.tmp-{os.getpid()}-{threading.get_ident()}.npz"
    try:
        np.savez(tmp, version=np.int64(INDEX_VERSION), size=np.int64(size), mtime_ns=np.int64(mtime),
                 edge_hash=np.array(_edge_hash(path, size)), rows=rows, keys=keys)
        os.replace(tmp, out)
        return True
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def load_index(path: str) -> Optional[tuple]:
    """``(rows, keys)`` from a sidecar that still matches its tar, else None."""
    try:
        with np.load(index_path(path), allow_pickle=False) as z:
            if int(z["version"]) != INDEX_VERSION:
                return None
            size, mtime = _stat(path)
            if int(z["size"]) != size:
                return None
            if int(z["mtime_ns"]) != mtime and str(z["edge_hash"]) != _edge_hash(path, size):
                return None
            return z["rows"], z["keys"]
    except (OSError, ValueError, KeyError):
        return None


def shard_index(path: str) -> tuple:
    """``(rows, keys, cached)``: the sidecar's index, else a fresh one (saved if possible)."""
    found = load_index(path)
    if found is not None:
        return found[0], found[1], True
    rows, keys = build_index(path)
    return rows, keys, save_index(path, rows, keys)


class WdsSource:
    """Random-access source over webdataset-style tars (see the module docstring).

    Picklable: loaded indexes are dropped and reloaded from the sidecars; indexes that could
    not be saved (read-only folder) travel with the source."""

    def __init__(self, files, counts: Optional[list] = None, name: str = ""):
        self.files = [str(f) for f in files]
        if not self.files:
            raise FileNotFoundError(f"WdsSource {name!r}: no files.")
        self.name = name or self.files[0]
        self._memory: dict = {}            # shard -> (rows, keys) that have no sidecar
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        if counts is None:  # each shard's index: its sidecar, or built (and saved) now
            counts = records.parallel_map(lambda k: len(self._index(k)[0]), range(len(self.files)))
        self.counts = [int(c) for c in counts]
        self._ends = np.cumsum(self.counts)
        self._len = int(self._ends[-1])

    def _index(self, k: int) -> tuple:
        with self._lock:
            if k in self._memory:
                return self._memory[k]
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        rows, keys, cached = shard_index(self.files[k])
        with self._lock:
            if cached:
                self._cache[k] = (rows, keys)
                while len(self._cache) > _CACHE_SHARDS:
                    self._cache.popitem(last=False)
            else:
                self._memory[k] = (rows, keys)
        return rows, keys

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple:
        """(shard number, sample position in it) of example ``index``."""
        k = int(np.searchsorted(self._ends, index, side="right"))
        return k, index - (int(self._ends[k - 1]) if k else 0)

    def read_members(self, index: int) -> tuple:
        """``(key, {column: bytes})`` of example ``index``, undecoded."""
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} samples")
        k, pos = self.locate(index)
        rows, keys = self._index(k)
        if pos >= len(rows):
            raise DataError(f"{self.files[k]} holds {len(rows)} samples, not {self.counts[k]} as "
                            f"{shard_files.SUMMARY_FILE} says: rewrite the shards or delete that file.")
        row = rows[pos]
        out = {}
        with open(self.files[k], "rb") as f:
            for c, column in enumerate(COLUMNS):
                offset, size = int(row[2 * c]), int(row[2 * c + 1])
                if offset >= 0:
                    f.seek(offset)
                    out[column] = f.read(size)
        return str(keys[pos]), out

    def __getitem__(self, index):
        key, members = self.read_members(index)
        k, _ = self.locate(int(index))
        where = f"{os.path.basename(self.files[k])}/{key}"
        try:
            example = {"image": records.decode_image(members["image"])}
            if "txt" in members:
                example["caption"] = members["txt"].decode("utf-8").strip()
            if "cls" in members:
                example["label"] = int(members["cls"].decode("utf-8").strip())
            if "json" in members:
                extra = json.loads(members["json"].decode("utf-8"))
                if isinstance(extra, dict):
                    for name, value in extra.items():
                        example.setdefault(name, value)
        except Exception as e:  # noqa: BLE001 - PIL, utf-8, int(), JSON
            raise BadExampleError(f"sample {key!r} of {self.files[k]}", f"{type(e).__name__}: {e}",
                                  "replace the sample or rewrite the shard") from None
        example["file_name"] = where
        return example

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"WdsSource({self.name!r}, files={len(self.files)}, len={self._len})"


# -- writing ----------------------------------------------------------------------------------

_EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def image_ext(data: bytes) -> str:
    """The member extension for encoded image bytes (from their header)."""
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
    if fmt not in _EXT_OF_FORMAT:
        raise ValueError(f"image format {fmt} has no webdataset extension; use PNG or JPEG.")
    return _EXT_OF_FORMAT[fmt]


def _json_scalar(v):
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    raise TypeError


class TarShardWriter:
    """Writes webdataset samples to one tar, then (``index=True``) its index sidecar::

        with TarShardWriter(path) as w:
            w.write(dict(image=img_or_encoded_bytes, caption="a cat", label=3))

    ``image`` (uint8 array -> ``image_format``; bytes are stored as they are), ``caption`` ->
    ``.txt``, ``label`` -> ``.cls``, other str / number / bool fields -> ``.json``. Arrays
    other than the image have no webdataset member: their keys are collected in ``dropped``.
    Keys are the example's running number in the tar (9 digits) unless given. Members are written deterministically
    (mtime 0, uid 0, mode 0644)."""

    def __init__(self, path: str, image_format: str = "png", quality: int = 95, index: bool = True):
        self.path, self.image_format, self.quality = str(path), image_format, quality
        self.index = index
        self._tar = tarfile.open(self.path, "w", format=tarfile.PAX_FORMAT)
        self.count = 0
        self.dropped: set = set()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, example: dict, key: Optional[str] = None) -> None:
        """``key``: the sample's key (default: its running number in this tar, 9 digits)."""
        key = f"{self.count:09d}" if key is None else str(key)
        if not key or "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must be non-empty with no '.' in its last part.")
        image = example.get("image")
        if image is None:
            raise ValueError("a webdataset sample needs an 'image'.")
        if isinstance(image, np.ndarray):
            image = records.encode_image(image, self.image_format, self.quality)
        image = bytes(image)
        self._add(f"{key}.{image_ext(image)}", image)
        if example.get("caption") is not None:
            self._add(f"{key}.txt", str(example["caption"]).encode("utf-8"))
        if example.get("label") is not None:
            self._add(f"{key}.cls", str(int(example["label"])).encode("utf-8"))
        extra = {}
        for name, value in example.items():
            if name in ("image", "caption", "label"):
                continue
            try:
                extra[name] = _json_scalar(value)
            except TypeError:
                self.dropped.add(name)
        if extra:
            self._add(f"{key}.json", json.dumps(extra, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if self.index:
                save_index(self.path, *build_index(self.path))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _no_options(name, options):
    if options:
        raise ValueError(f"Unexpected options {sorted(options)} for dataset {name!r}; "
                         f"'{KIND}:' names take none.")


@register_source(KIND, forms=f"'{KIND}:<dir or glob of .tar>'")
class WdsKind(SourceKind):
    """``wds:DIR`` / ``wds:/d/{split}-*.tar``: webdataset-style tars of image + caption."""

    @staticmethod
    def files(name, split):
        return shard_files.find_shards(KIND, name, split, EXT, "webdataset tar")

    def check(self, name, split, data_dir):
        self.files(name, split)

    def get(self, name, split, data_dir, **options):
        _no_options(name, options)
        files = self.files(name, split)
        return WdsSource(files, shard_files.summary_counts(files, EXT), name=f"{name} [{split}]")

    def class_names(self, name, data_dir):
        return shard_files.summary_class_names(KIND, name)
