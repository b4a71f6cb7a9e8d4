"""Host-side input throughput: ``python launch/data_bench.py --config=configs/dino.py:vit_s16_imagenet``.

Runs the config's training pipeline (``config.data.pp_train``, through the trainer's grain
iterator) on JPEG images decoded on the fly, as an ImageNet / LAION reader does, with no model
and no accelerator, and reports examples/s and examples/s per host core. So it answers: how
many host cores feed one chip at the rate ``launch/benchmark.py`` measures?

The images are ``--num_images`` distinct synthetic JPEGs of ``--image_size`` px (quality 90;
ImageNet's average is about 400 x 350), cycled; every example carries a caption and a label,
so image-text pipelines run too. Presets whose tokenizer needs a user file (CLIP BPE) can be
measured with ``--config.data.tokenize.tokenizer=words`` and the change is printed.

``--workers=0`` runs the pipeline in this process (grain's read threads only); ``--workers=N``
uses N worker processes. Per core is examples per CPU-second of this process's threads and its
worker processes (/proc), so it holds whatever the parallelism. Bad input is one line, exit 2.
"""
import io
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=False)
flags.DEFINE_integer("batches", 20, "Timed batches (after --warmup).")
flags.DEFINE_integer("warmup", 3, "Untimed batches first (worker start-up, caches).")
flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
flags.DEFINE_integer("workers", 0, "Grain worker processes (0: in this process).")
flags.DEFINE_integer("image_size", 320, "Side of the synthetic JPEGs, px.")
flags.DEFINE_integer("num_images", 64, "Distinct JPEGs (cycled).")
flags.DEFINE_string("out", None, "Optional JSON file for the result (its folder must exist).")
FLAGS = flags.FLAGS

CAPTIONS = ("a photo of a red circle on a blue background", "two small green squares next to a cat",
            "a large yellow triangle left of a purple star", "an old black and white photo of a dog")


class JpegSource:
    """``n`` examples: a decoded JPEG (decoding is part of the measured work), a label, a caption."""

    def __init__(self, num_images: int, size: int, n: int = 1_000_000):
        import numpy as np
        from PIL import Image
        rng = np.random.default_rng(0)
        self.jpegs = []
        for i in range(num_images):
            # smooth colour fields plus noise: JPEG sizes like natural photos, not flat colour
            yy, xx = np.mgrid[0:size, 0:size] / size
            base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy + 2 * i), np.sin(4 * (xx + yy) + i)], -1)
            img = np.clip(127 + 90 * base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image
        img = np.asarray(Image.open(io.BytesIO(self.jpegs[i % len(self.jpegs)])).convert("RGB"))
        return {"image": img, "label": i % 1000, "caption": CAPTIONS[i % len(CAPTIONS)]}


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its live child processes (grain
    workers), from /proc on Linux; this process only elsewhere."""
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return total
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def check_flags():
    from fmjax.errors import ConfigError
    for name in ("batches", "batch_size", "image_size", "num_images"):
        if getattr(FLAGS, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(FLAGS, name)}.")
    if FLAGS.warmup < 0 or FLAGS.workers < 0:
        raise ConfigError("--warmup and --workers must be 0 or more.")
    if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
        raise ConfigError(f"--out={FLAGS.out}: folder {os.path.dirname(os.path.abspath(FLAGS.out))} does not exist.")
    if not FLAGS.config.data.get("pp_train"):
        raise ConfigError("the config has no data.pp_train to measure; pick a training config.")


def run() -> dict:
    from fmjax.data import pipeline
    from fmjax.data.transforms import parse_pp
    config = FLAGS.config
    check_flags()
    pp, note = config.data.pp_train, ""
    tok = config.data.get("tokenize")
    if tok and tok.get("tokenizer") == "clip_bpe" and not os.path.exists(str(tok.get("bpe_path") or "")):
        # No BPE merges file offline: the words tokenizer stands in (cheaper per caption).
        pp = re.sub(r"tokenize\([^)]*\)", f"tokenize(context_length={tok.get('context_length', 77)}, "
                    "tokenizer='words', vocab_size=49408)", pp)
        note = f"CLIP BPE file {tok.get('bpe_path')!r} not found: the 'words' tokenizer stands in"
        print(f"== note: {note}")
    transform = parse_pp(pp, "config.data.pp_train")
    source = JpegSource(FLAGS.num_images, FLAGS.image_size)
    it = pipeline.make_train_iterator(source, global_batch_size=FLAGS.batch_size, transform=transform,
                                      seed=0, worker_count=FLAGS.workers, process_index=0, process_count=1)
    try:
        for _ in range(FLAGS.warmup):
            next(it)
        t, c = time.perf_counter(), cpu_seconds()
        for _ in range(FLAGS.batches):
            batch = next(it)
        dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    finally:
        if hasattr(it, "close"):
            it.close()
    n = FLAGS.batches * FLAGS.batch_size
    return dict(config=FLAGS["config"].config_filename, pp_train=pp, note=note, workers=FLAGS.workers,
                image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, examples_per_s=n / dt,
                examples_per_s_per_core=n / cpu if cpu > 0 else float("nan"), cores_busy=cpu / dt,
                host_cores=os.cpu_count(),
                batch_shapes={k: list(getattr(v, "shape", ())) for k, v in batch.items()})


def main(argv):
    del argv
    from fmjax.train.errors import run_with_clean_errors
    result = run_with_clean_errors(run)
    print(f"== {result['config']}: {result['examples_per_s']:.1f} examples/s with {result['workers']} worker(s) "
          f"using {result['cores_busy']:.2f} cores = {result['examples_per_s_per_core']:.1f} examples/s per "
          f"core-second ({result['image_size']} px JPEG in; "
          f"batch {result['batch_shapes']})")
    print(json.dumps(result))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
