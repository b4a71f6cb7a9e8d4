"""docs/scaling.md from launch/compile.py: for each paper preset and TPU slice, the fastest
mesh / remat / accumulation that fits, its memory per chip, roofline step time and MFU.

    python launch/scaling_table.py                       # every row x every column (hours)
    python launch/scaling_table.py --rows=clip_g14 --topologies=v5e-256
    python launch/scaling_table.py --render_only         # the markdown from the saved results

Each cell tries candidates fastest first (remat none, then dots_saveable, then full remat with
1, 2, 4, ... micro-batches) and stops at the first that fits. The TPU compiler refuses a
program that does not fit within seconds, so only the first fitting candidate costs a full
compile. Every attempt is saved to ``docs/scaling.json`` as soon as it finishes (re-runs skip
cells already there; ``--redo`` recompiles them), and the markdown is re-rendered from it.
The mesh puts FSDP over the largest number of chips that divides the model width (so params and
optimizer state shard evenly), and data parallelism over the rest.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fmjax.aot import table  # noqa: E402
from fmjax.aot.table import ROWS, TOPOLOGIES, candidates, render  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_list("rows", list(ROWS), f"Rows to compile: {', '.join(ROWS)}.")
flags.DEFINE_list("topologies", list(TOPOLOGIES), "Columns: TPU slices (launch/compile.py names).")
flags.DEFINE_string("results", os.path.join(REPO, "docs", "scaling.json"), "Saved attempts.")
flags.DEFINE_string("out", os.path.join(REPO, "docs", "scaling.md"), "The markdown table.")
flags.DEFINE_bool("render_only", False, "Only re-render the markdown from --results.")
flags.DEFINE_bool("redo", False, "Recompile cells that already have a result.")
flags.DEFINE_integer("timeout", 1800, "Seconds per compile attempt.")
FLAGS = flags.FLAGS


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def compile_cell(row: str, topology: str, results: dict) -> dict:
    """Tries the cell's candidates until one fits; records every attempt."""
    label, config, *_ = ROWS[row]
    mesh, attempts = candidates(row, topology)
    cell = dict(row=row, topology=topology, mesh=mesh, attempts=[])
    for name, overrides in attempts:
        out = os.path.join("/tmp", f"fmjax_scaling_{row}_{topology}.json")
        cmd = [sys.executable, os.path.join(REPO, "launch", "compile.py"), f"--config={config}",
               f"--topology={topology}", "--eval_step=false", f"--out={out}", *overrides]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout, cwd=REPO)
            code, last = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            code, last = -1, f"compile timed out after {FLAGS.timeout} s"
        attempt = dict(name=name, overrides=overrides, exit=code, seconds=round(time.time() - t0, 1),
                       message=last[:400])
        if code in (0, 1) and os.path.exists(out):
            with open(out) as f:
                attempt["report"] = json.load(f)
            os.remove(out)
        cell["attempts"].append(attempt)
        print(f"{row} {topology} {name}: exit {code} in {attempt['seconds']} s"
              + ("" if code == 0 else f" ({last[:160]})"), flush=True)
        if code == 0 or code not in (1,):  # fits, or an error that another remat will not fix
            break
    cell["fits"] = cell["attempts"][-1]["exit"] == 0
    results[f"{row}@{topology}"] = cell
    return cell


def main(argv):
    del argv
    results = _load(FLAGS.results)
    if not FLAGS.render_only:
        unknown = sorted(set(FLAGS.rows) - set(ROWS))
        if unknown:
            from fmjax.cli import _fail
            _fail(f"--rows: unknown {unknown}; valid: {', '.join(ROWS)}.")
        for topology in FLAGS.topologies:
            table.chips_of(topology)  # a bad name fails before any compile
        for row in FLAGS.rows:
            for topology in FLAGS.topologies:
                if f"{row}@{topology}" in results and not FLAGS.redo:
                    continue
                compile_cell(row, topology, results)
                _save(FLAGS.results, results)
                with open(FLAGS.out, "w") as f:
                    f.write(render(results))
    with open(FLAGS.out, "w") as f:
        f.write(render(results))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
