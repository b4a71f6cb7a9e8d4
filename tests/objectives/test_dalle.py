"""DALL-E (fmjax.models.dalle, fmjax.objectives.dalle): the sparse attention masks, cached
sampling, the loss's pieces, config errors, a short run and the class-name generation eval."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ConfigError
from fmjax.models import generate
from fmjax.models.dalle import DalleTransformer, attention_pattern, layer_types, paper_attention_types
from fmjax.objectives.dalle import split_losses, with_unique_pads
from fmjax.train import loop

ONE_DEVICE = jax.devices()[:1]


# -- masks ------------------------------------------------------------------------------------------
def _brute(kind, n, g, q, k, kernel=3):
    """The module docstring's rule, position by position."""
    if k > q:
        return False
    if q < n:
        return True            # text: causal over text (k <= q < n)
    if k < n:
        return True            # image query: every text token
    (rq, cq), (rk, ck) = divmod(q - n, g), divmod(k - n, g)
    return {"full": True, "row": rq == rk, "column": cq == ck, "paper_row": q - k <= g,
            "conv": abs(rq - rk) <= kernel // 2 and abs(cq - ck) <= kernel // 2}[kind]


@pytest.mark.parametrize("kind", ["full", "row", "paper_row", "column", "conv"])
def test_attention_patterns_follow_the_rule(kind):
    n, g = 3, 4
    got = attention_pattern(kind, n, g)
    want = np.array([[_brute(kind, n, g, q, k) for k in range(n + g * g)] for q in range(n + g * g)])
    np.testing.assert_array_equal(got, want)
    assert got.diagonal().all()   # every token sees itself


def test_paper_row_is_the_raster_window_of_figure_11():
    """Figure 11 (a)'s example, 6 text tokens and a 4x4 grid: the 8th image token (the last of
    the second row) reads every text token, the 4th to the 8th image tokens (its row and the
    4th, the same column one row up) and nothing else; the 5th (first of the second row) reads
    the whole first row. The axial 'row' reads only the 5th to the 8th."""
    n, g = 6, 4
    paper, axial = attention_pattern("paper_row", n, g), attention_pattern("row", n, g)
    image = lambda i: n + i - 1   # the i-th image token (1-based) -> its position
    assert set(np.flatnonzero(paper[image(8)])) == set(range(n)) | {image(i) for i in range(4, 9)}
    assert set(np.flatnonzero(paper[image(5)])) == set(range(n)) | {image(i) for i in range(1, 6)}
    assert set(np.flatnonzero(axial[image(8)])) == set(range(n)) | {image(i) for i in range(5, 9)}


def test_layer_types_cycle_and_paper_pattern():
    assert layer_types(("row", "column"), 5) == ("row", "column", "row", "column", "row")
    assert paper_attention_types(6) == ("paper_row", "column", "paper_row", "paper_row", "paper_row", "conv")
    with pytest.raises(ValueError, match="'diagonal'"):
        layer_types(("row", "diagonal"), 2)


def _model(**kw):
    kw = dict(dict(text_vocab=20, image_vocab=16, text_length=4, image_grid=3, width=32, depth=2,
                   num_heads=2, mlp_dim=64), **kw)
    return DalleTransformer(**kw)


def test_a_row_layer_reads_only_its_row_and_the_text():
    """One 'row' layer: the output at an image position changes with a token of its row or the
    text, and not with a token of an earlier row."""
    m = _model(depth=1, attention_types=("row",))
    rng = np.random.default_rng(0)
    seq = jnp.asarray(rng.integers(0, 20, (1, m.max_length - 1)))
    params = m.init(jax.random.PRNGKey(0), seq)["params"]
    base = m.apply({"params": params}, seq)["logits"]
    n, g = 4, 3
    q = n + 1 * g + 2          # row 1, column 2 of the image (input position q)
    for k, moves in ((n + 0 * g + 2, False),   # row 0 (same column): not read
                     (n + 1 * g + 0, True),    # its own row
                     (1, True)):               # the text
        changed = seq.at[0, k].set((seq[0, k] + 7) % 20)
        out = m.apply({"params": params}, changed)["logits"]
        assert bool(jnp.any(jnp.abs(out[0, q] - base[0, q]) > 1e-6)) == moves, k
    # and the full model reads row 0 too
    m_full = _model(depth=1)
    params = m_full.init(jax.random.PRNGKey(0), seq)["params"]
    a = m_full.apply({"params": params}, seq)["logits"][0, q]
    b = m_full.apply({"params": params}, seq.at[0, n + 2].set((seq[0, n + 2] + 7) % 20))["logits"][0, q]
    assert jnp.any(jnp.abs(a - b) > 1e-6)


def test_logits_are_masked_to_the_vocabulary_each_position_predicts():
    m = _model()
    seq = jnp.zeros((2, m.max_length - 1), jnp.int32)
    logits = m.apply({"params": m.init(jax.random.PRNGKey(1), seq)["params"]}, seq)["logits"]
    text_pos, image_pos = logits[:, :m.text_length - 1], logits[:, m.text_length - 1:]
    assert (text_pos[..., 20:] <= -1e8).all() and (text_pos[..., :20] > -1e8).all()
    assert (image_pos[..., :20] <= -1e8).all() and (image_pos[..., 20:] > -1e8).all()


@pytest.mark.parametrize("types", [("full",), ("row", "column", "conv"), ("paper_row",)])
def test_cached_sampling_equals_recomputing_the_sequence(types):
    m = _model(depth=3, attention_types=types)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, 20, (2, 4)))
    params = m.init(jax.random.PRNGKey(3), jnp.zeros((1, m.max_length - 1), jnp.int32))["params"]
    cached = generate.sample(m, params, prompt, 9, greedy=True)
    seq = prompt
    for _ in range(9):
        nxt = jnp.argmax(m.apply({"params": params}, seq)["logits"][:, -1], -1)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
    np.testing.assert_array_equal(cached, seq)
    assert (cached[:, 4:] >= 20).all()        # image codes only after the text
    drawn = generate.sample(m, params, prompt, 9, jax.random.PRNGKey(0), top_k=8)
    assert (drawn[:, 4:] >= 20).all()


def test_guided_sampling_equals_recomputing_both_sequences():
    """Classifier-free guidance with the cache: each code is the argmax of
    uncond + s * (cond - uncond), the logits of the caption's and the empty caption's
    sequences recomputed in full, both continued with the same drawn codes."""
    m = _model(depth=2, attention_types=("row", "column"))
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.integers(0, 20, (2, 4)))
    empty = jnp.asarray(rng.integers(0, 20, (2, 4)))
    params = m.init(jax.random.PRNGKey(5), jnp.zeros((1, m.max_length - 1), jnp.int32))["params"]
    scale = 3.0
    guided = generate.sample(m, params, prompt, 7, greedy=True, guidance_scale=scale, uncond_prompt=empty)
    cond, uncond = prompt, empty
    for _ in range(7):
        lc = m.apply({"params": params}, cond)["logits"][:, -1]
        lu = m.apply({"params": params}, uncond)["logits"][:, -1]
        nxt = jnp.argmax(lu + scale * (lc - lu), -1)[:, None]
        cond, uncond = jnp.concatenate([cond, nxt], 1), jnp.concatenate([uncond, nxt], 1)
    np.testing.assert_array_equal(guided, cond)
    assert (guided[:, 4:] >= 20).all()
    plain = generate.sample(m, params, prompt, 7, greedy=True)
    assert not np.array_equal(guided, plain)   # the guidance changes the codes here
    np.testing.assert_array_equal(           # scale 1 is plain conditional sampling
        generate.sample(m, params, prompt, 7, greedy=True, guidance_scale=1.0, uncond_prompt=empty), plain)
    with pytest.raises(ValueError, match="needs uncond_prompt"):
        generate.sample(m, params, prompt, 7, greedy=True, guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond_prompt shape"):
        generate.sample(m, params, prompt, 7, greedy=True, guidance_scale=2.0, uncond_prompt=empty[:, :3])


# -- the objective's pieces -------------------------------------------------------------------------
def test_cpu_preset_text_vocabulary_keeps_every_shapes_word_apart():
    """The cpu preset's small 'words' vocabulary (for speed) must not merge two caption words."""
    from fmjax.data.tokenizer import WordHashTokenizer
    from fmjax.testing import load_config
    tok = load_config("dalle", "cpu").data.tokenize
    assert tok.tokenizer == "words"
    decoder = WordHashTokenizer(tok.vocab_size, vocabulary="shapes")   # raises on a shared bucket
    text = "a photo of a large purple heart on the left."
    assert decoder.decode(decoder([text], context_length=tok.context_length)[0]) == text


def test_unique_pads_replace_everything_after_eot():
    tokens = jnp.asarray([[9, 3, 4, 10, 0, 0], [9, 5, 10, 0, 0, 0]])
    out = with_unique_pads(tokens, eot_token_id=10, text_vocab_base=11)
    np.testing.assert_array_equal(out, [[9, 3, 4, 10, 15, 16], [9, 5, 10, 14, 15, 16]])


def test_split_losses_are_each_a_mean_over_their_own_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, (2, 7)))
    text, image, acc = split_losses(logits, targets, text_length=3)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(text, nll[:, :2].mean(), rtol=1e-6)
    np.testing.assert_allclose(image, nll[:, 2:].mean(), rtol=1e-6)
    np.testing.assert_allclose(acc, (np.asarray(logits).argmax(-1) == np.asarray(targets))[:, 2:].mean())


def test_loss_weights_text_and_image(shapes_data_dir, tiny_config):
    from fmjax.objectives.base import make_objective
    c = tiny_config("dalle")
    c.data.pp_train = c.data.pp_eval
    objective = make_objective(c)
    objective.check(c)
    from fmjax.data import sources, transforms
    src = sources.get_source(c.data.name, "validation", shapes_data_dir)
    tf = transforms.parse(c.data.pp_eval)
    r = np.random.default_rng(0)
    ex = [tf(src[i], r) for i in range(4)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ("image", "tokens")}
    params, extra = objective.init(jax.random.PRNGKey(0), batch)
    loss, (m, _) = objective.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
    np.testing.assert_allclose(loss, m["text_loss"] / 8 + 7 * m["image_loss"] / 8, rtol=1e-6)
    seq = objective.sequence(extra, batch)
    assert seq.shape == (4, 24 + 64)
    assert (seq[:, 24:] >= objective.model.text_vocab).all() and (seq[:, :24] < objective.model.text_vocab).all()
    # the same codes the dVAE gives
    module, _ = objective.tokenizer
    codes = module.apply({"params": extra["tokenizer"]}, batch["image"], method=type(module).tokens)
    np.testing.assert_array_equal(seq[:, 24:] - objective.model.text_vocab, codes.reshape(4, -1))


@pytest.mark.parametrize("override, message", [
    (dict(**{"objective.tokenizer": dict(workdir=None)}), "names no dVAE"),
    (dict(**{"model.attention_types": ("row", "diagonal")}), "diagonal"),
    (dict(**{"objective.text_loss_weight": 1.5}), "text_loss_weight"),
    (dict(**{"objective.sample": dict(temperature=0.0)}), r"config.objective.sample.temperature=0.0; it must be"),
    (dict(**{"objective.sample": dict(top_k=2.5)}), r"config.objective.sample.top_k=2.5; it must be an integer"),
    # a generation eval's sampler settings are checked before the run starts (they failed at the
    # first eval); before its classifier workdir
    (dict(evals=dict(gen=dict(type="generation", classifier_workdir="/nonexistent", guidance_scale=float("nan")))),
     r"evals.gen.*guidance_scale=nan; it must be a finite number"),
    (dict(evals=dict(gen=dict(type="generation", classifier_workdir="/nonexistent", top_p=0.0))),
     r"evals.gen.*top_p=0.0; it must be in \(0, 1\]"),
])
def test_config_errors_are_one_line_before_anything_is_written(tiny_config, tmp_path, override, message):
    c = tiny_config("dalle", **override)
    with pytest.raises(ConfigError, match=message) as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=ONE_DEVICE)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_images_must_be_in_unit_range(tiny_config, tmp_path):
    c = tiny_config("dalle")
    c.data.pp_train = c.data.pp_train.replace("normalize((0, 0, 0), (1, 1, 1))", "normalize('clip')")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=ONE_DEVICE)


def test_short_run_learns_and_the_generation_eval_prompts_class_names(tmp_path, tiny_config):
    """40 steps of a small default: the image-code NLL falls well below its start, the
    pictures are written, and the 'generation' eval prompts each class name and has a
    classifier score the samples (the number itself needs the cpu recipe)."""
    clf = str(tmp_path / "clf")
    loop.train_and_evaluate(tiny_config("supervised", total_steps=2, checkpoint_every=2), clf,
                            devices=ONE_DEVICE)
    steps = 40
    c = tiny_config("dalle", total_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=10)
    c.model.update(dict(width=64, depth=2, num_heads=2, mlp_dim=128))
    c.batch_size, c.eval_at_start, c.optimizer.warmup_steps = 32, True, 5
    c.evals = dict(val=dict(type="metrics", split="validation", examples=64),
                   images=dict(type="images", split="validation"),
                   gen=dict(type="generation", classifier_workdir=clf, samples_per_class=2, examples=32,
                            every=steps, prompt="a picture showing a {}.", top_k=64))
    final = loop.train_and_evaluate(c, str(tmp_path / "run"), devices=ONE_DEVICE)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    start = [r for r in rows if r["step"] == 0 and "eval/val_image_nll" in r][0]["eval/val_image_nll"]
    end = final["eval/val_image_nll"]
    print(f"dalle image-code NLL {start:.3f} -> {end:.3f}; generation accuracy {final['eval/gen_accuracy']:.3f}")
    assert end < 0.7 * start            # measured 6.38 -> 3.50
    assert 0.0 <= final["eval/gen_classifier_recon_accuracy"] <= 1.0
    assert 0.0 <= final["eval/gen_accuracy"] <= 1.0 and len(
        [k for k in final if k.startswith("eval/gen_accuracy_")]) == 8
    assert any(n.startswith("images_samples") for n in os.listdir(tmp_path / "run" / "images"))


def test_eval_of_a_run_whose_tokenizer_is_a_dvae_workdir(tmp_path, tiny_config):
    """launch/eval.py (evaluate_checkpoint) on a DALL-E run whose frozen tokenizer is a trained
    dVAE workdir: the objective loads it lazily, first inside the abstract init, where its
    restore once failed ('make_array_from_single_device_arrays requires ... concrete arrays')."""
    from fmjax.train.eval_only import evaluate_checkpoint
    tok, run = str(tmp_path / "dvae"), str(tmp_path / "dalle")
    d = tiny_config("dvae", total_steps=2, checkpoint_every=2)
    d.model = dict(name="dvae", group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32, n_init=8,
                   output="logit_laplace")
    loop.train_and_evaluate(d, tok, devices=ONE_DEVICE)
    c = tiny_config("dalle", total_steps=2, checkpoint_every=2)
    c.objective.tokenizer = dict(workdir=tok)
    c.evals = dict(val=dict(type="metrics", split="validation", examples=32))
    loop.train_and_evaluate(c, run, devices=ONE_DEVICE)
    metrics = evaluate_checkpoint(run)
    assert np.isfinite(metrics["eval/val_image_nll"]) and metrics["eval/val_image_nll"] > 0


def test_sampling_a_workdir_with_clip_reranking(tmp_path, tiny_config):
    """fmjax.train.sample (launch/sample.py) serves a DALL-E workdir: prompts, the
    autoregressive sampler's settings, CLIP re-ranking (the best of rerank_from per prompt,
    best first); bad settings are one-line errors before anything is restored."""
    from fmjax.train.sample import sample_checkpoint
    run, clip = str(tmp_path / "dalle"), str(tmp_path / "clip")
    loop.train_and_evaluate(tiny_config("dalle", total_steps=2), run, devices=ONE_DEVICE)
    loop.train_and_evaluate(tiny_config("clip", total_steps=2, checkpoint_every=2), clip, devices=ONE_DEVICE)
    out = sample_checkpoint(run, prompts="a red circle.;a blue square.", num_per_class=2, batch_size=8,
                            temperature=0.9, top_k=16, guidance_scale=2.0, rerank_workdir=clip, rerank_from=4,
                            devices=ONE_DEVICE)
    assert out["images"].shape == (4, 32, 32, 3) and out["images"].dtype == np.uint8
    m = out["metrics"]
    assert -1.0 <= m["clip_score_mean"] <= m["clip_score_best"] <= 1.0
    assert all(os.path.isfile(p) for p in out["paths"]) and len(out["paths"]) == 3

    def error(**kw):
        with pytest.raises(ConfigError) as e:
            sample_checkpoint(run, devices=ONE_DEVICE, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "--num_steps: not a setting of 'dalle'" in error(num_steps=3)
    assert "--temperature=0" in error(temperature=0.0)
    assert "--top_p=2" in error(top_p=2.0)
    assert "--guidance_scale=inf" in error(guidance_scale=float("inf"))
    assert "--rerank_from=1 must be >= --num_per_class=2" in error(rerank_workdir=clip, rerank_from=1, num_per_class=2)
    assert "trained objective 'dalle'" in error(rerank_workdir=run)
    assert "no config.json" in error(rerank_workdir=str(tmp_path / "nowhere"))
