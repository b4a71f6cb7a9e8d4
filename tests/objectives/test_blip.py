"""The 'blip' objective, fmjax.models.blip and the 'itm' eval: the MED's modes and weight
sharing, the loss pieces against direct computations, the negatives, the queues and the
momentum model, one-line config errors, and an interrupted run that resumes exactly.
(Step-by-step parity with salesforce/BLIP: tests/reference/test_blip_trajectory.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import testing
from fmjax.errors import ConfigError
from fmjax.evals import itm
from fmjax.models.blip import BLIP
from fmjax.models.registry import capabilities
from fmjax.objectives import blip
from fmjax.objectives.base import make_objective, supports
from fmjax.parallel.mesh import make_mesh
from fmjax.train import validate

ONE_DEVICE = jax.devices()[:1]
IMAGE = dict(name="vit", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
             class_token=True, pool="cls", num_classes=0)


def _model():
    return BLIP(image=IMAGE, embed_dim=16, text_width=32, text_depth=2, text_heads=2,
                text_mlp_dim=64, vocab_size=20, max_positions=8)


def _inputs():
    g = np.random.default_rng(0)
    images = jnp.asarray(g.normal(size=(3, 16, 16, 3)), jnp.float32)
    tokens = jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0], [1, 8, 9, 10, 11, 2]])
    return images, tokens


def test_med_modes_share_all_but_the_self_attention():
    model = _model()
    images, tokens = _inputs()
    params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
    assert {"image", "vision_proj", "text_proj", "itm_head", "text", "temp"} == set(params)
    layer = params["text"]["layer_0"]
    assert set(layer) == {"attn", "dec_attn", "cross", "ffn"}
    assert set(params["text"]) == {"word_embed", "pos_embed", "embed_norm", "layer_0", "layer_1",
                                   "lm_head"}
    assert "embedding" not in params["text"]["lm_head"]  # the LM head reads the word embedding
    image_tokens = model.apply({"params": params}, images, method=model.image_tokens)

    def grads(method, *args):
        f = lambda p: jnp.sum(model.apply({"params": p}, *args, method=getattr(model, method)))  # noqa: E731
        return jax.grad(f)(params)["text"]["layer_0"]

    def touched(g):
        return {k for k, v in g.items() if any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(v))}

    assert touched(grads("text_embedding", tokens)) == {"attn", "ffn"}
    assert touched(grads("itm_logits", image_tokens, tokens)) == {"attn", "cross", "ffn"}
    assert touched(grads("lm_logits", image_tokens, tokens)) == {"dec_attn", "cross", "ffn"}


def test_decoder_is_causal_and_padding_is_masked():
    model = _model()
    images, tokens = _inputs()
    params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
    v = {"params": params}
    image_tokens = model.apply(v, images, method=model.image_tokens)
    logits = model.apply(v, image_tokens, tokens, method=model.lm_logits)
    changed = tokens.at[:, 4].set(3)          # a later token: earlier positions do not move
    logits2 = model.apply(v, image_tokens, changed, method=model.lm_logits)
    np.testing.assert_allclose(logits[:, :4], logits2[:, :4], atol=1e-6)
    assert float(jnp.abs(logits[2, 4:] - logits2[2, 4:]).max()) > 1e-4
    # the encoder is bidirectional, and what follows the text is padding it never sees
    emb = model.apply(v, tokens[:1], method=model.text_embedding)
    longer = jnp.concatenate([tokens[:1], jnp.zeros((1, 2), jnp.int32)], 1)
    np.testing.assert_allclose(emb, model.apply(v, longer, method=model.text_embedding), atol=1e-5)


def test_lm_loss_is_label_smoothed_cross_entropy_over_non_pad_targets():
    g = np.random.default_rng(0)
    logits = jnp.asarray(g.normal(size=(2, 5, 7)), jnp.float32)
    tokens = jnp.array([[5, 1, 2, 6, 0], [5, 3, 6, 0, 0]])
    loss, _ = blip.smoothed_lm_loss(logits, tokens, pad_id=0, smoothing=0.1)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    terms = [0.9 * -logp[b, t, tokens[b, t + 1]] + 0.1 * -logp[b, t].mean()
             for b in range(2) for t in range(4) if tokens[b, t + 1] != 0]
    assert len(terms) == 5
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-6)


def test_itc_targets_mix_momentum_softmax_and_one_hot():
    g = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, txt, img_m, txt_m = (jnp.asarray(unit(g.normal(size=(4, 8))), jnp.float32) for _ in range(4))
    iq, tq = (jnp.asarray(unit(g.normal(size=(6, 8))), jnp.float32) for _ in range(2))
    loss, sim_i2t, _ = blip.itc_loss(img, txt, img_m, txt_m, iq, tq, 0.1, 0.4)
    t_all, i_all = np.concatenate([txt_m, tq]), np.concatenate([img_m, iq])

    def ce(q, keys, q_m):
        s, s_m = q @ keys.T / 0.1, q_m @ keys.T / 0.1
        target = 0.4 * np.asarray(jax.nn.softmax(s_m, 1)) + 0.6 * np.eye(4, 10)
        return -np.mean(np.sum(np.asarray(jax.nn.log_softmax(s, 1)) * target, 1))

    expected = (ce(np.asarray(img), t_all, np.asarray(img_m)) + ce(np.asarray(txt), i_all, np.asarray(txt_m))) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert sim_i2t.shape == (4, 10)


def test_negatives_are_never_the_pair_itself_and_follow_the_weights():
    sim = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)) * 3, jnp.float32)
    w = blip.negative_weights(sim)
    assert np.all(np.diag(np.asarray(w)) == 0)
    draws = jax.vmap(lambda k: blip.sample_negatives(k, w))(jax.random.split(jax.random.PRNGKey(0), 4000))
    draws = np.asarray(draws)
    assert not np.any(draws == np.arange(4)[None])
    freq = np.stack([np.bincount(draws[:, i], minlength=4) / len(draws) for i in range(4)])
    np.testing.assert_allclose(freq, np.asarray(w / w.sum(1, keepdims=True)), atol=0.03)


def test_excluded_pairs_are_never_negatives():
    sim = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4)), jnp.float32)
    group = jnp.array([7, 7, 8, 9])
    w = np.asarray(blip.negative_weights(sim, group[:, None] == group[None, :]))
    assert w[0, 1] == 0 and w[1, 0] == 0 and np.all(np.diag(w) == 0) and np.all(w[2, [0, 1, 3]] > 0)
    alone = np.asarray(blip.negative_weights(sim, jnp.ones((4, 4), bool)))  # nothing left: any other
    assert np.all(np.diag(alone) == 0) and np.all(alone[~np.eye(4, dtype=bool)] > 0)


def test_attribute_id_names_the_main_object():
    from fmjax.data.text_ops import attribute_id
    op = attribute_id()
    ex = lambda s, c, z: {"shapes": np.array([s, 1, -1]), "colors": np.array([c, 2, -1]),  # noqa: E731
                          "sizes": np.array([z, 0, -1])}
    ids = [int(op(ex(*a), None)["group"]) for a in ((1, 2, 0), (1, 2, 0), (1, 2, 1), (2, 1, 0))]
    assert ids[0] == ids[1] and len(set(ids[1:])) == 3
    with pytest.raises(KeyError, match="colors"):
        op({"shapes": np.array([1])}, None)


def test_objective_hooks_queue_and_momentum(tiny_config):
    c = tiny_config("blip")
    obj = make_objective(c)
    assert {"image_text", "captioning", "image_text_matching"} <= capabilities(obj.model)
    for hook in ("caption", "match_scores", "text_features", "features", "project_params"):
        assert supports(obj, hook), hook
    assert not supports(obj, "embed")
    g = np.random.default_rng(0)
    batch = {"image": jnp.asarray(g.normal(size=(16, 32, 32, 3)), jnp.float32),
             "tokens": jnp.asarray(np.pad(g.integers(3, 100, (16, 6)), ((0, 0), (1, 3)),
                                          constant_values=((1, 0), (1, 0))), jnp.int32),
             "group": jnp.arange(16, dtype=jnp.int32) % 5}
    assert obj.batch_keys == ("image", "tokens", "group")
    params, extra = nn.unbox(obj.init(jax.random.PRNGKey(0), batch))
    assert extra["image_queue"].shape == (32, 16) and "dec_attn" not in str(
        jax.tree_util.tree_structure(extra["momentum"]))
    params = dict(params, vision_proj=jax.tree.map(lambda x: x + 1.0, params["vision_proj"]))
    loss, (metrics, new) = jax.jit(obj.loss)(params, extra, batch, jax.random.PRNGKey(1), 0)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(metrics["ita_loss"] + metrics["itm_loss"]
                                                  + metrics["lm_loss"]), rtol=1e-6)
    m = obj.momentum
    np.testing.assert_allclose(new["momentum"]["vision_proj"]["bias"],
                               m * extra["momentum"]["vision_proj"]["bias"]
                               + (1 - m) * params["vision_proj"]["bias"], rtol=1e-6)
    assert int(new["queue_ptr"]) == 16
    np.testing.assert_allclose(new["image_queue"][16:], extra["image_queue"][16:])
    np.testing.assert_allclose(np.linalg.norm(new["text_queue"][:16], axis=1), 1.0, rtol=1e-5)
    clamped = obj.project_params(dict(params, temp=jnp.float32(0.9)), 0)
    assert float(clamped["temp"]) == 0.5


@pytest.mark.parametrize("overrides, match", [
    ({"objective.queue_size": 20}, "multiple of batch_size"),
    ({"model.vocab_size": 2048}, r"\[ENC\]/\[DEC\]"),
    ({"objective.alpha": 1.5}, "alpha"),
    ({"model.vocab_size": 1000}, "vocab_size"),
])
def test_config_errors_are_one_line(tiny_config, overrides, match):
    c = tiny_config("blip", **overrides)
    with pytest.raises(ConfigError, match=match) as e:
        validate.check(c, make_objective(c), make_mesh(c.mesh, ONE_DEVICE), evals=False)
    assert "\n" not in str(e.value)


class _FakeObjective:
    """features = a one-hot of the label; match_scores = 1 for caption == image id else 0."""

    def features(self, params, extra, images):
        return images[:, 0, 0, :4]

    def text_features(self, params, extra, tokens):
        return jax.nn.one_hot(tokens[:, 1], 4)

    def match_scores(self, params, extra, images, tokens):
        return (images[:, 0, 0, 4] == tokens[:, 0]).astype(jnp.float32)


def test_itm_pairs_take_negatives_of_another_label():
    labels = jnp.array([0, 0, 1, 2, 1, 3])
    ids = jnp.arange(6)
    images = jnp.zeros((6, 2, 2, 5)).at[:, 0, 0, :4].set(jax.nn.one_hot(labels, 4))
    images = images.at[:, 0, 0, 4].set(ids)
    tokens = jnp.stack([ids, (labels + 1) % 4], 1)   # text "looks like" the next label
    valid = jnp.array([True] * 5 + [False])
    pos, neg, hard, has = itm.match_pairs(_FakeObjective(), None, None, images, tokens, labels, valid)
    assert np.all(np.asarray(pos) == 1) and np.all(np.asarray(neg) == 0) and np.all(np.asarray(hard) == 0)
    assert np.all(np.asarray(has))


def test_interrupted_and_resumed_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    """3 steps, stop, resume to 6 == 6 straight (the queues and momentum model included)."""
    c = tiny_config("blip")
    c.checkpoint_every = 4
    testing.resume_drill(c, tmp_path, monkeypatch, n=3, devices=ONE_DEVICE,
                         keys=("train/loss", "train/ita_loss", "train/itm_loss", "train/lm_loss"))
