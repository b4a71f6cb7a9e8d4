"""fmjax's CoCa (fmjax.models.coca + fmjax.objectives.coca) against a minimal PyTorch
transcription of open_clip's CoCa and CoCaLoss (tests/reference/open_clip_coca_model.py, with
the repository commit and files), random weights converted by fmjax/interop/open_clip_coca.py:
embeddings, caption logits, both losses and every gradient (float32), with open_clip's default
(shifted, ``correct_cls_mask=False``) text mask and the corrected one.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from open_clip_coca_model import (CTX, EMBED, HEADS, IMAGE, VOCAB, WIDTH, CoCa,  # noqa: E402
                                  coca_loss)
from fmjax.interop import open_clip_coca  # noqa: E402
from fmjax.testing import load_config  # noqa: E402
from fmjax.objectives.base import make_objective  # noqa: E402


def _batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, IMAGE, IMAGE, generator=g)
    text = torch.zeros(b, CTX, dtype=torch.long)
    for i, n in enumerate((3, 6, CTX - 2, 9)[:b]):   # sot 1, words, eot VOCAB-1, zero padding
        text[i, 0], text[i, n + 1] = 1, VOCAB - 1
        text[i, 1:n + 1] = torch.randint(2, VOCAB - 1, (n,), generator=g)
    return images, text


def _setup(correct_cls_mask, pooler_type="tok"):
    torch.manual_seed(0)
    # open_clip's separate contrastive pooler exists only for width == embed_dim (its ln_post)
    model = CoCa(correct_cls_mask, "" if pooler_type == "tok" else pooler_type,
                 WIDTH if pooler_type == "tok" else EMBED)
    with torch.no_grad():  # norms away from identity, biases nonzero, so they matter
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    sd = model.state_dict()
    kwargs = open_clip_coca.coca_kwargs_from_open_clip(sd, pooler_heads=HEADS,
                                                       legacy_cls_mask=not correct_cls_mask,
                                                       head_dim=EMBED // HEADS, pooler_type=pooler_type)
    kwargs["num_heads"] = HEADS  # the vision tower's head_dim is 12, the others' 8
    c = load_config("coca")
    c.model = dict(name="coca", **kwargs)
    c.data.tokenize = dict(context_length=CTX, tokenizer="words", vocab_size=VOCAB)
    objective = make_objective(c)
    params = open_clip_coca.convert_open_clip_coca(sd, num_heads=HEADS, text_heads=HEADS,
                                                   decoder_heads=HEADS, pooler_heads=HEADS,
                                                   pooler_type=pooler_type)
    return model, objective, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("correct_cls_mask,pooler_type", [
    (False, "tok"), (True, "tok"), (True, "parallel"), (True, "cascade")])
def test_losses_outputs_and_gradients_match_open_clip(correct_cls_mask, pooler_type):
    model, objective, params = _setup(correct_cls_mask, pooler_type)
    images, text = _batch()
    out = model(images, text)
    clip_t, cap_t = coca_loss(out["image_features"], out["text_features"], out["logits"][:, :-1],
                              text[:, 1:], out["logit_scale"])
    model.zero_grad()
    (clip_t + cap_t).backward()

    batch = dict(image=jnp.asarray(images.permute(0, 2, 3, 1).numpy()), tokens=jnp.asarray(text.numpy()))
    fm = jax.jit(objective.model.apply)({"params": params}, batch["image"], batch["tokens"])
    for ours, theirs in (("image_embeds", "image_features"), ("text_embeds", "text_features"),
                         ("caption_logits", "logits")):
        np.testing.assert_allclose(np.asarray(fm[ours]), out[theirs].detach().numpy(),
                                   rtol=1e-4, atol=2e-5, err_msg=ours)

    def loss(p):
        return objective.loss(p, {}, batch, jax.random.PRNGKey(0), 0)
    (total, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), clip_t.item(), rtol=1e-5)
    np.testing.assert_allclose(2.0 * float(metrics["caption_loss"]), cap_t.item(), rtol=1e-5)
    np.testing.assert_allclose(float(total), (clip_t + cap_t).item(), rtol=1e-5)

    torch_grads = {k: p.grad for k, p in model.named_parameters()}
    want = open_clip_coca.convert_open_clip_coca(torch_grads, num_heads=HEADS, text_heads=HEADS,
                                                 decoder_heads=HEADS, pooler_heads=HEADS,
                                                 pooler_type=pooler_type)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    checked = 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        if "patch_embed" in name and "bias" in name:   # open_clip's conv1 has no bias
            continue
        if "['key']['bias']" in name:   # exactly 0 in exact arithmetic (softmax shift): float noise
            continue
        w = np.asarray(flat_want[path])
        scale = max(np.abs(w).max(), 1e-3)
        np.testing.assert_allclose(np.asarray(g), w, atol=2e-5 * scale + 1e-7, rtol=1e-3, err_msg=name)
        checked += 1
    assert checked > 100


def test_pooler_types_differ_and_need_naming():
    """The separate poolers give other embeddings than 'tok' would on the same tower and
    caption pooler, all num_queries caption tokens, and a state dict with
    attn_pool_contrastive is refused without pooler_type (its shapes do not say which)."""
    model, par, params = _setup(True, "parallel")
    _, cas, _ = _setup(True, "cascade")
    images, text = _batch()
    batch = (jnp.asarray(images.permute(0, 2, 3, 1).numpy()), jnp.asarray(text.numpy()))
    a = jax.jit(par.model.apply)({"params": params}, *batch)
    b = jax.jit(cas.model.apply)({"params": params}, *batch)
    assert np.abs(np.asarray(a["image_embeds"]) - np.asarray(b["image_embeds"])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(a["caption_logits"]), np.asarray(b["caption_logits"]), rtol=1e-6)
    toks = jax.jit(lambda p, x: par.model.apply({"params": p}, x, method="image_tokens"))(params, batch[0])
    assert toks.shape[1] == par.config.model.num_queries
    with pytest.raises(ValueError, match="give pooler_type='parallel' or 'cascade'"):
        open_clip_coca.convert_open_clip_coca(model.state_dict(), pooler_heads=HEADS)
    with pytest.raises(ValueError, match="no visual.attn_pool_contrastive"):
        open_clip_coca.coca_kwargs_from_open_clip(_setup(True)[0].state_dict(), pooler_type="parallel")


def test_masks_differ_where_open_clip_shifts_them():
    """The legacy and corrected masks give different text embeddings on padded rows (so each
    option above is exercised), and the same caption logits before the first pad."""
    _, legacy, params = _setup(False)
    _, correct, _ = _setup(True)
    images, text = _batch()
    batch = (jnp.asarray(images.permute(0, 2, 3, 1).numpy()), jnp.asarray(text.numpy()))
    a = jax.jit(legacy.model.apply)({"params": params}, *batch)
    b = jax.jit(correct.model.apply)({"params": params}, *batch)
    assert np.abs(np.asarray(a["text_embeds"]) - np.asarray(b["text_embeds"])).max() > 1e-3


def test_greedy_caption_hook_follows_the_logits():
    """``CoCaObjective.caption``: each emitted token is the argmax of the caption logits of the
    prefix before it (checked against a full forward of the generated sequence)."""
    _, objective, params = _setup(True)
    images, _ = _batch()
    image = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    caps = jax.jit(lambda p, x: objective.caption(p, {}, x))(params, image)
    assert caps.shape == (4, CTX - 1)
    from fmjax.objectives.lm import LMObjective
    sot = LMObjective._tokenizer(objective.config).sot_token_id
    seq = jnp.concatenate([jnp.full((4, 1), sot, jnp.int32), caps], 1)
    logits = jax.jit(objective.model.apply)({"params": params}, image, seq)["caption_logits"]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, :-1], -1)), np.asarray(caps))


def test_model_init_format_reads_open_clip_coca(tmp_path):
    """``config.model_init.format='open_clip_coca'``: a saved open_clip CoCa state dict loads
    into the params the converter gives, with the head counts from ``config.model``."""
    from fmjax.train import model_init
    model, objective, params = _setup(True)
    torch.save(model.state_dict(), tmp_path / "coca.bin")
    flat, _ = model_init.read_source(dict(torch=str(tmp_path / "coca.bin"), format="open_clip_coca"),
                                     objective.config.model)
    want = model_init.flatten(jax.tree.map(np.asarray, params), "params")
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat[k]), want[k])
