"""Config checks that run before any data is read or anything is compiled.

Each failure is a ``ConfigError`` whose message is one line naming the problem
and the fix; ``launch/train.py`` prints it and exits non-zero.
"""
from __future__ import annotations

import jax

from fmjax.data import sources
from fmjax.data.transforms import parse_pp
from fmjax.evals import registry
from fmjax.objectives.base import grad_accum_problem
from fmjax.parallel import mesh as mesh_lib
from fmjax.train import observe
from fmjax.train.step import per_example_clip_norm, per_example_problem
from fmjax.train.writer import check_writers

from fmjax.errors import ConfigError  # noqa: F401  (re-exported: fmjax.train.validate.ConfigError)

DTYPES = ("float32", "bfloat16")


def check(config, objective, mesh, evals: bool = True) -> None:
    """Every check of ``config`` that needs no write and no compile; ``evals=False`` leaves
    out ``config.evals`` (the benchmark, which runs none)."""
    dp = mesh_lib.batch_parallelism(mesh)
    bs = int(config.batch_size)
    if bs <= 0:
        raise ConfigError(f"batch_size must be positive, got {bs}; e.g. --config.batch_size={max(dp, 8)}.")
    if bs % dp:
        raise ConfigError(
            f"global batch_size={bs} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {dp}, e.g. --config.batch_size={max(dp, bs // dp * dp)}.")
    if bs % jax.process_count():
        raise ConfigError(f"global batch_size={bs} is not divisible by the {jax.process_count()} processes.")
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1 or bs % (accum * dp):
        raise ConfigError(
            f"batch_size={bs} must split into grad_accum_steps={accum} micro-batches that are each "
            f"divisible by the data-parallel size {dp}; pick batch_size a multiple of {accum * dp}.")
    problem = grad_accum_problem(objective, accum, config.objective.get("name", ""))
    if problem:  # a loss that couples examples, without the hooks that keep it whole
        raise ConfigError(problem)
    problem = per_example_problem(objective, accum, per_example_clip_norm(config.optimizer),
                                  config.objective.get("name", ""))
    if problem:
        raise ConfigError(problem)
    try:
        observe.check_profile(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        check_writers(config.get("writers", ("jsonl", "tensorboard")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if float(config.get("peak_tflops", 0) or 0) < 0:
        raise ConfigError(f"peak_tflops must be >= 0 (0: the datasheet table or a measured matmul), "
                          f"got {config.peak_tflops}.")
    if config.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r} is not supported; valid: {list(DTYPES)}.")
    patch = getattr(objective, "patch_size", None)
    size = config.data.get("image_size")
    if patch and size and size % patch:
        raise ConfigError(
            f"image size {size} is not divisible by the patch size {patch}; "
            f"use an image size that is a multiple of {patch} (e.g. {size // patch * patch or patch}).")
    if callable(getattr(objective, "check", None)):
        objective.check(config)   # method-specific settings (e.g. the text tower's vocabulary)
    for key, least in (("worker_count", 0), ("read_threads", 1)):
        v = config.data.get(key, least)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ConfigError(f"config.data.{key}={v!r} must be an int >= {least}.")
    for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(config.get(key, 1)) <= 0:
            raise ConfigError(f"{key} must be positive, got {config.get(key)}"
                              + (" (0 would delete every checkpoint, the final one included); keep at "
                                 "least 1, e.g. --config.keep_checkpoints=3." if key == "keep_checkpoints" else "."))
    for key in ("keep_period", "eval_every"):
        if int(config.get(key) or 0) < 0:
            raise ConfigError(f"{key} must be 0 (off) or positive, got {config.get(key)}.")
    from fmjax.train.step import NONFINITE_POLICIES
    if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
        raise ConfigError(f"config.nonfinite={config.get('nonfinite')!r}; valid: {list(NONFINITE_POLICIES)} "
                          "(stop: end the run at the first NaN/inf step, nothing non-finite is saved; "
                          "skip_step: leave the state as it was and go on).")
    try:
        sources.check_source(config.data.name, config.data.get("train_split", "train"),
                             config.data.get("data_dir"))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if evals:
        check_evals(config, objective, mesh)


def check_model_init(config, workdir: str | None = None) -> None:
    """``config.model_init`` names an existing workdir or a file of a known format (one-line
    ConfigErrors, nothing read). Skipped when ``workdir`` already holds checkpoints: a resume
    restores its own and never reads the source again."""
    import os
    ckpts = os.path.join(workdir, "checkpoints") if workdir else None
    if ckpts and os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
        return
    from fmjax.train import model_init
    model_init.check(config)
    from fmjax import adapt
    mi = config.get("model_init") or {}
    if adapt.spec(config) and not (mi.get("workdir") or mi.get("torch")):
        import sys
        print(f"fmjax: warning: config.adapter.name={config.adapter.name!r} trains on a RANDOMLY "
              "initialised base (config.model_init names no workdir or torch checkpoint; e.g. "
              "--config.model_init.workdir=DIR of a trained run).", file=sys.stderr, flush=True)


def evals_that_run(config) -> list[str]:
    """The entries of ``config.evals`` a training run reaches: at step 0 (``eval_at_start``)
    or every N > 0 steps. (An entry that never runs is only checked for its keys and values:
    e.g. MAE's evals on ``validation`` while training on an image folder with evals off.)"""
    at_start = config.get("eval_at_start", True)
    return [name for name, ev in config.evals.items()
            if at_start or ev.get("every", config.get("eval_every", 0))]


def check_evals(config, objective, mesh, data_for=None) -> None:
    """``config.evals``: each entry's type is registered (``fmjax.evals.registry``), its keys
    are the type's, its values sensible, the objective has the hooks the type needs; and for
    the entries in ``data_for`` (default ``evals_that_run``) the dataset, splits and files
    exist. Also parses ``config.data.pp_eval`` (the default eval pipeline). One-line
    ConfigErrors; nothing is read, prepared or compiled."""
    parse_pp(config.data.get("pp_eval", ""), "config.data.pp_eval")
    classes = {}
    for name, ev in config.evals.items():
        if not hasattr(ev, "keys") or not hasattr(ev, "get"):
            raise ConfigError(f"config.evals.{name}={ev!r}; each eval is a dict with a type, e.g. "
                              "dict(type='knn', split='validation').")
        classes[name] = registry.get(ev.get("type"), f"config.evals.{name}.type")
        classes[name].check(name, ev, config, objective, mesh)
    for name in (evals_that_run(config) if data_for is None else data_for):
        if name in classes:
            classes[name].check_data(name, config.evals[name], config)


def check_pipeline_matches(config, transform, spec) -> None:
    """``pp_train`` is a string built from ``config.data`` when the config file is loaded, so
    a later ``--config.data.image_size`` / ``data.tokenize.*`` / ``data.swap_words`` override
    does not reach it. Refuse a config whose pipeline disagrees with those keys, instead of
    training silently on the old values."""
    fix = ("config.data.pp_train is built from it when the config file is loaded, so the override "
           "did not reach the pipeline; override --config.data.pp_train (and pp_eval) to match, or "
           "edit the config file")
    size = config.data.get("image_size")
    if size and "image" in spec and len(spec["image"].shape) == 4:
        got = tuple(spec["image"].shape[1:3])
        if got != (int(size), int(size)):
            raise ConfigError(f"config.data.image_size={size} but config.data.pp_train makes "
                              f"{got[0]}x{got[1]} images: {fix}.")
    ops = list(getattr(transform, "transforms", []))
    from fmjax.data.text_ops import swap_words, tokenize
    tok_cfg = config.data.get("tokenize")
    caption_toks = [op for op in ops if isinstance(op, tokenize) and op.key == "caption"]
    if tok_cfg and caption_toks:
        try:
            want = tokenize(**dict(tok_cfg))
        except (ValueError, TypeError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"config.data.tokenize: {e}") from None
        for op in ops:
            if not isinstance(op, tokenize):
                continue
            if repr(op.tokenizer) != repr(want.tokenizer) or (
                    "context_length" in tok_cfg and op.context_length != want.context_length):
                raise ConfigError(
                    f"config.data.tokenize={dict(tok_cfg)} but config.data.pp_train tokenizes with "
                    f"{op.tokenizer!r}, context_length={op.context_length}: {fix}.")
    words = config.data.get("swap_words")
    if words:
        for op in ops:
            if isinstance(op, swap_words) and tuple(op.words) != tuple(str(w).lower() for w in words):
                raise ConfigError(f"config.data.swap_words={tuple(words)} but config.data.pp_train swaps "
                                  f"{op.words}: {fix}.")
        if config.objective.get("hard_negatives") and not any(isinstance(op, swap_words) for op in ops):
            raise ConfigError(f"config.data.swap_words is set but config.data.pp_train has no swap_words op: {fix}.")


def check_workdir(workdir: str, create: bool) -> None:
    """The workdir is (or can become) a writable directory; with ``create``, it is made and
    probed with a temporary file. A bad one is a one-line ConfigError."""
    import os
    import tempfile
    from fmjax.train import files
    if files.is_remote(workdir):  # a bucket: create and probe with one small object
        if create:
            probe = files.join(workdir, ".fmjax_write_probe")
            try:
                files.makedirs(workdir)
                files.write_text(probe, "probe")
                files.remove(probe)
            except Exception as e:  # noqa: BLE001 - any backend's failure is the user's path
                raise ConfigError(f"cannot write to --workdir={workdir}: {type(e).__name__}: {e}; check the "
                                  "bucket name and credentials, or pick another path.") from None
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                          "(new or written by launch/train.py).")
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create --workdir={workdir}: {parent} is a file; pick another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {parent} (for --workdir={workdir}): permission denied; "
                          "pick a writable path.")
    if not create:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".fmjax_write_probe_"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to --workdir={workdir}: {e.strerror or e}; "
                          "pick a writable path.") from None
