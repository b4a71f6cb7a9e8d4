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
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# key: (label, config, what FSDP should divide: the gcd of the model's widths (MAE encoder and
# decoder, CLIP image and text towers), scan_layers supported, extra overrides)
ROWS = {
    "mae_b16": ("MAE ViT-B/16 (batch 4096)", "configs/mae.py:vit_b16_imagenet", 256, True, ()),
    "mae_l16": ("MAE ViT-L/16 (batch 4096)", "configs/mae.py:vit_l16_imagenet", 512, True, ()),
    "dino_s16": ("DINO ViT-S/16 (batch 1024)", "configs/dino.py:vit_s16_imagenet", 384, True, ()),
    "dino_b16": ("DINO ViT-B/16 (batch 1024)", "configs/dino.py:vit_b16_imagenet", 768, True, ()),
    "clip_b32": ("CLIP ViT-B/32 (batch 32k)", "configs/clip.py:vit_b32", 256, True, ()),
    "clip_b16": ("CLIP ViT-B/16 (batch 32k)", "configs/clip.py:vit_b16", 256, True, ()),
    "clip_l14": ("CLIP ViT-L/14 (batch 32k)", "configs/clip.py:vit_l14", 256, True, ()),
    "siglip_b16": ("SigLIP B/16 (batch 32k)", "configs/clip.py:siglip_b16", 256, True, ()),
    "dit_b2": ("DiT-B/2 (batch 256)", "configs/diffusion.py:dit_b2_imagenet256", 768, True, ()),
    "ddpm_cifar": ("DDPM CIFAR-10 U-Net (batch 128)", "configs/diffusion.py:ddpm_cifar10", 128, False, ()),
    "clip_g14": ("CLIP ViT-g/14 (batch 65,536, ring loss)", "configs/clip.py:vit_g14", 128, True, ()),
}
TOPOLOGIES = ("v5e-16", "v5e-256", "v5p-128", "v5p-1024")
ACCUM = (1, 2, 4, 8, 16, 32)

flags.DEFINE_list("rows", list(ROWS), f"Rows to compile: {', '.join(ROWS)}.")
flags.DEFINE_list("topologies", list(TOPOLOGIES), "Columns: TPU slices (launch/compile.py names).")
flags.DEFINE_string("results", os.path.join(REPO, "docs", "scaling.json"), "Saved attempts.")
flags.DEFINE_string("out", os.path.join(REPO, "docs", "scaling.md"), "The markdown table.")
flags.DEFINE_bool("render_only", False, "Only re-render the markdown from --results.")
flags.DEFINE_bool("redo", False, "Recompile cells that already have a result.")
flags.DEFINE_integer("timeout", 1800, "Seconds per compile attempt.")
FLAGS = flags.FLAGS


def _chips(topology: str) -> int:
    from fmjax.aot.chips import parse_topology
    return parse_topology(topology).num_chips


def _mesh(width: int, chips: int) -> dict:
    """FSDP over the largest divisor of ``chips`` that divides ``width``; data over the rest."""
    fsdp = max(d for d in range(1, chips + 1) if chips % d == 0 and width % d == 0)
    return dict(data=chips // fsdp, fsdp=fsdp, tensor=1)


def candidates(row: str, topology: str):
    """Attempts for a cell, fastest first: (name, overrides)."""
    _, _, width, scan, extra = ROWS[row]
    mesh = _mesh(width, _chips(topology))
    base = [f"--config.mesh.data={mesh['data']}", f"--config.mesh.fsdp={mesh['fsdp']}",
            "--config.mesh.tensor=1", "--config.sharding=fsdp", *extra]
    if scan:
        base.append("--config.model.scan_layers=True")
    out = [("remat none", base + ["--config.model.remat=none"]),
           ("remat dots_saveable", base + ["--config.model.remat=dots_saveable"])]
    out += [(f"remat full, {k} micro-batches" if k > 1 else "remat full",
             base + ["--config.model.remat=full", f"--config.grad_accum_steps={k}"]) for k in ACCUM]
    return mesh, out


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


def _cell_text(cell) -> str:
    if cell is None:
        return "not compiled yet"
    last = cell["attempts"][-1]
    if not cell["fits"]:
        if last["exit"] == 1:
            return "does not fit with full remat and 32 micro-batches"
        return f"error: {last['message'][:120]}"
    r = last["report"]
    mesh = f"data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']}"
    gib = r["compiler"]["total"] / 2 ** 30
    mfu = r.get("mfu_at_roofline")
    step = r.get("roofline_s")
    perf = (f"; {step:.2f} s/step, MFU {100 * mfu:.0f}%" if isinstance(step, (int, float)) and
            isinstance(mfu, (int, float)) and not math.isnan(step) else "")
    return f"{mesh}, {last['name']}: {gib:.1f} GiB{perf}"


def render(results: dict) -> str:
    from fmjax.aot.chips import CHIPS, parse_topology
    lines = [
        "# Will it fit? Memory and speed of the paper presets on TPU slices",
        "",
        "Generated by `python launch/scaling_table.py` from `launch/compile.py`'s ahead-of-time "
        "compilation (libtpu 0.0.42 via `pip install -e '.[aot]'`, on a CPU host); do not edit by hand. "
        "Each cell is the first candidate that fits, tried fastest first: remat `none`, "
        "`dots_saveable`, then `full` with 1, 2, 4, ... micro-batches "
        "(`grad_accum_steps`; CLIP and DINO keep the full batch's negatives / centre). "
        "The mesh is FSDP over the most chips that divide the model width, data parallel over the "
        "rest; scan over layers where the model has it. Memory is XLA's per-chip total (arguments + "
        "outputs - donated + temp). Step time is a roofline bound (compute or HBM, whichever is "
        "longer; no communication), so MFU is an upper bound. One command reproduces a cell, e.g. "
        "`python launch/compile.py --config=configs/clip.py:vit_g14 --topology=v5e-256 "
        "--config.mesh.data=2 --config.mesh.fsdp=128 --config.grad_accum_steps=4`.",
        "",
        "Chips (per chip; `fmjax/aot/chips.py`): " + "; ".join(
            f"{c.name}: {c.hbm_gib:g} GiB HBM, {c.peak_bf16_tflops:g} bf16 TFLOP/s, {c.hbm_gbps:g} GB/s"
            for c in CHIPS.values()) + ".",
        "",
        "| preset | " + " | ".join(f"{t} ({parse_topology(t).num_chips} chips)" for t in TOPOLOGIES) + " |",
        "|---|" + "---|" * len(TOPOLOGIES),
    ]
    for row, (label, config, *_) in ROWS.items():
        cells = [_cell_text(results.get(f"{row}@{t}")) for t in TOPOLOGIES]
        lines.append(f"| {label}<br>`{config}` | " + " | ".join(cells) + " |")
    done = sum(1 for r in ROWS for t in TOPOLOGIES if f"{r}@{t}" in results)
    lines += ["", f"{done} of {len(ROWS) * len(TOPOLOGIES)} cells compiled. Attempts, with every "
              "candidate's exit and message, are in `docs/scaling.json`."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    results = _load(FLAGS.results)
    if not FLAGS.render_only:
        unknown = sorted(set(FLAGS.rows) - set(ROWS))
        if unknown:
            from fmjax.cli import _fail
            _fail(f"--rows: unknown {unknown}; valid: {', '.join(ROWS)}.")
        for topology in FLAGS.topologies:
            _chips(topology)  # a bad name fails before any compile
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
