"""Will it fit? ``python launch/compile.py --config=configs/clip.py:vit_l14 --topology=v5e-256``.

Ahead-of-time compiles the real train step (and the loss forward) of ``--config`` for a target
machine on this host, with the config's mesh, sharding rules, remat and dtype, and prints per
chip: params, optimizer state, objective state and the batch, each as sharded; XLA's memory
analysis (arguments, outputs, donated aliasing, temp); FLOPs per step; and a roofline step
time and MFU estimate from the chip table in ``fmjax/aot/chips.py``.

``--topology``: ``v5e-N`` / ``v6e-N`` (N chips), ``v4-N`` / ``v5p-N`` (N TensorCores, 2 per
chip), or ``cpu-N`` (N simulated host devices). TPU targets need libtpu next to jax
(``pip install -e '.[aot]'``); no TPU is needed. No dataset is read: the batch spec comes from
``config.data.pp_train`` on a synthetic example.

Exit codes: 0 it fits; 1 it does not fit (one line naming the largest items and a change
that would help); 2 bad input (one line).
"""
import json
import math
import numbers
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fmjax.errors import ConfigError  # noqa: E402  (no jax import)

config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=True)
flags.DEFINE_string("topology", None, "Target: v5e-16, v5e-256, v5p-128, v4-64, cpu-8, ...")
flags.DEFINE_bool("eval_step", True, "Also compile the loss forward (what the 'loss' evaluator runs).")
flags.DEFINE_string("out", None, "Optional JSON file for the report (its folder must exist).")
flags.DEFINE_float("hbm_gib", 0.0, "Override the memory per chip in GiB (0: the chip table's; "
                   "for cpu-N there is no limit unless set).")
FLAGS = flags.FLAGS
EXIT_DOES_NOT_FIT = 1


def _target():
    """The parsed ``--topology`` (one line on a bad name); sets up cpu-N before jax loads."""
    from fmjax.aot import chips
    try:
        target = chips.parse_topology(FLAGS.topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if target.platform == "cpu":
        if "jax" in sys.modules:  # pragma: no cover - the flag parser does not import jax
            raise ConfigError("--topology=cpu-N must be set before jax is imported.")
        flag = f"--xla_force_host_platform_device_count={target.num_chips}"
        xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{xla} {flag}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # compile only: no TPU backend, and libtpu told enough not to probe for a TPU VM
        for key, value in chips.quiet_libtpu_env(target).items():
            os.environ.setdefault(key, value)
    if FLAGS.hbm_gib < 0:
        raise ConfigError(f"--hbm_gib must be 0 (the chip table's) or positive, got {FLAGS.hbm_gib}.")
    if FLAGS.out:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(FLAGS.out)))
        if not os.path.isdir(folder):
            raise ConfigError(f"--out={FLAGS.out!r}: the folder {folder} does not exist; create it first.")
    return target


def run(target) -> dict:
    from fmjax.aot import report as report_lib

    def log(msg):
        print(f"fmjax: compile: {msg}", file=sys.stderr, flush=True)

    config = FLAGS.config
    report = report_lib.compile_report(config, target, with_eval=FLAGS.eval_step, log=log)
    if FLAGS.hbm_gib:
        report["hbm_per_chip"] = int(FLAGS.hbm_gib * report_lib.GIB)
    report["config"] = FLAGS["config"].config_filename
    print(report_lib.format_report(report, report["config"]), flush=True)
    if FLAGS.out:
        clean = _json_safe(report)
        with open(os.path.abspath(os.path.expanduser(FLAGS.out)), "w") as f:
            json.dump(clean, f, indent=1)
    try:
        report_lib.check_fit(report, config)
    except report_lib.DoesNotFit as e:
        print(f"fmjax: does not fit: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DOES_NOT_FIT)
    total, hbm = report["compiler"].get("total"), report.get("hbm_per_chip")
    print(f"fits: {report_lib.size_str(total)} per chip"
          + (f" of {report_lib.size_str(hbm)} ({100 * total / hbm:.0f}%)" if hbm else ""))
    return report


def _json_safe(x):
    """The report as strict JSON: non-finite floats become null (a string 'NaN' stays a
    string), and anything else json cannot write becomes its str()."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, float) or hasattr(x, "__float__"):
        try:
            f = float(x)
        except (TypeError, ValueError):
            return str(x)
        return f if math.isfinite(f) else None
    return str(x)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.cli import _fail
    try:  # flags first, before jax is imported: each failure is one line, exit 2
        if not FLAGS.topology:
            raise ConfigError("--topology is required, e.g. --topology=v5e-16 (or cpu-8).")
        target = _target()
    except ConfigError as e:
        _fail(str(e))
    from fmjax.train.errors import run_with_clean_errors
    run_with_clean_errors(run, target)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
