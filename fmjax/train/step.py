"""The jit-sharded train step, with gradient accumulation by scan over micro-batches.

``accum_steps`` K > 1: an objective whose loss is a mean of per-example terms sums the
gradients of its K micro-batch losses (plain accumulation). One whose loss couples the
examples (CLIP's negatives, DINO's center: ``Objective.couples_examples``) must have the
``embed`` / ``loss_from_embeddings`` hooks, and ``cached_embedding_loss_and_grad`` keeps
its loss on the full batch; without them the config check refuses K > 1.

``per_example_clip`` c > 0 (``config.optimizer.clip_mode='per_example'`` with ``clip_norm`` c;
scenic's ``optimizer.per_example_clipping``, as OWL-ViT trains): the loss runs on each example
alone (a batch of one, its own dropout key ``fold_in(rng, i)``) under ``vmap``, each example's
gradient is divided by ``max(|g_i| / c, 1)`` (its global L2 norm over all params; optax's
``per_example_global_norm_clip``) and the step takes their mean. It holds B per-example
gradients at once (B x the params' bytes), and the loss of an example must not depend on the
others (refused for a ``couples_examples`` objective).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fmjax.train.state import TrainState
from fmjax.objectives.base import grad_accum_problem, supports


def _split_micro(batch, accum_steps: int):
    """[B, ...] -> [accum, B/accum, ...] taking every accum-th example into one micro-batch.

    Striding (rather than contiguous blocks) keeps every micro-batch spread over all
    devices that hold a share of the batch dimension.
    """
    def split(x):
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jnp.moveaxis(x, 1, 0)
    return jax.tree.map(split, batch)


def _merge_micro(tree):
    """The inverse of ``_split_micro``: [accum, B/accum, ...] -> [B, ...] in the batch's order."""
    def merge(x):
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return jax.tree.map(merge, tree)


def cached_embedding_loss_and_grad(objective, params, extra, batch, rng, step, accum_steps: int):
    """``(loss, metrics, extra, grads)`` of the FULL batch's loss, in ``accum_steps`` micro-
    batches of activation memory: open_clip's ``accum_freq`` scheme (the GradCache of Gao et
    al., 2021), for objectives with ``embed`` + ``loss_from_embeddings``.

    1. Without gradients, ``embed`` every micro-batch; the embeddings are merged back into
       the batch's order (one [B, ...] tree, held with its gradient: CLIP's [B, embed_dim]
       are small next to the activations, DINO's [B, views, out_dim] less so).
    2. ``loss_from_embeddings`` on the full batch, once: loss, metrics and new ``extra`` as
       the unaccumulated step computes them; its gradient w.r.t. the params it reads itself
       (CLIP's logit scale and bias) and w.r.t. every embedding.
    3. For each micro-batch, ``embed`` again with gradients and pull its slice of the
       embedding gradient back through it (``jax.vjp``); the sum over micro-batches plus
       step 2's direct part is exactly the full batch's gradient (the chain rule).

    open_clip recomputes the full-batch loss once per micro-batch with that micro-batch's
    fresh features spliced into the cached ones and backpropagates it; as the spliced
    features equal the cached ones, its per-micro-batch feature gradients are the ones of
    step 2, which is therefore computed once (one loss pass instead of K). The loss's own
    params get their gradient once, where open_clip's repeated backward adds the logit
    scale's K times. Micro-batch i's ``embed`` draws ``fold_in(rng, i)`` in both passes
    (dropout, drop path), so the recomputed embeddings are the cached ones and the
    gradient is exact; they are not the draws of the unaccumulated step (same distribution).
    ``embed`` sees the step's ``extra`` (read only); ``loss_from_embeddings`` returns the new one.
    """
    micro = _split_micro(batch, accum_steps)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))

    def embed(p, mb, key):
        return objective.embed(p, extra, mb, key, step)

    cached = jax.lax.map(lambda xs: embed(params, *xs), (micro, keys))
    cached = jax.lax.stop_gradient(_merge_micro(cached))
    grad_fn = jax.value_and_grad(objective.loss_from_embeddings, argnums=(0, 2), has_aux=True)
    (loss, (metrics, extra_out)), (grads, embed_grads) = grad_fn(
        params, extra, cached, batch, rng, step)

    def body(grads_sum, xs):
        mb, key, cotangent = xs
        _, pull = jax.vjp(lambda p: embed(p, mb, key), params)
        return jax.tree.map(jnp.add, grads_sum, pull(cotangent)[0]), None

    grads, _ = jax.lax.scan(body, grads, (micro, keys, _split_micro(embed_grads, accum_steps)))
    return loss, metrics, extra_out, grads


def mask_update(tx, mask, updates, new_opt_state, old_opt_state):
    """Frozen params (``mask`` False) are skipped by the optimizer, as torch skips a param
    whose grad is None: no update, no weight decay, and their moments keep their old
    values. With ``optimizer.adam_count='per_param'`` each param's Adam step count is one
    of those slots, so a param unfrozen later starts its bias correction from its own
    count, as torch does; with the default shared count it uses the global one."""
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
    opt_state = jax.tree.map(lambda m, new, old: jnp.where(m, new, old),
                             slot_mask(tx, new_opt_state, mask), new_opt_state, old_opt_state)
    return updates, opt_state


def slot_mask(tx, opt_state, param_mask):
    """``opt_state``'s tree of bools: each per-param slot takes its param's ``param_mask`` value,
    every other leaf (step counts, scalars) is True."""
    return optax.tree_map_params(tx, lambda _, m: m, opt_state, param_mask,
                                 transform_non_params=lambda _: True)


NONFINITE_POLICIES = ("stop", "skip_step")


def per_example_clip_norm(opt) -> float:
    """c of ``config.optimizer`` when it asks for per-example clipping, else 0.0."""
    if opt.get("clip_mode", "global") == "per_example" and opt.get("clip_norm"):
        return float(opt.get("clip_norm"))
    return 0.0


def per_example_problem(objective, accum_steps: int, clip: float, name: str = "") -> str:
    """Empty when per-example clipping ``clip`` (0: off) can run on ``objective``, else why not."""
    if not clip:
        return ""
    why = getattr(objective, "couples_examples", "")
    who = f"objective {name!r}" if name else "this objective"
    if why:
        return (f"optimizer.clip_mode='per_example' runs the loss on each example alone, but the loss of "
                f"{who} couples the examples of a batch ({why}); use clip_mode='global'.")
    if accum_steps > 1:
        return (f"optimizer.clip_mode='per_example' with grad_accum_steps={accum_steps}: per-example "
                "gradients are already one example at a time; use grad_accum_steps=1.")
    return ""


def _mean_over_examples(tree):
    """Per-example leaves (E, ...) -> their mean (float leaves) or example 0's (the rest)."""
    return jax.tree.map(lambda x: x.mean(0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else x[0], tree)


def make_train_step(objective, tx, schedule, rules, accum_steps: int = 1, nonfinite: str = "stop",
                    per_example_clip: float = 0.0):
    """Returns ``step(state, batch) -> (state, metrics)`` (not yet jitted).

    Every step checks on device that the loss, the gradient norm and the new params' norm
    are finite (``metrics['finite']``, 1.0 or 0.0; three scalars it computes anyway).
    ``nonfinite='stop'``: the state is returned as computed and the loop stops before it
    saves it. ``'skip_step'`` (big_vision / MaxText style): a non-finite step leaves params,
    optimizer state and objective state as they were, only the step counter moves on.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.nonfinite={nonfinite!r}; valid: {list(NONFINITE_POLICIES)}.")
    problem = grad_accum_problem(objective, accum_steps)  # the config check refuses it first
    if problem:
        raise ValueError(problem)
    problem = per_example_problem(objective, accum_steps, per_example_clip)
    if problem:
        raise ValueError(problem)
    cached = (accum_steps > 1 and supports(objective, "embed")
              and supports(objective, "loss_from_embeddings"))

    def loss_and_grad(params, extra, batch, rng, step):
        grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(params, extra, batch, rng, step)
        return loss, metrics, extra, grads

    def clipped_loss_and_grad(params, extra, batch, rng, step):
        """The mean of the per-example gradients, each clipped to ``per_example_clip``."""
        n = jax.tree.leaves(batch)[0].shape[0]

        def one(example, i):
            one_batch = jax.tree.map(lambda x: x[None], example)
            loss, metrics, ex_extra, grads = loss_and_grad(
                params, extra, one_batch, jax.random.fold_in(rng, i), step)
            divisor = jnp.maximum(optax.tree.norm(grads) / per_example_clip, 1.0)
            grads = jax.tree.map(lambda g: g / divisor.astype(g.dtype), grads)
            return loss, metrics, ex_extra, grads, (divisor > 1.0).astype(jnp.float32)

        losses, metrics, extras, grads, clipped = jax.vmap(one)(batch, jnp.arange(n))
        metrics = dict(jax.tree.map(jnp.mean, metrics), clipped_fraction=clipped.mean())
        return losses.mean(), metrics, _mean_over_examples(extras), _mean_over_examples(grads)

    def step_fn(state: TrainState, batch):
        with nn.logical_axis_rules(rules):
            rng = jax.random.fold_in(state.rng, state.step)
            if per_example_clip:
                loss, metrics, extra, grads = clipped_loss_and_grad(
                    state.params, state.extra, batch, rng, state.step)
            elif accum_steps == 1:
                loss, metrics, extra, grads = loss_and_grad(
                    state.params, state.extra, batch, rng, state.step)
            elif cached:  # the full batch's loss from cached embeddings (CLIP, DINO)
                loss, metrics, extra, grads = cached_embedding_loss_and_grad(
                    objective, state.params, state.extra, batch, rng, state.step, accum_steps)
            else:  # per-example losses: the mean of the micro-batch gradients
                micro = _split_micro(batch, accum_steps)

                def body(carry, xs):
                    grads_sum, extra = carry
                    mb, i = xs
                    loss, metrics, extra, grads = loss_and_grad(
                        state.params, extra, mb, jax.random.fold_in(rng, i), state.step)
                    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                    return (grads_sum, extra), (loss, metrics)

                zeros = jax.tree.map(jnp.zeros_like, state.params)
                (grads, extra), (losses, metrics) = jax.lax.scan(
                    body, (zeros, state.extra), (micro, jnp.arange(accum_steps)))
                grads = jax.tree.map(lambda g: g / accum_steps, grads)
                loss = losses.mean()
                metrics = jax.tree.map(jnp.mean, metrics)

            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            if supports(objective, "update_mask"):  # frozen params (LiT towers, warm-up freezes)
                mask = objective.update_mask(state.params, state.step)
                updates, opt_state = mask_update(tx, mask, updates, opt_state, state.opt_state)
            params = optax.apply_updates(state.params, updates)
            if supports(objective, "project_params"):  # constraints, e.g. CLIP's logit-scale clamp
                params = objective.project_params(params, state.step)
            extra = objective.after_update(params, extra, state.step)
            grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
            if nonfinite == "skip_step":
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
                params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
                extra = keep(extra, state.extra)
            new_state = state.replace(step=state.step + 1, params=params,
                                      opt_state=opt_state, extra=extra)
            metrics = dict(metrics)
            metrics.update(loss=loss, grad_norm=grad_norm, param_norm=param_norm,
                           lr=schedule(state.step), finite=finite.astype(jnp.float32))
        return new_state, metrics

    return step_fn


def jit_train_step(step_fn, state_shardings, batch_shardings):
    """jit with explicit shardings; the old state is donated."""
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)
