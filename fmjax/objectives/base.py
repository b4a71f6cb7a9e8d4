"""The objective interface: everything method-specific lives behind it.

The trainer only knows this protocol (see docs/design.md):

    init(rng, batch) -> (params, extra)       # params are trained; extra is carried, sharded, checkpointed
    loss(params, extra, batch, rng, step) -> (loss, (metrics, extra))
    after_update(params, extra, step) -> extra
    features(params, extra, images) -> [B, D] embedding for kNN / linear probe / retrieval

Hooks with a default on ``Objective`` (override as needed):
    check(config) -> None                     # method-specific one-line ConfigErrors, before any read or compile
    health(host_metrics) -> str | None        # a warning for the log at log steps (e.g. DINO's collapse)
    after_model_init(params, extra) -> extra  # after config.model_init loaded params (default: unchanged)

Optional capabilities, declared here as ``None`` (unsupported); an objective that has one
defines the method, and callers ask ``supports(objective, name)``:
    visualize(params, extra, batch, rng) -> {name: uint8 HxWx3}   # pictures for DIR/images/
    eval_metrics(params, extra, batch, rng) -> {name: [B] per-example values}
    project_params(params, step) -> params   # applied right after each update (e.g. clamps)
    update_mask(params, step) -> tree of bool  # False: the param is not updated (no decay either)
    text_features(params, extra, tokens) -> [B, D]  # text embedding for zero-shot / retrieval
    caption(params, extra, images) -> [B, L] int token ids  # generated captions (the 'captioning' eval)
    match_scores(params, extra, images, tokens) -> [B] P(image i matches caption i)  # the 'itm' eval
    generate(params, extra, rng, ...) / predict(...)  # generative models (diffusion)
    reconstruct(params, extra, images) -> images  # [B, H, W, C] in [0, 1] through a generator's
        # image tokenizer (DALL-E's dVAE): the ceiling of its samples (the 'generation' eval)
    embed(params, extra, batch, rng, step) -> tree of [B, ...] arrays          # both together:
    loss_from_embeddings(params, extra, embeds, batch, rng, step) -> loss(...)'s output
        # ``loss`` split in two at the per-example outputs (CLIP's embeddings, DINO's head
        # outputs), so that ``config.grad_accum_steps`` keeps the full batch's loss
        # (fmjax.train.step.cached_embedding_loss_and_grad; ``couples_examples`` below)
Evaluators name the capabilities they need (``Evaluator.needs``), so a config that asks
an objective for something it cannot do is refused before compiling.

Gradient accumulation (``config.grad_accum_steps`` = K > 1) sums the gradients of K
micro-batch losses, which is the full batch's gradient only when the loss is a mean of
per-example terms (MAE, supervised, diffusion). An objective whose loss couples the
examples of a batch (contrastive negatives, batch statistics) says why in
``couples_examples``; it then accumulates exactly through ``embed`` +
``loss_from_embeddings`` (the loss runs once on the full batch of cached embeddings), or the
config check refuses K > 1 (``grad_accum_problem``).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fmjax.errors import ConfigError

Params = Any
Extra = Any
Metrics = Mapping[str, jax.Array]


class Objective:
    """Base class with the default (identity) hooks."""

    #: Batch keys the objective reads; the data pipeline keeps only these.
    batch_keys: tuple[str, ...] = ("image",)

    #: Why the loss couples the examples of a batch (so the summed gradients of micro-batch
    #: losses are not the full batch's), or "" when it is a mean of per-example terms. See
    #: the module docstring: non-empty needs ``embed`` + ``loss_from_embeddings`` for
    #: ``config.grad_accum_steps > 1``.
    couples_examples: str = ""

    def __init__(self, config):
        self.config = config

    def init(self, rng, batch) -> tuple[Params, Extra]:
        raise NotImplementedError

    def loss(self, params, extra, batch, rng, step):
        raise NotImplementedError

    def after_update(self, params, extra, step) -> Extra:
        return extra

    def features(self, params, extra, images) -> jax.Array:
        raise NotImplementedError

    def check(self, config) -> None:
        """Raises a one-line ``fmjax.errors.ConfigError`` for method-specific settings that
        cannot work (runs in ``fmjax.train.validate.check``: before anything is read, written
        or compiled). Default: nothing to check."""

    def health(self, host_metrics: Mapping[str, float]) -> str | None:
        """A warning line for the log, from the host-side metrics of a log step (e.g. a
        collapsing teacher), or None. Default: None."""
        return None

    # Optional capabilities (see the module docstring): None means unsupported.
    visualize = None
    eval_metrics = None
    project_params = None
    update_mask = None
    text_features = None
    caption = None
    match_scores = None
    generate = None
    predict = None
    reconstruct = None
    embed = None
    loss_from_embeddings = None

    def after_model_init(self, params, extra) -> Extra:
        """The objective state for params that ``config.model_init`` partly replaced after
        ``init`` (fresh starts only). Default: unchanged; objectives whose state starts as a
        copy of the params (an EMA teacher, EMA weights) copy the loaded params."""
        return extra


OPTIONAL_HOOKS = ("visualize", "eval_metrics", "project_params", "update_mask", "text_features",
                  "caption", "match_scores", "generate", "predict", "embed", "loss_from_embeddings")


def supports(objective, name: str) -> bool:
    """Whether ``objective`` has the capability ``name``: a method, not the base class's
    ``None`` (optional hooks) or ``NotImplementedError`` stub (``features``); works for
    duck-typed objectives too."""
    if not callable(getattr(objective, name, None)):
        return False
    stub = Objective.__dict__.get(name)
    return not (callable(stub) and name in _STUBS and getattr(type(objective), name, None) is stub)


_STUBS = ("init", "loss", "features")
for _name in _STUBS:  # marks the NotImplementedError stubs for wrappers (fmjax.adapt) that cannot import this
    getattr(Objective, _name).is_stub = True


def grad_accum_problem(objective, accum_steps: int, name: str = "") -> str:
    """Empty when ``accum_steps`` micro-batches give ``objective`` the full batch's gradient
    (K = 1; a per-example loss; or the ``embed`` + ``loss_from_embeddings`` hooks), else why
    not, in one line (the config check's ConfigError); ``name``: the objective's, for it."""
    why = getattr(objective, "couples_examples", "")
    if accum_steps <= 1 or not why or (supports(objective, "embed")
                                        and supports(objective, "loss_from_embeddings")):
        return ""
    who = f"objective {name!r}" if name else "this objective"
    return (f"grad_accum_steps={accum_steps}: the loss of {who} couples the examples of a batch "
            f"({why}), so summed micro-batch gradients are not the full batch's; use "
            "grad_accum_steps=1 (a smaller batch_size, or model.remat, to save memory).")


def available() -> list[str]:
    import fmjax.objectives as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "base" and not m.name.startswith("_"))


def make_objective(config) -> Objective:
    """Imports ``fmjax.objectives.<config.objective.name>`` and calls its ``make(config)``;
    wrapped by ``config.adapter``'s adapter when one is set (``fmjax.adapt``)."""
    name = config.objective.name
    if name not in available():
        raise ValueError(f"Unknown objective {name!r}; valid objectives: {available()}.")
    module = importlib.import_module(f"fmjax.objectives.{name}")
    from fmjax import adapt
    return adapt.wrap(module.make(adapt.prepare_config(config)), config)


# -- the multi-view objectives (BYOL, MoCo) with a backbone that keeps state (a ResNet's
# BatchNorm running statistics, registry.state_collections) ---------------------------------

def view_features(backbone, state_keys, params, views, train, rng=None, state=None):
    """[B, V, H, W, C] views -> ([B, V, D] pooled features, the backbone state after them).
    Without state: one backbone call for all views. With state (``state_keys``): one call per
    view, in order, each in ``train`` mode updating the state the next one reads (the
    references run their encoders per view)."""
    b, v = views.shape[:2]
    rngs = {"dropout": rng} if rng is not None else {}
    if not state_keys:
        x = views.reshape((b * v,) + views.shape[2:])    # example-major: keeps the batch sharding
        feats = backbone.apply({"params": params}, x, train=train, rngs=rngs)["pre_logits"]
        return feats.reshape(b, v, -1), state
    feats = []
    for i in range(v):
        variables = {"params": params, **state}
        if train:
            out, state = backbone.apply(variables, views[:, i], train=True, rngs=rngs,
                                        mutable=list(state_keys))
        else:
            out = backbone.apply(variables, views[:, i], train=False, rngs=rngs)
        feats.append(out["pre_logits"])
    return jnp.stack(feats, axis=1), state


def states(extra, state_keys, prefix):
    """(the online / base network's state, the ``prefix`` network's) kept in ``extra``."""
    return ({k: extra[k] for k in state_keys}, {k: extra[prefix + k] for k in state_keys})


def refuse_accumulation(state_keys, config) -> None:
    """One-line ConfigError for ``grad_accum_steps`` > 1 with a stateful backbone."""
    accum = max(int(config.get("grad_accum_steps", 1)), 1)
    if state_keys and accum > 1:
        raise ConfigError(f"grad_accum_steps={accum} with a BatchNorm backbone ({config.model.name}): its "
                          "statistics couple the examples inside the backbone, so the batch cannot be "
                          "split; use grad_accum_steps=1 (or a backbone without BatchNorm).")
