"""Autoregressive decoding with ``fmjax.models.decoder.Decoder``'s KV cache: greedy,
temperature / top-k / top-p sampling, and beam search.

Everything is one ``jax.jit``-compiled function per (model, shapes, options): the prompt is
prefilled in one cached call, then a ``lax.fori_loop`` feeds one token per step through the
``'cache'`` collection. Sampling is a pure function of the PRNG key (the same key gives the
same tokens). Prompts are (B, P); rows of different lengths are left-padded, with
``attention_mask`` (B, P) False at the padding (positions then count real tokens only, as in
transformers' ``generate``).

    tokens = generate.sample(model, params, prompt, max_new_tokens=20, rng=key,
                             temperature=0.8, top_k=40, top_p=0.95, eos_token_id=eot)
    tokens = generate.sample(model, params, prompt, 20, greedy=True)
    tokens, scores = generate.beam_search(model, params, prompt, 20, num_beams=4)

Both return the prompt followed by the new tokens, (B, P + max_new_tokens); after a row's
``eos_token_id`` the rest of the row is ``pad_token_id`` (default: the eos id).
``model`` may be built with ``decode=False``: it is cloned with ``decode=True``.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9


def init_cache(model, batch_size: int, max_length: int, context=None, context_mask=None):
    """The all-zero ``'cache'`` collection of ``model`` (decode=True) for ``batch_size`` rows of
    up to ``max_length`` tokens, shaped with ``jax.eval_shape`` (no forward pass, no params)."""
    model = model.clone(decode=True)
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(
        {"params": jax.random.PRNGKey(0)}, tokens, context=context, context_mask=context_mask))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits (..., V) with all but the ``top_k`` largest (0: no limit) and all outside the
    smallest set whose probability reaches ``top_p`` (1.0: no limit; the most likely token is
    always kept) set to -1e9."""
    logits = logits.astype(jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the strictly better tokens
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        # the smallest kept logit is the threshold
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def _check(model, prompt, max_new_tokens):
    p = prompt.shape[1]
    if p < 1:
        raise ValueError("generation needs a prompt of at least one token (e.g. the sot id).")
    total = p + int(max_new_tokens)
    limit = getattr(model, "max_length", None)
    if getattr(model, "position", "learned") == "learned" and limit is not None and total > limit:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                         f"model's max_length={limit} (learned positions).")
    return total


def _step_fn(model, params, context, context_mask):
    def step(cache, tokens, attention_mask=None):
        out, mut = model.apply({"params": params, "cache": cache}, tokens, context=context,
                               context_mask=context_mask, attention_mask=attention_mask,
                               mutable=["cache"])
        return out["logits"][:, -1], mut["cache"]
    return step


def _guided(logits, scale, guided):
    """Classifier-free guidance: rows [:B] conditional, [B:] unconditional ->
    uncond + scale * (cond - uncond), (B, V); the logits themselves when not ``guided``."""
    if not guided:
        return logits
    cond, uncond = jnp.split(logits.astype(jnp.float32), 2, axis=0)
    return uncond + scale * (cond - uncond)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k", "top_p",
                                             "eos_token_id", "pad_token_id", "guided"))
def _sample(model, params, prompt, rng, context, context_mask, attention_mask, temperature,
            guidance_scale, *, max_new_tokens, greedy, top_k, top_p, eos_token_id, pad_token_id,
            guided=False):
    # guided: ``prompt`` (and context / masks) hold 2B rows, the conditional then the
    # unconditional ones; both halves are fed the token drawn from the guided logits.
    rows, p = prompt.shape
    b = rows // 2 if guided else rows
    total = p + max_new_tokens
    step = _step_fn(model, params, context, context_mask)
    cache = init_cache(model, rows, total, context, context_mask)
    logits, cache = step(cache, prompt, attention_mask)
    logits = _guided(logits, guidance_scale, guided)
    tokens = jnp.concatenate([prompt[:b], jnp.full((b, max_new_tokens), pad_token_id, prompt.dtype)], 1)

    def body(i, carry):
        tokens, logits, cache, done, rng = carry
        rng, key = jax.random.split(rng)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            scaled = filter_logits(logits / temperature, top_k, top_p)
            nxt = jax.random.categorical(key, scaled, axis=-1)
        nxt = jnp.where(done, pad_token_id, nxt).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, p + i))
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        feed = jnp.concatenate([nxt, nxt]) if guided else nxt
        logits, cache = step(cache, feed[:, None])
        logits = _guided(logits, guidance_scale, guided)
        return tokens, logits, cache, done, rng

    done = jnp.zeros((b,), bool)
    # (the last iteration's forward pass is wasted: one step simpler than peeling it off)
    tokens, logits, cache, done, rng = jax.lax.fori_loop(
        0, max_new_tokens, body, (tokens, logits, cache, done, rng))
    return tokens


def _tile(x, uncond=None):
    if x is None:
        return None
    x = jnp.asarray(x)
    return jnp.concatenate([x, x if uncond is None else jnp.asarray(uncond, x.dtype)], axis=0)


def sample(model, params, prompt, max_new_tokens: int, rng: Optional[jax.Array] = None, *,
           greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
           context=None, context_mask=None, attention_mask=None,
           guidance_scale: float = 1.0, uncond_prompt=None,
           uncond_attention_mask=None) -> jax.Array:
    """Greedy (``greedy=True``, no rng needed) or ancestral sampling from
    softmax(logits / temperature) restricted by ``top_k`` / ``top_p`` (see ``filter_logits``).
    Returns int32 (B, P + max_new_tokens): the prompt, then the new tokens (``pad_token_id``
    after a row's ``eos_token_id``). ``context`` / ``context_mask``: the cross-attention input;
    ``attention_mask`` (B, P): False at the left padding of shorter prompts.

    Classifier-free guidance (Ho & Salimans 2022; for autoregressive token models as in
    Make-A-Scene and Parti): with ``uncond_prompt`` (B, P), e.g. the empty caption of a model
    trained with captions dropped, every step runs the conditional and the unconditional rows
    together (2B rows, one cache) and draws the next token from
    ``uncond + guidance_scale * (cond - uncond)`` logits (before temperature and filtering);
    both rows are fed that token. ``guidance_scale`` 1 is plain conditional sampling (then
    ``uncond_prompt`` is not run); ``uncond_attention_mask`` pads the unconditional prompt as
    ``attention_mask`` does the prompt. ``context`` is shared by both halves."""
    prompt = jnp.asarray(prompt, jnp.int32)
    _check(model, prompt, max_new_tokens)
    if not greedy:
        if rng is None:
            raise ValueError("sampling needs rng=jax.random.PRNGKey(...) (or greedy=True).")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True.")
    guided = uncond_prompt is not None and float(guidance_scale) != 1.0
    if float(guidance_scale) != 1.0 and uncond_prompt is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_prompt (the unconditional "
                         "prompt, e.g. an empty caption), or guidance_scale=1.")
    if guided:
        uncond_prompt = jnp.asarray(uncond_prompt, jnp.int32)
        if uncond_prompt.shape != prompt.shape:
            raise ValueError(f"uncond_prompt shape {uncond_prompt.shape} != prompt shape {prompt.shape}: "
                             "pad it to the prompt's length (and pass uncond_attention_mask).")
        if attention_mask is not None or uncond_attention_mask is not None:
            ones = jnp.ones(prompt.shape, bool)
            attention_mask = jnp.concatenate(
                [ones if attention_mask is None else jnp.asarray(attention_mask, bool),
                 ones if uncond_attention_mask is None else jnp.asarray(uncond_attention_mask, bool)], 0)
        prompt = _tile(prompt, uncond_prompt)
        context, context_mask = _tile(context), _tile(context_mask)
    if rng is None:
        rng = jax.random.PRNGKey(0)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    return _sample(model.clone(decode=True), params, prompt, rng, context, context_mask, mask,
                   jnp.float32(temperature), jnp.float32(guidance_scale),
                   max_new_tokens=int(max_new_tokens),
                   greedy=bool(greedy), top_k=int(top_k), top_p=float(top_p),
                   eos_token_id=eos_token_id,
                   pad_token_id=int(pad if pad is not None else 0), guided=guided)


def _gather_beams(tree, beam_idx, batch, num_beams):
    """Reorder every (..., B*K, ...) cache array (batch axis = ndim - 4: (B*K, L, heads, kv),
    with a leading layer axis when scanned) by ``beam_idx`` (B, K). The decoder's ``key_mask``
    and ``positions`` are the same for the K beams of a row (the prompt's padding, then only
    real tokens), so they, like ``cache_index``, need no reordering."""
    flat_idx = (beam_idx + jnp.arange(batch)[:, None] * num_beams).reshape(-1)

    def take(x):
        if x.ndim < 4:
            return x
        return jnp.take(x, flat_idx, axis=x.ndim - 4)
    return jax.tree.map(take, tree)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams",
                                             "eos_token_id", "pad_token_id"))
def _beam(model, params, prompt, context, context_mask, attention_mask, length_penalty, *,
          max_new_tokens, num_beams, eos_token_id, pad_token_id):
    b, p = prompt.shape
    k = num_beams
    total = p + max_new_tokens
    rep = lambda x: None if x is None else jnp.repeat(x, k, axis=0)
    step = _step_fn(model, params, rep(context), rep(context_mask))
    cache = init_cache(model, b * k, total, rep(context), rep(context_mask))
    logits, cache = step(cache, rep(prompt), rep(attention_mask))
    tokens = jnp.concatenate([prompt, jnp.full((b, max_new_tokens), pad_token_id, prompt.dtype)], 1)
    tokens = jnp.repeat(tokens[:, None], k, axis=1)                         # (B, K, total)
    scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))  # one live beam
    done = jnp.zeros((b, k), bool)
    lengths = jnp.zeros((b, k), jnp.int32)

    def body(i, carry):
        tokens, logits, cache, scores, done, lengths = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, k, -1)
        vocab = logp.shape[-1]
        # a finished beam continues only with pad, at no cost
        finished = jnp.full((vocab,), NEG_INF).at[pad_token_id].set(0.0)
        logp = jnp.where(done[..., None], finished, logp)
        cand = (scores[..., None] + logp).reshape(b, k * vocab)
        new_lengths = (lengths[..., None] + (~done[..., None])).astype(jnp.int32)
        norm = jnp.maximum(new_lengths, 1).astype(jnp.float32) ** length_penalty
        ranked = cand / jnp.broadcast_to(norm, (b, k, vocab)).reshape(b, k * vocab)
        _, top = jax.lax.top_k(ranked, k)                                     # (B, K)
        beam_idx, tok = top // vocab, (top % vocab).astype(tokens.dtype)
        scores = jnp.take_along_axis(cand, top, 1)
        lengths = jnp.take_along_axis(new_lengths[..., 0], beam_idx, 1)
        prev_done = jnp.take_along_axis(done, beam_idx, 1)
        tokens = jnp.take_along_axis(tokens, beam_idx[..., None], 1)
        tokens = tokens.at[:, :, p + i].set(jnp.where(prev_done, pad_token_id, tok))
        done = prev_done if eos_token_id is None else prev_done | (tok == eos_token_id)
        cache = _gather_beams(cache, beam_idx, b, k)
        logits, cache = step(cache, tokens[:, :, p + i].reshape(b * k, 1))
        return tokens, logits, cache, scores, done, lengths

    tokens, logits, cache, scores, done, lengths = jax.lax.fori_loop(
        0, max_new_tokens, body, (tokens, logits, cache, scores, done, lengths))
    final = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-final, axis=1)
    return (jnp.take_along_axis(tokens, order[..., None], 1),
            jnp.take_along_axis(final, order, 1))


def beam_search(model, params, prompt, max_new_tokens: int, num_beams: int = 4, *,
                length_penalty: float = 1.0, eos_token_id: Optional[int] = None,
                pad_token_id: Optional[int] = None, context=None, context_mask=None,
                attention_mask=None):
    """Beam search keeping ``num_beams`` hypotheses per row; a hypothesis that emits
    ``eos_token_id`` is finished (continues with pad at no cost, its length frozen). Hypotheses
    are ranked by sum log p / length ** ``length_penalty`` (length = new tokens incl. eos).
    Returns ``(tokens (B, num_beams, P + max_new_tokens), scores (B, num_beams))``, best first.
    (Unlike transformers' ``BeamSearchScorer`` there is no separate pool of finished
    hypotheses: finished beams compete with live ones for the ``num_beams`` slots.)"""
    prompt = jnp.asarray(prompt, jnp.int32)
    _check(model, prompt, max_new_tokens)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    return _beam(model.clone(decode=True), params, prompt, context, context_mask, mask,
                 jnp.float32(length_penalty), max_new_tokens=int(max_new_tokens),
                 num_beams=int(num_beams), eos_token_id=eos_token_id,
                 pad_token_id=int(pad if pad is not None else 0))


def sequence_logprob(model, params, tokens, prompt_length: int, context=None,
                     context_mask=None) -> jax.Array:
    """Sum of log p(token) over ``tokens[:, prompt_length:]`` under a full (uncached) forward:
    (B,). For checks of decoding (e.g. beam search's best is at least greedy's)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    logits = model.clone(decode=False).apply({"params": params}, tokens, context=context,
                                             context_mask=context_mask)["logits"]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return picked[:, prompt_length - 1:].sum(-1)
