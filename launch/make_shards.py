"""Convert a dataset to ArrayRecord (or webdataset tar) shards for web-scale training.

    python launch/make_shards.py --source=image_folder:/data/pets --split=train,validation \\
        --out=/data/pets_shards --num_shards=8
    python launch/make_shards.py --source=fmjax_shapes/32 --split=train,validation --out=/tmp/shapes32
    python launch/make_shards.py --source=captions:/data/cc/captions.tsv --split=train --out=/data/cc_shards
    python launch/make_shards.py --source=image_folder:/data/pets --out=/data/pets_wds --format=wds

then train with ``--config.data.name=array_record:/data/pets_shards`` (or ``wds:/data/pets_wds``).

``--source`` is an image folder (``image_folder:ROOT``, image files copied byte for byte), a
captions file (``captions:FILE.tsv|.jsonl``: ``<image path>\\t<caption>`` lines, paths relative to
the file), or any dataset name training reads (the bundled ``fmjax_shapes[/RES]``, a prepared
TFDS dataset in ``--data_dir``, ...), whose decoded images are stored as PNG (or ``--image_format
=jpeg``). Shard ``k`` of ``n`` holds examples ``[k*N//n, (k+1)*N//n)`` in order; the record format
is in ``fmjax/data/records.py`` (webdataset members in ``fmjax/data/wds.py``). Existing shards of a
split are kept unless ``--overwrite``. Progress goes to stdout; bad input is one line
``fmjax: error: ...`` on stderr and exit code 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("source", None, "What to convert: image_folder:ROOT, captions:FILE.tsv|.jsonl, "
                    "or a dataset name (fmjax_shapes/32, a TFDS name, ...).")
flags.DEFINE_string("split", "train", "Comma-separated splits to convert (a captions file is one split, "
                    "named by this flag).")
flags.DEFINE_string("out", None, "Output folder (created if missing).")
flags.DEFINE_integer("num_shards", 0, "Shards per split (0: one per 10,000 examples).")
flags.DEFINE_enum("format", "array_record", ["array_record", "wds"],
                  "array_record (FMJ1 records; keeps every field) or wds (webdataset tars: image, "
                  "caption, label and scalar fields).")
flags.DEFINE_bool("overwrite", False, "Replace a split's existing shards in --out.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for dataset names (default $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets).")
flags.DEFINE_enum("image_format", "auto", ["auto", "png", "jpeg"],
                  "auto: image files' bytes as they are, decoded images as PNG; png / jpeg: re-encode.")
flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality with --image_format=jpeg.")
flags.DEFINE_integer("limit", 0, "Convert only the first N examples of each split (0: all).")
flags.DEFINE_integer("workers", 1, "Processes writing shards in parallel.")
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines would drown the progress
    if len(argv) > 1:
        from fmjax.cli import _fail
        _fail(f"unexpected arguments {argv[1:]}: pass everything as --flags (see --helpshort).")
    from fmjax.errors import ConfigError, DataError
    from fmjax.data import convert
    try:
        convert.make_shards(FLAGS.source, FLAGS.out, FLAGS.split, num_shards=FLAGS.num_shards,
                            fmt=FLAGS.format, overwrite=FLAGS.overwrite, data_dir=FLAGS.data_dir,
                            image_format=FLAGS.image_format, quality=FLAGS.jpeg_quality,
                            limit=FLAGS.limit, workers=FLAGS.workers,
                            log=lambda msg: print(msg, flush=True))
    except (ValueError, FileNotFoundError, PermissionError, DataError, ConfigError) as e:
        if os.environ.get("FMJAX_TRACEBACK"):
            raise
        msg = " ".join(str(e).split())
        print(f"fmjax: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["source", "out"])
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
