"""ArrayRecord shards of fmjax records: ``array_record:<dir or glob>`` dataset names.

ArrayRecord is grain's native random-access file format: ``len()`` and ``source[i]`` cost one
seek, so these shards plug into ``fmjax.data.pipeline`` (shuffle, per-process shards, exact
resume) like any other source. ``launch/make_shards.py`` writes them from an image folder, a
TFDS dataset (e.g. the bundled ``fmjax_shapes``) or a captions file.

Names (see ``fmjax.data.shard_files`` for the details and the ``fmjax_shards.json`` summary):

  array_record:DIR                       split S = DIR/S-<digits>*.array_record + DIR/S/*.array_record
  array_record:/d/{split}-*.array_record a glob; {split} is replaced by the split
  array_record:/d/part-*.array_record    a glob or a single file: the 'train' split only

Record format "FMJ1" (one ArrayRecord record per example; written with ``group_size:1`` for
fast random access)::

  bytes 0..3      b"FMJ1"
  bytes 4..7      H: the header's length, uint32 little-endian
  bytes 8..8+H    the header: a UTF-8 JSON object {key: value}
  the rest        the payload: binary blobs the header points into (offsets from its start)

  value := a JSON string, number, bool or null   -> str / int / float / bool / None
         | a JSON object of values (nested dict)  -> dict
         | a JSON list of strings or numbers      -> list
         | {"$image": [offset, length]}           -> an encoded image (PNG, JPEG, WebP: anything
                                                     PIL opens), decoded on read to uint8
                                                     (H, W, 3) RGB (grayscale/alpha converted)
         | {"$bytes": [offset, length]}           -> bytes
         | {"$array": [offset, length, dtype, shape]}  -> a numpy array in C order; dtype is
                                                     numpy's ``dtype.str`` ("|u1", "<f4", ...);
                                                     shape [] gives a numpy scalar

Keys starting with "$" are reserved. Conventional keys: ``image``, ``caption`` (text),
``label`` (int: an index into ``fmjax_shards.json``'s ``class_names``, -1 for none) and
``file_name`` (where the example came from). No pickle: any language with JSON can read a
record. ``source[i]`` is a dict like every fmjax source's (``fmjax.data.sources``).

A record that is not FMJ1, or whose image does not decode, is a ``bad_examples.BadExampleError``
naming the file and record (``config.data.skip_bad_examples`` skips such records). A file that is
not an ArrayRecord file is a one-line ``DataError`` when the source is opened.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import struct
import threading
from typing import Any, Optional

import numpy as np
from PIL import Image

from fmjax.data import shard_files
from fmjax.data.bad_examples import BadExampleError
from fmjax.data.registry import SourceKind, register_source
from fmjax.errors import DataError

KIND = "array_record"
EXT = "array_record"
MAGIC = b"FMJ1"
WRITER_OPTIONS = "group_size:1"
_HEADER_LEN = struct.Struct("<I")


class EncodedImage(bytes):
    """Bytes of an already encoded image (a JPEG file's contents, ...): stored as ``$image``
    without decoding or re-encoding."""


# -- encoding ---------------------------------------------------------------------------------


def encode_image(array: np.ndarray, image_format: str = "png", quality: int = 95) -> EncodedImage:
    """uint8 (H, W, 3) / (H, W) -> PNG or JPEG bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"an image to encode must be uint8 (H, W[, C]), got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    fmt = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}.get(image_format.lower())
    if fmt is None:
        raise ValueError(f"image_format {image_format!r}: use 'png' or 'jpeg'.")
    buf = io.BytesIO()
    kwargs = dict(quality=int(quality)) if fmt == "JPEG" else dict(compress_level=1)
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return EncodedImage(buf.getvalue())


class _Encoder:
    def __init__(self, image_format: str, quality: int):
        self.image_format, self.quality = image_format, quality
        self.blobs: list = []
        self.size = 0

    def blob(self, data: bytes) -> list:
        offset = self.size
        self.blobs.append(data)
        self.size += len(data)
        return [offset, len(data)]

    def value(self, key: str, v: Any) -> Any:
        if isinstance(v, EncodedImage):
            return {"$image": self.blob(bytes(v))}
        if isinstance(v, (bytes, bytearray, memoryview)):
            if key == "image":  # an image key holding bytes is an encoded image
                return {"$image": self.blob(bytes(v))}
            return {"$bytes": self.blob(bytes(v))}
        if isinstance(v, np.ndarray) and key == "image" and v.dtype == np.uint8 and v.ndim in (2, 3):
            return {"$image": self.blob(encode_image(v, self.image_format, self.quality))}
        if isinstance(v, (np.ndarray, np.generic)):
            a = np.asarray(v)
            a = np.ascontiguousarray(a) if a.ndim else a  # (ascontiguousarray makes 0-d 1-d)
            if a.dtype.kind in "OUS":  # text: a str, or a flat JSON list of str
                items = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.reshape(-1).tolist()]
                return items if a.ndim else items[0]
            return {"$array": self.blob(a.tobytes()) + [a.dtype.str, list(a.shape)]}
        if v is None or isinstance(v, (bool, str, int)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else self.value(key, np.float64(v))
        if isinstance(v, dict):
            return self.mapping(v)
        if isinstance(v, (list, tuple)):
            if all(isinstance(x, str) for x in v):
                return list(v)
            return self.value(key, np.asarray(v))
        raise TypeError(f"cannot store {key!r} of type {type(v).__name__} in an FMJ1 record; "
                        "use str, int, float, bool, bytes, a numpy array or a dict of those.")

    def mapping(self, d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise ValueError(f"record key {k!r}: keys must be strings not starting with '$'.")
            out[k] = self.value(k, v)
        return out


def encode_record(example: dict, image_format: str = "png", quality: int = 95) -> bytes:
    """One example (dict) -> an FMJ1 record (bytes). ``image`` as a uint8 array is encoded as
    ``image_format`` (PNG: lossless); as bytes / ``EncodedImage`` it is stored as is."""
    enc = _Encoder(image_format, quality)
    header = json.dumps(enc.mapping(example), ensure_ascii=False, separators=(",", ":"),
                        allow_nan=False).encode("utf-8")
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header] + enc.blobs)


# -- decoding ---------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


def _decode_value(v: Any, payload: memoryview, decode_images: bool) -> Any:
    if isinstance(v, dict):
        if len(v) == 1:
            (tag, args), = v.items()
            if tag == "$image":
                data = bytes(payload[args[0]:args[0] + args[1]])
                return decode_image(data) if decode_images else EncodedImage(data)
            if tag == "$bytes":
                return bytes(payload[args[0]:args[0] + args[1]])
            if tag == "$array":
                offset, length, dtype, shape = args
                a = np.frombuffer(payload[offset:offset + length], dtype=np.dtype(dtype)).reshape(shape)
                a = a.copy()  # writable, and not pinning the record
                return a[()] if a.ndim == 0 else a
        if any(k.startswith("$") for k in v):
            raise ValueError(f"unknown tag in {sorted(v)}")
        return {k: _decode_value(x, payload, decode_images) for k, x in v.items()}
    return v


def decode_record(record: bytes, decode_images: bool = True) -> dict:
    """An FMJ1 record -> dict (see the module docstring). Raises ValueError if it is not one."""
    if len(record) < 8 or record[:4] != MAGIC:
        raise ValueError(f"not an FMJ1 record (starts with {bytes(record[:8])!r})")
    (n,) = _HEADER_LEN.unpack_from(record, 4)
    if 8 + n > len(record):
        raise ValueError(f"truncated FMJ1 record (header of {n} bytes, record of {len(record)})")
    header = json.loads(bytes(record[8:8 + n]).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("FMJ1 header is not a JSON object")
    payload = memoryview(record)[8 + n:]
    return {k: _decode_value(v, payload, decode_images) for k, v in header.items()}


# -- files ------------------------------------------------------------------------------------


def _module():
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    return array_record_module


def count_records(path: str) -> int:
    """Number of records of an ArrayRecord file; a one-line DataError if it is not one."""
    reason = "not an ArrayRecord file"
    count = None
    try:
        reader = _module().ArrayRecordReader(str(path))
        try:
            if reader.ok():
                count = int(reader.num_records())
        finally:
            reader.close()  # raises for a damaged file
    except Exception as e:  # noqa: BLE001 - RuntimeError / OSError from the C++ reader
        reason = " ".join(str(e).split()) or type(e).__name__
        count = None
    if count is None:
        raise DataError(f"{path} is not a readable ArrayRecord file ({reason}): rewrite it with "
                        "launch/make_shards.py, or remove it from the shard folder.")
    return count


def parallel_map(fn, items, threads: int = 32) -> list:
    """``[fn(x) for x in items]``, in threads when there are many (file opens are I/O bound)."""
    if len(items) <= 4:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


class ShardWriter:
    """Writes FMJ1 records to one ArrayRecord file (``group_size:1``)::

        with ShardWriter(path) as w:
            w.write(dict(image=img, caption="a cat", label=3))
    """

    def __init__(self, path: str, image_format: str = "png", quality: int = 95):
        self.path, self.image_format, self.quality = str(path), image_format, quality
        self._writer = _module().ArrayRecordWriter(self.path, WRITER_OPTIONS)
        if hasattr(self._writer, "ok") and not self._writer.ok():
            raise OSError(f"cannot write ArrayRecord file {self.path}")
        self.count = 0

    def write(self, example: dict) -> None:
        self.write_record(encode_record(example, self.image_format, self.quality))

    def write_record(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_shards(examples, out_dir: str, split: str, num_shards: int, **kw) -> list:
    """Writes a list of examples into ``num_shards`` files ``<split>-0000k-of-0000n.array_record``
    in ``out_dir`` (contiguous ranges, so the files in order hold the examples in order);
    returns the paths. A small helper for tests and scripts; ``launch/make_shards.py`` is the
    converter with progress, checks and ``fmjax_shards.json``."""
    examples = list(examples)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(num_shards):
        path = os.path.join(out_dir, shard_files.shard_name(split, k, num_shards, EXT))
        lo, hi = k * len(examples) // num_shards, (k + 1) * len(examples) // num_shards
        with ShardWriter(path, **kw) as w:
            for ex in examples[lo:hi]:
                w.write(ex)
        paths.append(path)
    return paths


class ArrayRecordSource:
    """Random-access source over FMJ1 records in ArrayRecord files (in the given order).

    ``source[i]`` decodes record ``i`` (``image`` -> uint8 (H, W, 3) RGB). Picklable: the
    readers are reopened lazily after unpickling (grain worker processes)."""

    def __init__(self, files, counts: Optional[list] = None, name: str = ""):
        self.files = [str(f) for f in files]
        if not self.files:
            raise FileNotFoundError(f"ArrayRecordSource {name!r}: no files.")
        self.counts = [int(c) for c in counts] if counts is not None else parallel_map(count_records, self.files)
        self.name = name or self.files[0]
        self._ends = np.cumsum(self.counts)
        self._len = int(self._ends[-1])
        self._source = None
        self._lock = threading.Lock()

    def _open(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    from array_record.python.array_record_data_source import ArrayRecordDataSource
                    # "path[0:n]": the counts are known, so no file is opened to count again.
                    self._source = ArrayRecordDataSource(
                        [f"{f}[0:{c}]" for f, c in zip(self.files, self.counts) if c > 0])
        return self._source

    def locate(self, index: int) -> tuple:
        """(file, record position in it) of example ``index``."""
        k = int(np.searchsorted(self._ends, index, side="right"))
        return self.files[k], index - (int(self._ends[k - 1]) if k else 0)

    def __len__(self) -> int:
        return self._len

    def read_record(self, index: int) -> bytes:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} records")
        return self._open()[index]

    def __getitem__(self, index):
        index = int(index)
        record = self.read_record(index)
        try:
            return decode_record(record)
        except Exception as e:  # noqa: BLE001 - not FMJ1, bad JSON, image that does not decode
            path, pos = self.locate(index)
            raise BadExampleError(f"record {pos} of {path}", f"{type(e).__name__}: {e}",
                                  "rewrite the shard with launch/make_shards.py") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"ArrayRecordSource({self.name!r}, files={len(self.files)}, len={self._len})"


def _no_options(name, options):
    if options:
        raise ValueError(f"Unexpected options {sorted(options)} for dataset {name!r}; "
                         f"'{KIND}:' names take none.")


@register_source(KIND, forms=f"'{KIND}:<dir or glob>'")
class ArrayRecordKind(SourceKind):
    """``array_record:DIR`` / ``array_record:/d/{split}-*.array_record`` (FMJ1 records)."""

    @staticmethod
    def files(name, split):
        return shard_files.find_shards(KIND, name, split, EXT, "ArrayRecord")

    def check(self, name, split, data_dir):
        self.files(name, split)

    def get(self, name, split, data_dir, **options):
        _no_options(name, options)
        files = self.files(name, split)
        return ArrayRecordSource(files, shard_files.summary_counts(files, EXT), name=f"{name} [{split}]")

    def class_names(self, name, data_dir):
        return shard_files.summary_class_names(KIND, name)
