"""The 'flamingo' objective, fmjax.models.flamingo.Flamingo (and its LLaVA projection), the
'vqa_pairs' op, packing (fmjax.objectives.lm.pack_rows, the 'lm' objective's ``pack``) and the
'vqa' few-shot eval: sequences built as documented, the frozen LM exactly unchanged at init,
greedy decoding against a plain loop, one-line config errors, and an exact resume."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import testing
from fmjax.data import shapes
from fmjax.data.text_ops import vqa_pairs
from fmjax.data.tokenizer import get_tokenizer
from fmjax.errors import ConfigError
from fmjax.evals import vqa
from fmjax.models.decoder import Decoder
from fmjax.models.flamingo import Flamingo
from fmjax.objectives import flamingo, lm
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import make_mesh
from fmjax.train import validate

ONE_DEVICE = jax.devices()[:1]
VISION = dict(name="vit", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
              class_token=True, pool="cls", num_classes=0)
LM = dict(vocab_size=2048, max_length=128, width=32, depth=2, num_heads=2, mlp_dim=64)


def _examples(n, split="train"):
    op = vqa_pairs(16, "words", 2048)
    exs = [op(shapes.generate_example(i, split, 16), None) for i in range(n)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in ("qa_tokens", "qa_len", "qa_prompt_len")}
    batch["image"] = jnp.asarray(np.stack([e["image"] for e in exs]), jnp.float32) / 255.0
    return exs, batch


def test_pack_rows_against_a_loop():
    g = np.random.default_rng(0)
    chunks = g.integers(1, 50, (3, 4, 6))
    lengths = g.integers(0, 7, (3, 4))
    packed, valid, starts, dropped = lm.pack_rows(jnp.asarray(chunks), jnp.asarray(lengths), 14)
    for n in range(3):
        want = [t for k in range(4) for t in chunks[n, k, :lengths[n, k]]]
        assert list(np.asarray(packed[n][valid[n]])) == want[:14]
        assert int(dropped[n]) == max(len(want) - 14, 0)
        assert np.all(np.asarray(packed[n][~valid[n]]) == 0)
        assert list(np.asarray(starts[n])) == list(np.cumsum(lengths[n]) - lengths[n])


def test_lm_pack_option_packs_captions_without_their_padding(tiny_config):
    c = tiny_config("gpt", **{"objective.pack": 4, "model.max_length": 128})
    obj = make_objective(c)
    tok = get_tokenizer("words", vocab_size=2048)
    caps = ["a red circle.", "a blue square next to a star.", "two shapes.", "a ring."] * 4
    tokens = jnp.asarray(tok(caps, 32))
    packed, mask, dropped = obj.packed(tokens)
    assert packed.shape == (4, 128) and int(dropped.sum()) == 0
    row = [t for r in np.asarray(tokens[:4]) for t in r[:list(r).index(tok.eot_token_id) + 1]]
    assert list(np.asarray(packed[0, :len(row)])) == row
    assert int(mask[0].sum()) == len(row) - 1
    c.objective.pack = 3
    with pytest.raises(ConfigError, match="pack=3 must be >= 1 and divide"):
        make_objective(c).check(c)


def test_vqa_pairs_answers_decode_and_prompt_lengths():
    tok = get_tokenizer("words", vocab_size=2048, vocabulary="shapes")
    op = vqa_pairs(16, "words", 2048)
    for i in range(6):
        ex = shapes.generate_example(i, "validation", 16)
        out = op(ex, None)
        shape, color, num = int(ex["shapes"][0]), int(ex["colors"][0]), int(ex["num_objects"])
        for k, kind in enumerate(shapes.VQA_KINDS):
            for s, style in enumerate(shapes.VQA_STYLES):
                row = out["qa_tokens"][k, s]
                n, p = out["qa_len"][k, s], out["qa_prompt_len"][k]
                assert row[n - 1] == tok.eot_token_id and np.all(row[n:] == 0)
                assert tok.decode(row[:p]) == shapes.VQA_QUESTIONS[kind]
                assert tok.decode(row[p:n]) == shapes.vqa_answer(kind, shape, color, num, style)
    with pytest.raises(KeyError, match="num_objects"):
        op({"shapes": np.zeros(3), "colors": np.zeros(3)}, None)
    assert shapes.vqa_answer("shape", 5, 0, 1, "sentence") == "it is a hexagon."
    assert shapes.vqa_answer("count", 0, 0, 1, "sentence") == "there is one."


def test_interleaved_sequences():
    exs, batch = _examples(10)
    seq = flamingo.interleave(jax.random.PRNGKey(3), batch["qa_tokens"], batch["qa_len"],
                              batch["qa_prompt_len"], 5, 80, 0, (0, 1, 2), (0, 1))
    tok = get_tokenizer("words", vocab_size=2048, vocabulary="shapes")
    answers = {shapes.vqa_answer(k, int(e["shapes"][0]), int(e["colors"][0]),
                                 int(e["num_objects"]), s)
               for e in exs for k in shapes.VQA_KINDS for s in shapes.VQA_STYLES}
    for n in range(2):
        toks, valid = np.asarray(seq["tokens"][n]), np.asarray(seq["valid"][n])
        img = np.flatnonzero((toks == 0) & valid)
        assert len(img) == 5 and img[0] == 0                        # five <image> chunks
        assert np.all(toks[img[1:] - 1] == tok.eot_token_id)       # each after an eot
        chunks = np.split(toks[:valid.sum()], img[1:])
        styles = set()
        for j, ch in enumerate(chunks):
            text = tok.decode(ch[1:])
            q = next(q for q in shapes.VQA_QUESTIONS.values() if text.startswith(q))
            ans = text[len(q):].strip()
            assert ans in answers
            styles.add(" " in ans)
            start = np.flatnonzero(np.asarray(seq["answer_start"][n]))[j]
            assert tok.decode([toks[start]]) == ans.split()[0]
            assert np.all(np.asarray(seq["chunk"][n])[img[j]:img[j] + len(ch)] == j)
        assert len(styles) == 1                                    # one style per sequence


def test_flamingo_is_the_frozen_lm_at_init_and_llava_replaces_placeholders():
    _, batch = _examples(4)
    images = batch["image"].reshape(2, 2, 16, 16, 3)
    tokens = jnp.array([[0, 5, 6, 7, 0, 8, 9, 10], [0, 11, 12, 0, 13, 14, 15, 16]])
    model = Flamingo(vision=VISION, lm=LM, image_token_id=0, xattn_heads=2, xattn_dim_head=8,
                     resampler_depth=1, resampler_heads=2, resampler_dim_head=8, num_latents=3)
    params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
    assert set(params) == {"vision", "resampler", "lm"} and "gated_0" in params["lm"]
    plain = {k: v for k, v in params["lm"].items() if not k.startswith("gated_")}
    want = Decoder(**LM).apply({"params": plain}, tokens)["logits"]
    got = model.apply({"params": params}, images, tokens)["logits"]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # LLaVA: 4 tokens per 16x16 image (patch 8) + cls = 5 placeholders per image
    llava = Flamingo(vision=VISION, lm=LM, image_token_id=0, projection="mlp")
    tokens = jnp.array([[0] * 5 + [5, 6] + [0] * 5 + [7]])
    p = nn.meta.unbox(llava.init(jax.random.PRNGKey(1), images[:1], tokens)["params"])
    assert set(p) == {"vision", "projector", "lm"} and not any(k.startswith("gated") for k in p["lm"])
    media = llava.apply({"params": p}, images[:1], method="encode_media")
    assert media.shape == (1, 10, 32)
    embeds = {}

    def grab(mdl, x, *a, **k):  # the embeddings the first block sees
        embeds.setdefault("x", x)
        return mdl(x, *a, **k)
    with nn.intercept_methods(lambda f, args, kwargs, ctx: grab(f, *args, **kwargs)
                              if ctx.module.scope.path == ("lm", "block_0") and ctx.method_name == "__call__"
                              else f(*args, **kwargs)):
        llava.apply({"params": p}, images[:1], tokens)
    pos = p["lm"]["pos_embed"][:13]
    np.testing.assert_allclose(embeds["x"][0, :5], media[0, :5] + pos[:5], atol=1e-5)
    np.testing.assert_allclose(embeds["x"][0, 7:12], media[0, 5:] + pos[7:12], atol=1e-5)
    np.testing.assert_allclose(embeds["x"][0, 5], p["lm"]["token_embed"]["embedding"][5] + pos[5], atol=1e-5)


def test_greedy_equals_a_token_by_token_loop(tiny_config):
    c = tiny_config("flamingo")
    obj = make_objective(c)
    _, batch = _examples(20)
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    params = jax.tree.map(lambda x: x + 0.3 if x.shape == (1,) else x, params)  # open the gates
    images = batch["image"][:6].reshape(3, 2, 16, 16, 3)
    prompts = [[0, 2046, 775, 351, 0, 2046, 775], [0, 2046, 1592, 0, 2046], [0, 2046, 7, 8, 9, 0, 2046]]
    toks = np.zeros((3, 16), np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        toks[r, :len(p)] = p
    got = np.asarray(jax.jit(vqa.greedy, static_argnums=(0, 6))(
        obj, params, extra, images, jnp.asarray(toks), jnp.asarray(lens), 2))
    encode = jax.jit(obj.encode_media)
    logits_fn = jax.jit(lambda media, t: obj.interleaved_logits(params, extra, media, t, jnp.ones_like(t, bool)))
    for r, p in enumerate(prompts):
        seq = list(p)
        media = encode(params, extra, images[r:r + 1])
        for _ in range(2):
            seq.append(int(jnp.argmax(logits_fn(media, jnp.asarray([seq]))[0, -1])))
        assert list(got[r, :len(seq)]) == seq


def test_build_prompts_shots_then_the_query_question():
    exs, batch = _examples(6)
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    idx, kinds = np.array([[3, 4], [5, 3]]), np.array([[0, 2], [1, 1]])
    query = {k: v[:2] for k, v in arrays.items()}
    images, prompts, answers = vqa.build_prompts(query, arrays, idx, kinds, 1, 0, 2, 0)
    assert images.shape == (2, 3, 16, 16, 3)
    np.testing.assert_array_equal(images[0, 1], arrays["image"][4])
    tok = get_tokenizer("words", vocab_size=2048, vocabulary="shapes")
    cuts = [i for i, t in enumerate(prompts[0]) if t == 0] + [len(prompts[0])]
    chunks = [tok.decode(prompts[0][a + 1:b]) for a, b in zip(cuts, cuts[1:])]
    assert chunks == ["what shape is it? " + shapes.CLASS_NAMES[int(exs[3]["shapes"][0])],
                      "how many shapes are there? " + ("one", "two", "three")[int(exs[4]["num_objects"]) - 1],
                      "what colour is it?"]
    assert tok.decode(answers[0]) == shapes.COLOR_NAMES[int(exs[0]["colors"][0])]
    assert answers[0][-1] == tok.eot_token_id


@pytest.mark.parametrize("overrides, match", [
    ({"objective.shots_per_sequence": 3}, "shots_per_sequence=3 must be >= 1 and divide"),
    ({"objective.kinds": ("size",)}, r"objective.kinds=\('size',\); valid"),
    ({"objective.seq_length": 200}, "seq_length=200 exceeds the decoder's max_length=128"),
    ({"model.projection": "linear"}, "projection='linear'; valid"),
    ({"model.projection": "mlp"}, "media_tokens=1, but projection='mlp' takes 17 per image; set it to 17"),
    ({"evals": {"v": dict(type="vqa", shots=(-1,))}}, r"config.evals.v.shots=\(-1,\)"),
])
def test_config_errors_are_one_line(tiny_config, overrides, match):
    c = tiny_config("flamingo", **overrides)
    with pytest.raises(ConfigError, match=match) as e:
        validate.check(c, make_objective(c), make_mesh(c.mesh, ONE_DEVICE),
                       evals="evals" in overrides)
    assert "\n" not in str(e.value)


def test_interrupted_and_resumed_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    c = tiny_config("flamingo")
    c.checkpoint_every = 4
    testing.resume_drill(c, tmp_path, monkeypatch, n=3, devices=ONE_DEVICE,
                         keys=("train/loss", "train/answer_acc"))


def test_the_preset_freezes_the_whole_lm_and_vision_tower(tiny_config):
    """Only the resampler and the gated layers learn (the trajectory test found a pattern that
    missed the LM's ``pos_embed`` leaf)."""
    from fmjax.train import param_groups
    c = tiny_config("flamingo")
    obj = make_objective(c)
    _, batch = _examples(20)
    params = nn.meta.unbox(obj.init(jax.random.PRNGKey(0), batch)[0])
    groups = param_groups.parse(c.optimizer)
    learned = {p.split("/")[0] + ("/" + p.split("/")[1] if p.startswith("lm/") else "")
               for p in param_groups.paths(params) if not param_groups.is_frozen(groups, p)}
    assert learned == {"resampler", "lm/gated_0", "lm/gated_1"}, learned


def test_llava_projection_trains_through_placeholders(tiny_config):
    c = tiny_config("flamingo", **{"model.projection": "mlp", "objective.media_tokens": 17,
                                   "objective.seq_length": 128, "objective.shots_per_sequence": 2})
    obj = make_objective(c)
    obj.check(c)
    _, batch = _examples(4)
    batch["image"] = jax.image.resize(batch["image"], (4, 32, 32, 3), "linear")
    params, extra = obj.init(jax.random.PRNGKey(0), batch)
    grads = jax.jit(jax.grad(lambda p: obj.loss(p, extra, batch, jax.random.PRNGKey(1), 0)[0]))(params)
    seq = obj.sequences(jax.random.PRNGKey(1), batch)
    assert int((seq["tokens"][0] == 0).sum()) >= 2 * 17
    assert float(jnp.abs(nn.meta.unbox(grads)["projector"]["fc1"]["kernel"]).max()) > 0


def test_open_flamingo_converter_refuses_other_checkpoints():
    from fmjax.interop.open_flamingo import convert_open_flamingo
    with pytest.raises(ValueError, match="no perceiver"):
        convert_open_flamingo({"vision_encoder.proj": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="frame_embs"):
        convert_open_flamingo({"perceiver.frame_embs": np.zeros((2, 1, 4))})
    source = np.ones((5, 6), np.float32)
    got = convert_open_flamingo({"lang_encoder.gated_cross_attn_layers.3.attn.to_q.weight": np.ones((4, 2)),
                                 "lang_encoder.transformer.h.3.gated_cross_attn_layer.attn.to_q.weight": np.ones((4, 2)),
                                 "perceiver.layers.1.1.3.weight": source})
    assert got["lm"]["gated_3"]["attn"]["to_q"]["kernel"].shape == (2, 4)
    assert got["resampler"]["ff_1"]["fc2"]["kernel"].shape == (6, 5)
    source += 1.0   # the converted params are copies, not views an in-place update would reach
    assert float(got["resampler"]["ff_1"]["fc2"]["kernel"].max()) == 1.0
