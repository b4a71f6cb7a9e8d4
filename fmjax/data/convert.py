"""Converting datasets to shards: the library behind ``launch/make_shards.py``.

Inputs (``source``):
  image_folder:/root              root/<split>/<class>/*.jpg (``fmjax.data.image_folder``); the
                                  image files' bytes are stored as they are (no re-encoding)
  captions:/path/captions.tsv     a captions file: ``<image path>\\t<caption>`` lines (or
  /path/captions.{tsv,jsonl}      JSONL ``{"image": ..., "caption": ...}``), paths relative to the
                                  file's folder; its images and captions become one split
  any other dataset name          anything ``fmjax.data.sources.get_source`` reads: the bundled
                                  ``fmjax_shapes[/RES]``, a prepared TFDS dataset, ...; decoded
                                  images are encoded as PNG (lossless) or JPEG

Outputs: ``out/<split>-0000k-of-0000n.array_record`` (FMJ1 records, ``fmjax.data.records``) or
``.tar`` (webdataset, ``fmjax.data.wds``, with index sidecars), and ``out/fmjax_shards.json``
(class names, per-shard counts). Examples keep their order: shard ``k`` of ``n`` holds examples
``[k*N//n, (k+1)*N//n)``. Shards are written under temporary names and renamed at the end, so an
interrupted conversion leaves no partial shard under a shard name. Existing shards of a split
are never replaced unless ``overwrite=True``.

Bad input is a one-line ``ValueError`` / ``FileNotFoundError`` / ``fmjax.errors.DataError``.
"""
from __future__ import annotations

import concurrent.futures
import glob
import io
import math
import multiprocessing
import os
import time
from typing import Callable, Optional

from PIL import Image

from fmjax.data import image_folder, records, shard_files, sources, wds
from fmjax.errors import DataError

FORMATS = {"array_record": records.EXT, "wds": wds.EXT}
IMAGE_FORMATS = ("auto", "png", "jpeg")
CAPTIONS_PREFIX = "captions:"
EXAMPLES_PER_SHARD = 10_000   # num_shards=0: one shard per this many examples
_PROGRESS_EVERY_S = 2.0


def read_image_file(path: str) -> records.EncodedImage:
    """An image file's bytes, after checking that PIL recognises them (header only)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 - parses the header
    except Exception as e:  # noqa: BLE001 - OSError, PIL.UnidentifiedImageError, ...
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e}): replace or remove "
                        "the file, then run again.") from None
    return records.EncodedImage(data)


class FolderInput:
    """An image folder's split, images stored as their files' bytes."""

    def __init__(self, root: str, split: str):
        self.source = image_folder.ImageFolderSource(root, split)
        self.class_names = self.source.class_names or None

    def __len__(self):
        return len(self.source)

    def example(self, i: int) -> dict:
        s = self.source
        out = dict(image=read_image_file(s.paths[i]), label=int(s.labels[i]),
                   file_name=os.path.relpath(s.paths[i], s.root))
        if s.captions is not None:
            out["caption"] = s.captions[i]
        return out


class CaptionsInput:
    """A captions file (TSV / JSONL, as image folders read them): one example per line."""

    def __init__(self, path: str):
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Captions file {path!r} does not exist: fix the path in "
                                    f"--source={CAPTIONS_PREFIX}<file.tsv|file.jsonl>.")
        if not path.endswith((".tsv", ".jsonl")):
            raise ValueError(f"Captions file {path!r} must end in .tsv (<path>\\t<caption> lines) or "
                             '.jsonl ({"image": ..., "caption": ...} lines).')
        table = image_folder._read_captions(path)  # pylint: disable=protected-access
        if not table:
            raise DataError(f"{path} holds no captions: write one '<image path>\\t<caption>' per line.")
        items = sorted(table.items(), key=lambda kv: kv[1][1])  # file order
        self.base = os.path.dirname(path)
        self.paths = [p for p, _ in items]
        self.captions = [c for _, (c, _) in items]
        self.class_names = None

    def __len__(self):
        return len(self.paths)

    def example(self, i: int) -> dict:
        return dict(image=read_image_file(self.paths[i]), caption=self.captions[i],
                    file_name=os.path.relpath(self.paths[i], self.base))


class SourceInput:
    """Any dataset ``sources.get_source`` reads (decoded examples)."""

    def __init__(self, name: str, split: str, data_dir: Optional[str]):
        self.source = sources.get_source(name, split, data_dir)
        self.class_names = sources.class_names(name, data_dir)

    def __len__(self):
        return len(self.source)

    def example(self, i: int) -> dict:
        return dict(self.source[i])


def is_captions_file(source: str) -> bool:
    return source.startswith(CAPTIONS_PREFIX) or (
        source.endswith((".tsv", ".jsonl")) and os.path.isfile(os.path.expanduser(source)))


def open_input(source: str, split: str, data_dir: Optional[str], image_format: str):
    """The input for one split (see the module docstring)."""
    if is_captions_file(source):
        return CaptionsInput(source[len(CAPTIONS_PREFIX):] if source.startswith(CAPTIONS_PREFIX) else source)
    if source.startswith(image_folder.PREFIX) and image_format == "auto":
        return FolderInput(image_folder.ImageFolderKind.root(source), split)
    sources.check_source(source, split, data_dir)
    return SourceInput(source, split, data_dir)


def _writer(fmt: str, path: str, image_format: str, quality: int):
    encode_as = "png" if image_format == "auto" else image_format
    if fmt == "wds":
        return wds.TarShardWriter(path, encode_as, quality, index=False)  # indexed once renamed
    return records.ShardWriter(path, encode_as, quality)


def write_shard(inp, fmt: str, path: str, lo: int, hi: int, image_format: str = "auto",
                quality: int = 95, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Writes examples ``[lo, hi)`` of ``inp`` to ``path``; returns ``count`` and the keys a
    webdataset could not hold (``dropped``)."""
    writer = _writer(fmt, path, image_format, quality)
    try:
        for i in range(lo, hi):
            example = inp.example(i)
            if fmt == "wds":
                writer.write(example, key=f"{i:09d}")
            else:
                writer.write(example)
            if progress is not None:
                progress(1)
    finally:
        writer.close()
    return dict(count=hi - lo, dropped=sorted(getattr(writer, "dropped", ())))


def _write_shard_job(args):
    inp, fmt, path, lo, hi, image_format, quality = args
    return write_shard(inp, fmt, path, lo, hi, image_format, quality)


class _Progress:
    def __init__(self, split: str, total: int, num_shards: int, log):
        self.split, self.total, self.num_shards, self.log = split, total, num_shards, log
        self.done = self.shards = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int = 1, shard_done: bool = False):
        self.done += n
        self.shards += int(shard_done)
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY_S or (shard_done and self.shards == self.num_shards):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.log(f"make_shards: {self.split}: {self.done}/{self.total} examples "
                     f"({100 * self.done // max(self.total, 1)}%), {self.shards}/{self.num_shards} "
                     f"shards, {rate:.0f} examples/s")


def _existing(out: str, split: str, ext: str) -> tuple:
    """(shards of ``split`` that ``<kind>:out`` would read, stale temporary files)."""
    files = shard_files.split_files_in_dir(out, split, ext) if os.path.isdir(out) else []
    stale = glob.glob(os.path.join(glob.escape(out), f"{glob.escape(split)}-*.{ext}.tmp-*"))
    return files, stale


def check_split_name(split: str) -> None:
    if not split or split != split.strip() or any(c in split for c in "/\\*?[]{}") or "-" in split:
        raise ValueError(f"split name {split!r}: use letters, digits and '_' (e.g. 'train').")


def make_shards(source: str, out: str, splits=("train",), num_shards: int = 0,
                fmt: str = "array_record", overwrite: bool = False, data_dir: Optional[str] = None,
                image_format: str = "auto", quality: int = 95, limit: int = 0, workers: int = 1,
                log: Callable[[str], None] = print) -> dict:
    """Converts ``source`` to shards in ``out``; returns ``{split: {files, counts, ...}}``.

    ``num_shards`` 0 picks one shard per 10,000 examples; ``limit`` > 0 converts only the first
    ``limit`` examples of each split; ``workers`` > 1 writes shards in that many processes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {sorted(FORMATS)}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: use one of {list(IMAGE_FORMATS)}.")
    if num_shards < 0 or limit < 0 or workers < 1 or not 1 <= quality <= 100:
        raise ValueError(f"num_shards={num_shards}, limit={limit}, workers={workers}, "
                         f"jpeg_quality={quality}: use num_shards >= 0 (0: auto), limit >= 0 (0: all), "
                         "workers >= 1 and a JPEG quality in [1, 100].")
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    if not splits:
        raise ValueError("no split to convert: pass e.g. --split=train,validation.")
    for split in splits:
        check_split_name(split)
    if is_captions_file(source) and len(splits) != 1:
        raise ValueError(f"a captions file is one split; pass one --split (got {','.join(splits)}).")
    ext = FORMATS[fmt]
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out} is a file: give a folder (it is created if missing).")

    # Every check first (inputs, counts, existing shards), so a bad split writes nothing.
    plans = []
    for split in splits:
        inp = open_input(source, split, data_dir, image_format)
        n = len(inp) if not limit else min(limit, len(inp))
        shards = num_shards or max(1, math.ceil(n / EXAMPLES_PER_SHARD))
        if n == 0:
            raise DataError(f"{source!r} split {split!r} has no examples to convert.")
        if shards > n:
            raise ValueError(f"--num_shards={shards} is more than the {n} examples of split {split!r}: "
                             f"use at most {n} (or 0 for one shard per {EXAMPLES_PER_SHARD} examples).")
        existing, _ = _existing(out, split, ext)
        nested = [f for f in existing if os.path.dirname(f) != out]
        if nested:
            raise ValueError(f"{os.path.dirname(nested[0])} holds {len(nested)} {split!r} shard(s) that "
                             f"'{'wds' if fmt == 'wds' else 'array_record'}:{out}' would read together "
                             "with the new ones: move them away, or choose another --out.")
        if existing and not overwrite:
            raise ValueError(f"{out} already holds {len(existing)} {split!r} shard(s) "
                             f"({os.path.basename(existing[0])}, ...): pass --overwrite to replace "
                             "them, or choose another --out.")
        plans.append((split, inp, n, shards))

    os.makedirs(out, exist_ok=True)
    result = {}
    for split, inp, n, shards in plans:
        t0 = time.monotonic()
        _, stale = _existing(out, split, ext)
        for f in stale:
            os.remove(f)
        names = [shard_files.shard_name(split, k, shards, ext) for k in range(shards)]
        finals = [os.path.join(out, name) for name in names]
        tmps = [f"{f}.tmp-{os.getpid()}" for f in finals]
        bounds = [(k * n // shards, (k + 1) * n // shards) for k in range(shards)]
        progress = _Progress(split, n, shards, log)
        log(f"make_shards: {split}: {n} examples from {source} -> {shards} {fmt} shard(s) in {out}")
        dropped = set()
        try:
            if workers > 1 and shards > 1:
                ctx = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(min(workers, shards), mp_context=ctx) as pool:
                    jobs = [(inp, fmt, tmp, lo, hi, image_format, quality)
                            for tmp, (lo, hi) in zip(tmps, bounds)]
                    for info in pool.map(_write_shard_job, jobs):
                        dropped.update(info["dropped"])
                        progress.add(info["count"], shard_done=True)
            else:
                for tmp, (lo, hi) in zip(tmps, bounds):
                    info = write_shard(inp, fmt, tmp, lo, hi, image_format, quality, progress.add)
                    dropped.update(info["dropped"])
                    progress.add(0, shard_done=True)
        except BaseException:
            for tmp in tmps:
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise
        old, _ = _existing(out, split, ext)
        for f in old:  # --overwrite (checked above): the split's previous shards and sidecars
            os.remove(f)
            if os.path.exists(wds.index_path(f)):
                os.remove(wds.index_path(f))
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
            if fmt == "wds":
                wds.shard_index(final)  # writes the index sidecar
        counts = [hi - lo for lo, hi in bounds]
        summary = shard_files.write_summary(out, split, fmt, finals, counts, inp.class_names, source)
        size = sum(os.path.getsize(f) for f in finals)
        if dropped:
            log(f"make_shards: {split}: webdataset samples hold image, caption, label and scalar "
                f"fields; left out: {', '.join(sorted(dropped))} (use --format=array_record to keep them)")
        kind = "wds" if fmt == "wds" else "array_record"
        log(f"make_shards: wrote {split!r}: {n} examples in {shards} shard(s), {size / 1e6:.1f} MB, "
            f"{time.monotonic() - t0:.1f} s; read it as --config.data.name={kind}:{out}")
        result[split] = dict(files=finals, counts=counts, bytes=size, summary=summary,
                             dropped=sorted(dropped))
    return result
