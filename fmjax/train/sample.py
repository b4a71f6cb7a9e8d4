"""Sample a trained generator's checkpoint (diffusion, DALL-E) to PNG grids: what
``launch/sample.py`` runs.

Class-conditional models: one grid per class (``class_<i>_<name>.png``) and
``all_classes.png`` (a row per class); text-conditional: one grid per prompt
(``prompt_<i>.png``) and ``all_prompts.png``; unconditional: ``samples.png``. Samples come
from the EMA weights, in global batches sharded over the mesh's data axes (see
``fmjax.evals.generation.Generator``). With ``classifier_workdir`` the class-conditional
samples are also scored by that classifier (the project's conditional-generation metric).
With ``rerank_workdir`` (a CLIP run) each prompt's ``rerank_from`` samples are scored by that
CLIP's image-text cosine similarity and the best ``num_per_class`` kept, best first (DALL-E's
re-ranking, Ramesh et al. 2021 section 2.5; any text-conditional model).
"""
from __future__ import annotations


import jax
import numpy as np

from fmjax.data import sources, transforms
from fmjax.data.text_ops import tokenize_texts
from fmjax.evals import generation as gen_lib
from fmjax.evals.images import image_grid, save_png
from fmjax.errors import ConfigError, NonFiniteError
from fmjax.train import files
from fmjax.train.restore import load_checkpoint, load_classifier, load_workdir_config
from fmjax.train.setup import build
from fmjax.train.writer import log
from fmjax.objectives.base import supports

COLUMNS = 8  # images per row of a per-class / per-prompt grid
AR_KEYS = gen_lib.AR_KEYS  # an autoregressive sampler's settings (DALL-E)


def check_ar_sampler(settings: dict) -> None:
    """ConfigError for a bad temperature (> 0), top_k (>= 0), top_p (in (0, 1]) or
    guidance_scale (finite), named as its flag."""
    try:
        gen_lib.check_ar_sampler(settings, prefix="--")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_prompts(prompts) -> list[str]:
    """'a red circle;a blue square' (or a list) -> ['a red circle', 'a blue square']."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        prompts = prompts.split(";")
    return [p.strip() for p in prompts if p and p.strip()]


def _default_prompts(config, n: int = 8) -> list[str]:
    """The first ``n`` distinct captions of the validation split."""
    src = sources.get_source(config.data.name, config.data.get("eval_split", "validation"),
                             config.data.get("data_dir"))
    out = []
    for i in range(min(len(src), 100 * n)):
        caption = src[i].get("caption")
        if caption is None:
            break
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if caption not in out:
            out.append(caption)
        if len(out) == n:
            break
    if not out:
        raise ConfigError(f"the model is text-conditional and {config.data.name} has no captions; "
                          "pass --prompts='a red circle;a blue square'.")
    return out


def check_request(num_per_class, batch_size, classes, prompts):
    """The sampling flags that need no model, checked: ``(num_per_class, batch_size or None,
    class ids or None, prompts or None)``; a ``ConfigError`` naming the flag otherwise."""
    try:
        num_per_class = int(num_per_class)
    except (TypeError, ValueError):
        raise ConfigError(f"--num_per_class={num_per_class!r}; give an integer >= 1.") from None
    if num_per_class < 1:
        raise ConfigError(f"--num_per_class={num_per_class}; it must be at least 1.")
    if batch_size is not None:
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"--batch_size={batch_size!r}; give an integer >= 1.") from None
        if batch_size < 1:
            raise ConfigError(f"--batch_size={batch_size}; it must be at least 1 (the global sampling "
                              "batch; omit it for config.batch_size).")
    ids = None
    if classes is not None:
        given = classes.split(",") if isinstance(classes, str) else list(classes)
        text = ",".join(str(c).strip() for c in given)
        try:
            ids = [int(str(c).strip()) for c in given]
        except ValueError:
            raise ConfigError(f"--classes={text}: class ids must be integers, e.g. --classes=0,3.") from None
        if not ids:
            raise ConfigError("--classes is empty; give class ids, e.g. --classes=0,3, or omit it for "
                              "all classes.")
    prompt_list = None
    if prompts is not None:
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            shown = prompts if isinstance(prompts, str) else ";".join(map(str, prompts))
            raise ConfigError(f"--prompts={shown!r} holds no prompt; give ';'-separated prompts, e.g. "
                              "--prompts='a red circle;a blue square', or omit it for the first "
                              "validation captions.")
    return num_per_class, batch_size, ids, prompt_list


def check_conditions(workdir: str, objective, ids, prompts) -> None:
    """``ConfigError`` if class ids or prompts do not fit the model's conditioning."""
    kind = objective.conditioning
    what = {"class": "class-conditional", "text": "text-conditional", "none": "unconditional"}[kind]
    if prompts is not None and kind != "text":
        fix = (f"pick classes with --classes=0,3 (ids 0 .. {objective.num_classes - 1})"
               if kind == "class" else "omit --prompts")
        raise ConfigError(f"--prompts is for a text-conditional model, but {workdir} is {what}; {fix}.")
    if ids is not None and kind != "class":
        fix = ("give prompts with --prompts='a red circle;a blue square'" if kind == "text"
               else "omit --classes")
        raise ConfigError(f"--classes is for a class-conditional model, but {workdir} is {what}; {fix}.")
    if ids is not None:
        bad = [c for c in ids if not 0 <= c < objective.num_classes]
        if bad:
            raise ConfigError(f"--classes={','.join(map(str, ids))}: {bad} out of range; valid class ids "
                              f"are 0 .. {objective.num_classes - 1}.")


def _steps(workdir: str) -> list:
    """The checkpoint steps in ``workdir``/checkpoints (folder names)."""
    path = files.join(workdir, "checkpoints")
    return sorted(int(d) for d in files.listdir(path) if d.isdigit())


def _slug(text: str, n: int = 40) -> str:
    """'A red circle, left.' -> 'a_red_circle_left' (a file-name-safe prefix)."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "_".join(words)[:n].strip("_") or "prompt"


def _rows(images: np.ndarray, columns: int = COLUMNS) -> list:
    return [images[i:i + columns] for i in range(0, len(images), columns)]


def sample_checkpoint(workdir: str, step: int | None = None, num_per_class: int = 8,
                      prompts=None, classes=None, seed: int = 0, outdir: str | None = None,
                      batch_size: int | None = None, classifier_workdir: str | None = None,
                      config=None, devices=None, rerank_workdir: str | None = None,
                      rerank_from: int = 32, **sampler) -> dict:
    """Samples ``workdir``'s checkpoint (latest or ``step``) and writes PNG grids.

    ``num_per_class`` samples per class (``classes``: a subset of class ids, default all),
    per prompt (``prompts``: a list or a ';'-separated string; default the first captions
    of the validation split), or, unconditional, 8 rows of ``num_per_class``. ``sampler``:
    overrides of ``config.objective.sample`` (diffusion: sampler, num_steps, guidance_scale, eta,
    ...; DALL-E: temperature, top_k, top_p, guidance_scale; None values ignored). ``rerank_workdir``: a CLIP
    workdir scoring ``rerank_from`` samples per prompt, of which the best ``num_per_class``
    are kept (metrics ``clip_score_best`` / ``clip_score_mean``: the kept / all samples' mean
    cosine similarity). ``batch_size`` (default ``config.batch_size``) is rounded up to a
    multiple of the data-parallel size. Returns {'paths', 'images' (uint8 [N, H, W, C]),
    'conditions', 'metrics', 'step'}.

    Bad arguments are ``ConfigError``s raised before the checkpoint is restored (they need
    only ``DIR/config.json``); a NaN or infinite sample is a ``NonFiniteError`` naming the
    step, raised before any PNG is written.
    """
    workdir = files.resolve(workdir)
    # -- Every check runs before the checkpoint is restored or anything compiled. -------------
    given = {k: v for k, v in sampler.items() if v is not None}
    unknown = sorted(set(given) - set(gen_lib.SAMPLER_KEYS) - set(AR_KEYS))
    if unknown:
        raise ConfigError(f"unknown sampler settings {unknown}; valid: {list(dict.fromkeys(gen_lib.SAMPLER_KEYS + AR_KEYS))}.")
    num_per_class, batch_size, ids, prompt_list = check_request(num_per_class, batch_size, classes,
                                                                prompts)
    config = config or load_workdir_config(workdir)
    objective, mesh, _ = build(config, devices)
    if not supports(objective, "generate"):
        raise ConfigError(f"{workdir} holds a {config.objective.name!r} model, which cannot generate "
                          "images; launch/sample.py needs a diffusion or DALL-E workdir.")
    diffusion = hasattr(objective, "schedule")
    own, other = (gen_lib.SAMPLER_KEYS, AR_KEYS) if diffusion else (AR_KEYS, gen_lib.SAMPLER_KEYS)
    foreign = sorted(set(given) & (set(other) - set(own)))
    if foreign:
        raise ConfigError(f"{', '.join('--' + k for k in foreign)}: not a setting of {config.objective.name!r}'s "
                          f"sampler; valid: {', '.join('--' + k for k in own)}.")
    overrides = {k: v for k, v in given.items() if k in own}
    if diffusion:
        try:
            gen_lib.check_sampler(overrides, objective.schedule.num_timesteps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        check_ar_sampler(overrides)
    check_conditions(workdir, objective, ids, prompt_list)
    if rerank_workdir is not None:
        if objective.conditioning != "text":
            raise ConfigError(f"--rerank_workdir ranks samples by their prompt; {workdir} is "
                              f"{objective.conditioning!r}-conditional.")
        if int(rerank_from) < num_per_class:
            raise ConfigError(f"--rerank_from={rerank_from} must be >= --num_per_class={num_per_class} "
                              "(the samples drawn per prompt, of which the best are kept).")
        check_clip_workdir(rerank_workdir)
    if classifier_workdir:  # fail before sampling
        if objective.conditioning != "class":
            raise ConfigError("--classifier_workdir scores class-conditional samples; this model is "
                              f"{objective.conditioning!r}-conditional.")
        try:
            gen_lib.check_classifier_workdir(classifier_workdir, objective.num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    outdir = files.resolve(outdir or files.join(workdir, "samples"))
    if objective.conditioning == "text":
        prompt_list = prompt_list or _default_prompts(config)

    config, objective, mesh, rules, state, step = load_checkpoint(workdir, config, step, devices)
    generator = gen_lib.Generator(objective, mesh, rules, batch_size or config.batch_size, **overrides)

    if objective.conditioning == "class":
        try:
            names = sources.class_names(config.data.name, config.data.get("data_dir"))
        except Exception:  # noqa: BLE001 - names only label the files
            names = None
        ids = list(range(objective.num_classes)) if ids is None else ids
        groups = [(f"class_{c:03d}_{gen_lib.class_key(c, names)}", c) for c in ids]
        labels = np.repeat(np.asarray(ids, np.int32), num_per_class)
        cond, all_name = {"label": labels}, "all_classes"
    elif objective.conditioning == "text":
        groups = [(f"prompt_{i:02d}_{_slug(p)}", p) for i, p in enumerate(prompt_list)]
        draws = int(rerank_from) if rerank_workdir is not None else num_per_class
        cond = {"tokens": np.repeat(tokenize_texts(config, prompt_list), draws, axis=0)}
        all_name = "all_prompts"
    else:
        groups, cond, all_name = [], None, "samples"
    num = len(next(iter(cond.values()))) if cond else 8 * num_per_class
    log(f"== sampling {num} images from {workdir} at step {step} "
        f"({dict(config.objective.get('sample', {}), **overrides)}, batch {generator.batch_size}, "
        f"mesh {dict(mesh.shape)})")
    try:
        images = generator(state.params, state.extra, cond, num=num, seed=seed, step=step)
    except NonFiniteError as e:
        raise NonFiniteError(f"{workdir}: {e} Nothing was written to {outdir}; "
                             f"checkpoints: {_steps(workdir)} (pick one with --step=N).") from None
    rerank_metrics = {}
    if rerank_workdir is not None:
        scores = clip_scores(rerank_workdir, images, [p for p in prompt_list for _ in range(int(rerank_from))],
                             devices=list(mesh.devices.flat)).reshape(len(prompt_list), int(rerank_from))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :num_per_class]
        per_prompt = images.reshape((len(prompt_list), int(rerank_from)) + images.shape[1:])
        images = np.concatenate([per_prompt[i, order[i]] for i in range(len(prompt_list))])
        kept = np.take_along_axis(scores, order, axis=1)
        rerank_metrics = dict(clip_score_best=float(kept.mean()), clip_score_mean=float(scores.mean()))
        log(f"== CLIP re-ranking ({files.resolve(rerank_workdir)}): kept the best {num_per_class} of "
            f"{rerank_from} per prompt; mean cosine {rerank_metrics['clip_score_best']:.4f} kept, "
            f"{rerank_metrics['clip_score_mean']:.4f} over all")

    paths = []
    if groups:
        per_group = images.reshape((len(groups), num_per_class) + images.shape[1:])
        for (name, _), pics in zip(groups, per_group):
            paths.append(files.join(outdir, f"{name}.png"))
            _save(paths[-1], image_grid(_rows(pics)))
        paths.append(files.join(outdir, f"{all_name}.png"))
        _save(paths[-1], image_grid(list(per_group)))
    else:
        paths.append(files.join(outdir, f"{all_name}.png"))
        _save(paths[-1], image_grid(_rows(images, num_per_class)))
    for p in paths:
        log(p)

    metrics = dict(rerank_metrics)
    if classifier_workdir:
        classifier, _ = load_classifier(classifier_workdir, objective.num_classes, generator.image_shape,
                                        devices=list(mesh.devices.flat))
        metrics = gen_lib.accuracy_metrics(classifier.classify(images, labels), labels,
                                           objective.num_classes, names)
        split = config.data.get("eval_split", "validation")
        real = sources.get_source(config.data.name, split, config.data.get("data_dir"))
        metrics["classifier_real_accuracy"] = classifier.accuracy(real)
        log(f"== generation accuracy (classifier {files.resolve(classifier_workdir)}): "
            f"{metrics['accuracy']:.4f} on samples, {metrics['classifier_real_accuracy']:.4f} on real "
            f"{split} images")
        for k, v in sorted(metrics.items()):
            log(f"   {k} = {v:.4f}")
    return dict(paths=paths, images=images, conditions=[g[1] for g in groups], metrics=metrics,
                step=step)


def check_clip_workdir(workdir: str) -> dict:
    """The saved config of a CLIP-like workdir (an objective with text features); ConfigError
    otherwise, before anything is restored."""
    import json
    path = files.join(files.resolve(workdir), "config.json")
    if not files.exists(path):
        raise ConfigError(f"--rerank_workdir={workdir} has no config.json: train a CLIP first "
                          "(python launch/train.py --config=configs/clip.py --workdir=DIR).")
    saved = json.loads(files.read_text(path))
    name = (saved.get("objective") or {}).get("name")
    if name not in ("clip", "coca", "blip"):
        raise ConfigError(f"--rerank_workdir={workdir} trained objective {name!r}; re-ranking needs image and "
                          "text embeddings (a clip, coca or blip run).")
    return saved


def clip_scores(workdir: str, images: np.ndarray, prompts: list, devices=None) -> np.ndarray:
    """[N] cosine similarity of each uint8 image [N, H, W, C] with its prompt, by the CLIP-like
    model of ``workdir`` (its own eval transform and tokenizer)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fmjax.parallel import mesh as mesh_lib
    config, objective, mesh, rules, state, _ = load_checkpoint(workdir, devices=devices)
    if not (supports(objective, "text_features") and supports(objective, "features")):
        raise ConfigError(f"--rerank_workdir={workdir}: objective {config.objective.name!r} has no text features.")
    tf = transforms.parse(config.data.pp_eval)  # its tokenize op reads a (placeholder) caption
    r = np.random.default_rng(0)
    x = np.stack([np.asarray(tf({"image": img, "label": 0, "caption": "x"}, r)["image"]) for img in images])
    ids = tokenize_texts(config, prompts)
    bs = gen_lib.padded_batch_size(min(len(x), 256), mesh)
    sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    img_fn = jax.jit(lambda p, e, a: objective.features(p, e, a), out_shardings=sharding)
    txt_fn = jax.jit(lambda p, e, t: objective.text_features(p, e, t), out_shardings=sharding)
    a = gen_lib.map_batches(lambda b: img_fn(state.params, state.extra, b), x, bs, sharding, mesh, rules)
    b = gen_lib.map_batches(lambda b: txt_fn(state.params, state.extra, b), ids, bs, sharding, mesh, rules)
    a, b = a.astype(np.float32), b.astype(np.float32)
    a /= np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)


def _save(path: str, picture: np.ndarray) -> None:
    if jax.process_index() == 0:
        save_png(path, picture)
