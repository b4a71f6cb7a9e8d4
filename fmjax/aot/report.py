"""Compile a config's real train step for a target machine and account for its memory per chip.

``compile_report(config, target)`` builds exactly what ``launch/train.py`` would run (objective,
mesh from ``config.mesh`` over the target's devices, logical sharding rules, optimizer, the
jitted step with its shardings and donation), lowers it on abstract values (nothing is
allocated, no data is read) and compiles it. It returns a JSON-able dict:

- ``state``: per-chip bytes of params, optimizer state, objective state (EMA teacher, centers,
  queues) and the batch, each from its sharding;
- ``compiler``: XLA's memory analysis per chip: arguments, outputs, aliased (the donated state
  the outputs reuse), temp (activations and workspace), and ``total = arguments + outputs -
  aliased + temp`` (MaxText's ``train_compile`` accounting);
- ``flops``: model FLOPs per chip (analytic for ViT / MAE, else XLA's pre-fusion count) and the
  compiled program's FLOPs and bytes accessed; ``roofline_s`` and ``mfu_at_roofline`` from the
  chip table (``fmjax.aot.chips``);
- ``eval``: the same for the loss forward alone (what the ``loss`` evaluator runs), optional.

**The compile cache.** jax's persistent compilation cache writes TPU executables compiled
against a topology but cannot read them back (the compile-only client has no runtime to
deserialize into: "PjRtCompiler must be constructed with a Client to call Deserialize"), so a
TPU compile took its full time on every run (MAE-B/16 on a v5e-16: ~2 minutes on 2 cores).
When jax's cache is on (``jax_compilation_cache_dir``, e.g. ``JAX_COMPILATION_CACHE_DIR``;
a local directory), what the report reads off a TPU compile (memory analysis, cost analysis,
or the compiler's out-of-memory refusal, and the compile time) is kept in
``<cache dir>/fmjax_aot/<key>.json``, the key a SHA-256 of the lowered program's text (the
step, its shardings and shapes), the topology, its device kind and count, the jax and libtpu
versions and ``XLA_FLAGS`` / ``LIBTPU_INIT_ARGS``: a changed model, config or compiler
compiles again. The report says ``cached: true`` (``compile_s`` is the original compile's).
``FMJAX_AOT_CACHE=0`` turns it off.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time

import jax
import numpy as np

from fmjax.aot import chips as chips_lib
from fmjax.aot import flops as flops_lib
from fmjax.aot import spec as spec_lib
from fmjax.errors import ConfigError

GIB = chips_lib.GIB


# Hardware FLOPs of a train step per model FLOP (fwd + bwd = 3 forwards) by remat policy:
# 'full' recomputes the whole forward (4/3); the saveable policies recompute only the cheap
# elementwise work between matmuls (counted as 1).
REMAT_FLOPS_FACTOR = {"none": 1.0, "full": 4.0 / 3.0, "dots_saveable": 1.0,
                      "dots_with_no_batch_dims_saveable": 1.0, "offload": 1.0}


class DoesNotFit(Exception):
    """The compiled step needs more memory per chip than the chip has (message: one line)."""


def _sharded_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays) under ``shardings`` (the largest
    shard; uneven splits are padded by XLA the same way)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = 0
    for leaf, sh in zip(leaves, shards):
        shape = sh.shard_shape(leaf.shape) if leaf.shape else ()
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    args, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    return dict(arguments=args, outputs=out, aliased=alias, temp=temp,
                code=int(getattr(ma, "generated_code_size_in_bytes", 0)),
                total=args + out - alias + temp)


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}


def _cache_root():
    return jax.config.jax_compilation_cache_dir


def _cache_path(lowered, target, devices, what: str):
    """The compile cache's file for ``lowered`` on ``target`` (module docstring), or None when
    the cache is off: not a TPU target (CPU compiles go through jax's own cache), jax's cache
    dir unset or remote, or ``FMJAX_AOT_CACHE=0``."""
    root = _cache_root()
    if (target.platform != "tpu" or not root or "://" in str(root)
            or os.environ.get("FMJAX_AOT_CACHE", "1") == "0"):
        return None
    try:
        from importlib import metadata
        libtpu = metadata.version("libtpu")
    except Exception:  # noqa: BLE001 - no libtpu: no TPU target either
        libtpu = "none"
    h = hashlib.sha256()
    for part in (what, target.name, devices[0].device_kind, str(len(devices)), jax.__version__, libtpu,
                 os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), lowered.as_text()):
        h.update(str(part).encode())
        h.update(b"\0")
    return os.path.join(str(root), "fmjax_aot", h.hexdigest() + ".json")


def _compile(lowered, target, devices, what: str) -> dict:
    """``{'memory', 'cost', 'oom', 'compile_s', 'cached'}`` of compiling ``lowered``: XLA's memory
    and cost analyses (None when the compiler refused the program for its HBM; ``oom`` then says
    why), read from the compile cache when it holds this program (module docstring)."""
    path = _cache_path(lowered, target, devices, what)
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                facts = json.load(f)
            return dict(facts, cached=True)
        except (OSError, ValueError):
            pass  # unreadable: compile again (and rewrite it)
    t0 = time.perf_counter()
    try:
        compiled, oom = lowered.compile(), None
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs over its HBM
        oom = _parse_oom(str(e))
        if oom is None:
            raise
        compiled = None
    facts = dict(memory=_memory(compiled) if compiled else None,
                 cost=flops_lib.xla_cost(compiled) if compiled else None,
                 oom=oom, compile_s=time.perf_counter() - t0)
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(facts, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache is a nicety
    return dict(facts, cached=False)


def _parse_oom(message: str):
    """The TPU compiler's out-of-memory refusal as ``{'message', 'required', 'available'}``
    (bytes of HLO temporaries needed / HBM available; None when the message has no number), or
    None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    line = next((ln for ln in message.splitlines() if "memory" in ln.lower()), message).strip()

    def grab(pattern):
        m = re.search(pattern, line)
        return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None

    return dict(message=" ".join(line.split())[:300],
                required=grab(r"HLO temporaries \(([\d.]+)([KMGT])") or grab(r"Used ([\d.]+)([KMGT])"),
                available=grab(r"available HBM \(([\d.]+)([KMGT])") or grab(r"of ([\d.]+)([KMGT]) hbm"))


def compile_report(config, target: chips_lib.Target, with_eval: bool = True, log=None) -> dict:
    """Compiles ``config``'s train step (and loss forward) for ``target``; see the module doc."""
    from fmjax.parallel import mesh as mesh_lib
    from fmjax.train import optimizer as opt_lib, state as state_lib, step as step_lib
    from fmjax.train.setup import build

    log = log or (lambda msg: None)
    try:
        devices = chips_lib.devices(target)
    except ValueError as e:  # no libtpu, too few host devices
        raise ConfigError(str(e)) from None
    config, note = spec_lib.without_vocab_files(config)
    if note:
        log(note)
    try:
        objective, mesh, rules = build(config, devices)
    except TypeError as e:  # a model field the chosen model does not take
        raise ConfigError(f"config.model: {e}") from None
    spec_lib.check_without_data(config, objective, mesh)
    bs = int(config.batch_size)
    spec, _ = spec_lib.batch_spec(config, objective, bs)
    try:
        tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, bs)
        step_fn = step_lib.make_train_step(objective, tx, schedule, rules,
                                           config.get("grad_accum_steps", 1),
                                           config.get("nonfinite", "stop"),
                                           step_lib.per_example_clip_norm(config.optimizer))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    abstract, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    batch_sh = {k: mesh_lib.batch_sharding(mesh) for k in spec}
    jitted = step_lib.jit_train_step(step_fn, shardings, batch_sh)
    n = len(devices)
    with state_lib.mesh_context(mesh):
        lowered = jitted.lower(abstract, spec)
        facts = _compile(lowered, target, devices, "train_step")
    oom, compile_s, compiled = facts["oom"], facts["compile_s"], facts["memory"] is not None
    cached = " (read from the compile cache)" if facts["cached"] else ""
    log(f"train step compiled in {compile_s:.1f} s{cached}" if oom is None else
        f"the compiler ran out of memory after {compile_s:.1f} s{cached}: {oom['message']}")

    model_flops, flops_source = flops_lib.model_flops_per_chip(objective, spec, lowered, n)
    remat = config.model.get("remat", "none") or "none"
    if not model_flops and remat == "none" and not config.model.get("scan_layers", False):
        # No formula, and a TPU lowering has no FLOP count: XLA's count of the same step lowered
        # for one CPU device (before fusion; no remat recompute, no scanned loop counted once).
        model_flops = _cpu_lowered_flops(step_fn, abstract, spec, mesh) / n
        flops_source = "xla_cpu" if model_flops else flops_source
    cost = facts["cost"] or {}
    hw_flops = float(cost.get("flops", 0.0)) if compiled else math.nan
    hw_bytes = float(cost.get("bytes accessed", 0.0)) if compiled else math.nan
    chip = target.chip
    # XLA's cost analysis counts a while loop's body once, so a scanned layer stack is
    # undercounted: the roofline takes the larger of XLA's count and the model FLOPs times
    # what the remat policy recomputes (full: the forward again, 4/3 of fwd + bwd).
    factor = REMAT_FLOPS_FACTOR.get(remat, 1.0)
    if int(config.get("grad_accum_steps", 1)) > 1 and getattr(objective, "embed", None):
        factor += 1.0 / 3.0  # cached-embedding accumulation runs each forward once more, without gradients
    estimate = model_flops * factor
    step_flops = max(hw_flops, estimate) if compiled else math.nan
    roofline = chips_lib.roofline_seconds(step_flops, hw_bytes, chip) if chip and compiled else math.nan
    report = dict(
        topology=target.name, platform=target.platform, chips=n,
        device_kind=devices[0].device_kind,
        hbm_per_chip=int(chip.hbm_gib * GIB) if chip else None,
        mesh={k: int(v) for k, v in mesh.shape.items()}, sharding=config.get("sharding", "fsdp"),
        remat=remat, scan_layers=bool(config.model.get("scan_layers", False)),
        dtype=config.get("dtype", "float32"), global_batch=bs,
        grad_accum_steps=int(config.get("grad_accum_steps", 1)),
        batch_spec={k: dict(shape=list(s.shape), dtype=str(s.dtype)) for k, s in spec.items()},
        state=dict(params=_sharded_bytes(abstract.params, shardings.params),
                   optimizer=_sharded_bytes(abstract.opt_state, shardings.opt_state),
                   objective=_sharded_bytes(abstract.extra, shardings.extra),
                   batch=_sharded_bytes(spec, batch_sh)),
        param_count=int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(abstract.params))),
        compiler=facts["memory"] or {}, compiler_oom=oom,
        flops=dict(model_per_chip=model_flops, model_source=flops_source,
                   compiled_per_chip=hw_flops, bytes_accessed_per_chip=hw_bytes,
                   roofline_per_chip=step_flops),
        roofline_s=roofline,
        # No model FLOP count (XLA's count of a TPU lowering can be 0; no analytic formula for
        # this model yet): no MFU, and the roofline rests on the compiled count alone.
        mfu_at_roofline=(model_flops / (roofline * chip.peak_bf16_tflops * 1e12)
                         if chip and roofline and roofline > 0 and model_flops > 0 else math.nan),
        compile_s=compile_s, cached=facts["cached"], note=note)
    if oom is not None:
        report["hbm_per_chip"] = report["hbm_per_chip"] or oom.get("available")
    if with_eval:
        report["eval"] = _eval_report(objective, abstract, shardings, spec, batch_sh, mesh, rules, log, target, devices)
    return report


def _cpu_lowered_flops(step_fn, abstract, spec, mesh) -> float:
    """XLA's FLOP count of ``step_fn`` lowered (not compiled) for one CPU device, on a one-device
    mesh with the target mesh's axis names; 0.0 when that lowering fails."""
    from jax.sharding import Mesh
    from fmjax.train import state as state_lib
    try:
        cpu = jax.devices("cpu")[:1]
        one = Mesh(np.array(cpu).reshape((1,) * len(mesh.axis_names)), mesh.axis_names)
        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (abstract, spec))
        with state_lib.mesh_context(one):
            return flops_lib.xla_flops(jax.jit(step_fn).lower(*plain))
    except Exception:  # noqa: BLE001 - a count is a nicety; the report stands without it
        return 0.0


def _eval_report(objective, abstract, shardings, spec, batch_sh, mesh, rules, log, target, devices) -> dict:
    """The loss forward (no gradients) on a training batch, as the ``loss`` evaluator runs it."""
    import flax.linen as nn
    from fmjax.train import state as state_lib

    def eval_loss(params, extra, batch, rng):
        with nn.logical_axis_rules(rules):
            loss, _ = objective.loss(params, extra, batch, rng, jax.numpy.zeros((), jax.numpy.int32))
        return loss

    fn = jax.jit(eval_loss, in_shardings=(shardings.params, shardings.extra, batch_sh, shardings.rng))
    with state_lib.mesh_context(mesh):
        facts = _compile(fn.lower(abstract.params, abstract.extra, spec, abstract.rng), target, devices,
                         "loss_forward")
    cached = " (read from the compile cache)" if facts["cached"] else ""
    if facts["oom"] is not None:
        log(f"the loss forward does not fit either: {facts['oom']['message']}")
        return dict(compiler={}, compiler_oom=facts["oom"], compile_s=facts["compile_s"], cached=facts["cached"])
    log(f"loss forward compiled in {facts['compile_s']:.1f} s{cached}")
    return dict(compiler=facts["memory"], compile_s=facts["compile_s"], cached=facts["cached"],
                flops_per_chip=float((facts["cost"] or {}).get("flops", 0.0)))


def check_fit(report: dict, config) -> None:
    """Raises ``DoesNotFit`` (one line) when the step's total exceeds the chip's memory,
    naming the largest items and a mesh / remat change that would help."""
    hbm = report.get("hbm_per_chip")
    oom = report.get("compiler_oom")
    state = report["state"]
    if oom:  # the compiler refused: its temporaries alone, plus the state it would hold
        temp = oom.get("required") or 0
        total = temp + state["params"] + state["optimizer"] + state["objective"] + state["batch"]
        hbm = hbm or oom.get("available")
    else:
        temp, total = report["compiler"].get("temp"), report["compiler"].get("total")
        if not hbm or total is None or total <= hbm:
            return
    items = {"activations and workspace (compiler temp)": temp,
             "params": report["state"]["params"], "optimizer state": report["state"]["optimizer"],
             "objective state": report["state"]["objective"], "batch": report["state"]["batch"]}
    largest = sorted(items.items(), key=lambda kv: -kv[1])[:3]
    mesh, n = report["mesh"], report["chips"]
    hints = []
    if largest[0][0].startswith("activations"):
        if report["remat"] in ("none", None, ""):
            hints.append("--config.model.remat=full (or dots_saveable)")
        per_chip = report["global_batch"] // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
        if per_chip >= 2:
            hints.append(f"--config.grad_accum_steps={2 * report['grad_accum_steps']} (smaller micro-batches)")
    if mesh.get("fsdp", 1) < n and (report["state"]["params"] + report["state"]["optimizer"]) > 0.1 * hbm:
        hints.append("--config.mesh.data=1 --config.mesh.fsdp=-1 (params and optimizer state "
                     f"sharded over all {n} chips)")
    if not hints:
        hints.append("a larger slice, or --config.sharding=fsdp_tensor --config.mesh.tensor=4")
    raise DoesNotFit(
        f"{report['topology']}: needs {'at least ' if oom else ''}{size_str(total)} per chip but a "
        f"{report['device_kind']} has {size_str(hbm)}; largest: "
        + ", ".join(f"{k} {size_str(v)}" for k, v in largest)
        + "; try " + ", or ".join(hints) + ".")


def size_str(b) -> str:
    if b is None:
        return "-"
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 1024 ** 2:.1f} MiB"


def format_report(report: dict, title: str) -> str:
    """The human-readable table ``launch/compile.py`` prints."""
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    hbm = report.get("hbm_per_chip")
    dp = report["mesh"].get("data", 1) * report["mesh"].get("fsdp", 1)
    lines = [
        f"{title} on {report['topology']}: {report['chips']} x {report['device_kind']}"
        + (f", {size_str(hbm)} each" if hbm else ""),
        f"mesh {mesh} | sharding {report['sharding']} | remat {report['remat']} | scan_layers "
        f"{report['scan_layers']} | dtype {report['dtype']} | batch {report['global_batch']} "
        f"({report['global_batch'] // max(dp, 1)} per data-parallel chip"
        + (f", {report['grad_accum_steps']} micro-batches" if report["grad_accum_steps"] > 1 else "")
        + f") | {report['param_count'] / 1e6:.1f}M params",
        "per chip:",
    ]
    rows = [("params (float32)", report["state"]["params"]),
            ("optimizer state", report["state"]["optimizer"]),
            ("objective state (EMA teacher, ...)", report["state"]["objective"]),
            ("batch", report["state"]["batch"])]
    c = report["compiler"]
    if c:
        rows += [("compiler: arguments", c["arguments"]), ("compiler: outputs", c["outputs"]),
                 ("compiler: aliased (donated state)", c["aliased"]),
                 ("compiler: temp (activations, workspace)", c["temp"]),
                 ("total = args + outputs - aliased + temp", c["total"])]
    lines += [f"  {name:<40} {size_str(v):>11}" for name, v in rows]
    if c and hbm:
        lines.append(f"  {'of the chip memory':<40} {100 * c['total'] / hbm:>10.0f}%")
    oom = report.get("compiler_oom")
    if oom:
        lines.append(f"  {'compiler: temp (refused to compile)':<40} {size_str(oom.get('required')):>11}")
        lines.append(f"  compiler: {oom['message']}")
    f = report["flops"]
    lines.append(f"FLOPs per step per chip: model {f['model_per_chip']:.3g} ({f['model_source']})"
                 + (f", XLA's count {f['compiled_per_chip']:.3g}"
                    + (" (a scanned layer loop counted once)" if report["scan_layers"] else "")
                    + f", roofline {f['roofline_per_chip']:.3g}; bytes accessed "
                    f"{f['bytes_accessed_per_chip']:.3g}" if c else ""))
    if report["platform"] == "tpu" and c:
        mfu = report["mfu_at_roofline"]
        lines.append(f"roofline step time {report['roofline_s']:.3g} s, MFU at the roofline "
                     + (f"{100 * mfu:.0f}%" if not math.isnan(mfu) else "n/a (no model FLOP count)")
                     + " (peak and bandwidth: fmjax/aot/chips.py)")
    lines.append(f"compile time {report['compile_s']:.1f} s"
                 + (" (read from the compile cache)" if report.get("cached") else ""))
    if "eval" in report:
        e = report["eval"]
        lines.append("loss forward (eval): " + (f"total {size_str(e['compiler'].get('total'))} per chip"
                                                 if e["compiler"] else "does not fit")
                     + f", compiled in {e['compile_s']:.1f} s"
                     + (" (cached)" if e.get("cached") else ""))
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
