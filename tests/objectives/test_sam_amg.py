"""SAM's automatic mask generation (fmjax/models/sam/amg.py), the ``amg_recall`` eval
(fmjax/evals/amg_recall.py) and ``launch/segment.py`` (fmjax/train/segment.py)."""
import contextlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from fmjax.errors import ConfigError
from fmjax.evals import amg_recall
from fmjax.models.sam import amg
from fmjax.testing import assert_one_line_error, load_config, run_cli

RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords"}


# -- the pieces ---------------------------------------------------------------------------------
def test_stability_score_on_hand_made_logits():
    logits = np.array([[[3.0, 0.5, -0.5],
                        [1.5, -2.0, 0.9],
                        [-1.5, 2.0, 0.0]],
                       np.full((3, 3), -4.0)], np.float32)
    # > +1: 3.0, 1.5, 2.0 (3 pixels); > -1: all but -2.0 and -1.5 (7 pixels)
    np.testing.assert_allclose(amg.stability_score(logits), [3 / 7, 0.0], rtol=1e-6)
    np.testing.assert_allclose(amg.stability_score(jnp.asarray(logits)), [3 / 7, 0.0], rtol=1e-6)
    # offset 0.25 around threshold 0.5: > 0.75 {3, 1.5, 0.9, 2} / > 0.25 {3, .5, 1.5, .9, 2}
    np.testing.assert_allclose(amg.stability_score(logits[:1], 0.5, 0.25), [4 / 5], rtol=1e-6)
    assert amg.stability_score(np.full((1, 2, 2), 5.0))[0] == 1.0


def test_boxes_grid_and_nms_on_hand_made_boxes():
    m = np.zeros((3, 6, 8), bool)
    m[0, 1:3, 2:7] = True
    m[1, 4, 0] = True
    np.testing.assert_array_equal(amg.masks_to_boxes(m), [[2, 1, 6, 2], [0, 4, 0, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(amg.masks_to_boxes(jnp.asarray(m))), amg.masks_to_boxes(m))
    np.testing.assert_allclose(amg.build_point_grid(2), [[.25, .25], [.75, .25], [.25, .75], [.75, .75]])

    boxes = np.array([[0, 0, 10, 10],     # score .9: kept
                      [1, 1, 11, 11],     # IoU 81/119 = .68 with box 0
                      [20, 20, 30, 30],   # disjoint: kept
                      [0, 0, 10, 5],      # IoU .5 with box 0
                      [0, 0, 10, 10]], float)   # a duplicate of box 0 with a lower score
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.85])
    np.testing.assert_allclose(amg.box_iou(boxes[:2], boxes[1:2]), [[81 / 119], [1.0]])
    assert amg.nms(boxes, scores, 0.7).tolist() == [0, 1, 3, 2]
    assert amg.nms(boxes, scores, 0.6).tolist() == [0, 3, 2]
    assert amg.nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert amg.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    pts, lab = amg.pad_prompt(np.ones((2, 1, 2)), np.ones((2, 1)), 3)
    assert pts.shape == (2, 3, 2) and lab.tolist() == [[1, -10, -10]] * 2


# -- AMG with a fake SAM whose masks are the regions of a label map, and with a tiny real one ---
class LabelMapSam(nn.Module):
    """A stand-in for SAM: the "embedding" is the image's channel 0 (an instance label map);
    a point prompt gives the region of its label (logits +-10: stable; with ``empty`` no
    region). Of the three masks, mask 0 is that region (IoU 0.95), mask 1 the same region with
    logits +-0.5 (IoU 0.9, stability 0) and mask 2 the region again (IoU 0.5)."""
    empty: bool = False

    def encode_image(self, images):
        return images[..., :1]

    def predict(self, emb, points, labels=None, boxes=None, masks=None, multimask_output=True):
        b, h, w = emb.shape[:3]
        xy = jnp.clip(jnp.floor(points[:, :, 0]).astype(jnp.int32), 0, jnp.array([w - 1, h - 1]))
        label = jax.vmap(lambda e, p: e[p[:, 1], p[:, 0], 0])(emb, xy)              # (B, P)
        region = (emb[:, None, :, :, 0] == label[..., None, None]) & (label[..., None, None] > 0)
        if self.empty:
            region = jnp.zeros_like(region)
        sign = jnp.where(region, 1.0, -1.0)[:, :, None]
        logits = sign * jnp.array([10.0, 0.5, 10.0])[:, None, None]
        iou = jnp.broadcast_to(jnp.array([0.95, 0.9, 0.5]), label.shape + (3,))
        return (logits, iou) if multimask_output else (logits[:, :, :1], iou[:, :, :1])


def _scene():
    """Two 16x16 images: channel 0 is the label map of their instances; masks (2, 3, 16, 16)."""
    masks = np.zeros((2, 3, 16, 16), np.uint8)
    masks[0, 0, 1:6, 1:9] = 1
    masks[0, 1, 9:15, 3:13] = 1
    masks[0, 2, 0:4, 12:16] = 1          # beyond num_objects (2): not counted
    masks[1, 0, 4:12, 4:12] = 1          # masks[1, 1] is empty (an occluded instance): not counted
    images = np.zeros((2, 16, 16, 3), np.float32)
    for b in range(2):
        for k in range(2):
            images[b, ..., 0] += (k + 1) * masks[b, k]
    return dict(image=images, masks=masks, num_objects=np.array([2, 2], np.int32))


def test_overlay_masks_blends_and_outlines_in_each_masks_colour():
    """Palette colours by default, the caller's with ``colours`` (box_ap's instance colours):
    boundary pixels in the colour, the inside blended, pixels outside untouched."""
    image = np.full((8, 8, 3), 100, np.uint8)
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    for colours, want in ((None, amg.PALETTE[0]), ([(10, 20, 30)], np.array([10, 20, 30]))):
        out = amg.overlay_masks(image, [m], 0.5, colours=colours)
        np.testing.assert_array_equal(out[2, 2], want)                            # boundary
        np.testing.assert_array_equal(out[3, 3], np.round(0.5 * 100 + 0.5 * want.astype(float)))
        np.testing.assert_array_equal(out[0, 0], image[0, 0])                     # outside


def test_amg_with_a_label_map_model_finds_each_region_once_and_filters():
    scene = _scene()
    model = LabelMapSam()
    gen = amg.AutomaticMaskGenerator(model, points_per_side=8, points_per_batch=24,
                                     pred_iou_thresh=0.7, stability_score_thresh=0.8)
    records = gen.generate({}, scene["image"][0])
    assert len(records) == 2   # every point in a region gives the same mask: NMS keeps one
    for r in records:
        assert set(r) == RECORD_KEYS and r["segmentation"].dtype == bool
        assert r["predicted_iou"] == pytest.approx(0.95) and r["stability_score"] == 1.0
        assert r["area"] == int(r["segmentation"].sum())
    found = sorted(r["area"] for r in records)
    assert found == sorted([40, 60])
    big = next(r for r in records if r["area"] == 60)
    np.testing.assert_array_equal(big["segmentation"], scene["masks"][0, 1] > 0)
    assert big["bbox"] == [3, 9, 9, 5]                   # x, y, x1 - x0, y1 - y0
    x, y = big["point_coords"][0]
    assert 3 <= x < 13 and 9 <= y < 15
    # the filters: no threshold keeps mask 1 (unstable) too; a threshold of 1.0 keeps nothing
    loose = amg.AutomaticMaskGenerator(model, points_per_side=8, pred_iou_thresh=0.0,
                                       stability_score_thresh=0.0, box_nms_thresh=1.0).generate({}, scene["image"][0])
    assert {round(r["predicted_iou"], 2) for r in loose} == {0.95, 0.9, 0.5}
    for kw in (dict(pred_iou_thresh=1.0), dict(stability_score_thresh=1.0, pred_iou_thresh=0.92)):
        kw = dict(dict(pred_iou_thresh=0.0, stability_score_thresh=0.0), **kw)
        out = amg.AutomaticMaskGenerator(model, points_per_side=8, **kw).generate({}, scene["image"][0])
        assert (out == []) == (kw["pred_iou_thresh"] == 1.0), kw
    assert amg.AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=1.0).generate(
        {}, scene["image"][0]) == []
    # masks at another output size: upsampled, points scaled
    r = amg.AutomaticMaskGenerator(model, points_per_side=8).generate({}, scene["image"][0], (32, 48))
    assert r[0]["segmentation"].shape == (32, 48)


def _sam_config():
    c = load_config("sam")
    c.model.update(dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), prompt_dim=32,
                        decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32))
    return c


def test_amg_end_to_end_with_a_tiny_sam():
    from fmjax.objectives.base import make_objective
    objective = make_objective(_sam_config())
    model, params_of, slots = objective.sam_model()
    assert slots == 4   # 1 box-or-point + 2 correction rounds + 1 (the default preset's layout)
    params = nn.unbox(params_of(objective.init(jax.random.PRNGKey(0), None)[0], {}))
    # predicted IoUs mostly above 0 (thresholds <= 0 filter nothing, as segment-anything's)
    head = params["mask_decoder"]["iou_prediction_head"]["proj_out"]
    head["bias"] = head["bias"] + 2.0
    image = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (64, 64, 3)))
    gen = amg.AutomaticMaskGenerator(model, points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0, box_nms_thresh=1.0, point_slots=slots)
    records = gen.generate(params, image)
    assert 0 < len(records) <= 16 * 3
    ious = [r["predicted_iou"] for r in records]
    assert ious == sorted(ious, reverse=True)
    for r in records:
        assert set(r) == RECORD_KEYS and r["segmentation"].shape == (64, 64) and r["area"] > 0
        x, y, w, h = r["bbox"]
        ys, xs = np.nonzero(r["segmentation"])
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())
    # a threshold keeps exactly the records above it; 1.0 on the stability score: only masks that
    # do not change between logits > -1 and > +1
    t = float(np.median(ious))
    kept = amg.AutomaticMaskGenerator(model, points_per_side=4, points_per_batch=6, pred_iou_thresh=t,
                                      stability_score_thresh=0.0, box_nms_thresh=1.0,
                                      point_slots=slots).generate(params, image)
    assert sorted(r["predicted_iou"] for r in kept) == sorted(i for i in ious if i > t)
    stable = amg.AutomaticMaskGenerator(model, points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0,
                                        stability_score_thresh=1.0, point_slots=slots).generate(params, image)
    assert all(r["stability_score"] == 1.0 for r in stable)


# -- the amg_recall eval ------------------------------------------------------------------------
class FakeObjective:
    def __init__(self, empty: bool):
        self.model = LabelMapSam(empty=empty)

    def sam_model(self):
        return self.model, (lambda params, extra: params), 0


class FakeWriter:
    def __init__(self):
        self.images = {}

    def write_image(self, step, name, image):
        self.images[name] = image


def _evaluator(objective, **entry):
    from fmjax.evals import common
    config = ml_collections.ConfigDict(dict(
        batch_size=2, objective=dict(name="fake"),
        data=dict(name="fmjax_shapes/64", pp_eval="normalize('imagenet')|keep('image', 'masks', 'num_objects')")))
    ev = dict(type="amg_recall", points_per_side=8, **entry)
    amg_recall.AmgRecallEvaluator.check("amg", ev, config, objective, None)
    ctx = common.Context(config, objective, None, None)
    ctx.scope = contextlib.nullcontext
    evaluator = amg_recall.AmgRecallEvaluator("amg", ev, ctx)
    scene = _scene()
    evaluator.batches = lambda: iter([(scene, np.array([True, True]))])
    return evaluator


@pytest.mark.parametrize("empty", [False, True])
def test_amg_recall_is_one_for_ground_truth_masks_and_zero_for_none(empty):
    evaluator = _evaluator(FakeObjective(empty))
    state = type("State", (), dict(params={}, extra={}))()
    writer = FakeWriter()
    out = evaluator.run(state, 7, writer)
    assert out["instances"] == 3.0   # 2 + 1: padding and the empty instance are not counted
    assert out["recall@0.5"] == (0.0 if empty else 1.0)
    assert out["best_iou"] == (0.0 if empty else 1.0)
    assert out["masks_per_image"] == (0.0 if empty else 1.5)
    assert out["precision@0.5"] == (0.0 if empty else 1.0)   # every generated mask is an instance
    pic = writer.images["amg_masks"]
    assert pic.dtype == np.uint8 and pic.shape == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2, 3)


def test_amg_recall_config_errors_are_one_line():
    from fmjax.objectives.base import make_objective
    config = _sam_config()
    objective = make_objective(config)
    check = lambda **ev: amg_recall.AmgRecallEvaluator.check("amg", dict(type="amg_recall", **ev),  # noqa: E731
                                                              config, objective, None)
    check(points_per_side=4, pred_iou_thresh=0.5, match_iou=0.75)
    for ev, text in ((dict(points_per_side=0), "points_per_side=0"), (dict(pred_iou_thresh=1.5), "in [0, 1]"),
                     (dict(match_iou=0.0), "(0, 1]"), (dict(stability_score_offset=-1.0), "> 0"),
                     (dict(min_area=3), "unknown key")):
        with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("(", r"\(")) as e:
            check(**ev)
        assert "\n" not in str(e.value)
    mae = load_config("mae")
    with pytest.raises(ConfigError, match="no promptable SAM model"):
        amg_recall.AmgRecallEvaluator.check("amg", dict(type="amg_recall"), mae, make_objective(mae), None)


# -- launch/segment.py --------------------------------------------------------------------------
_TRAINED = {}


@pytest.fixture
def sam_workdir(tiny_config, tmp_path_factory):
    """A SAM workdir trained for 3 steps (once), with an amg_recall eval at its last step."""
    if not _TRAINED:
        from fmjax.train import loop
        root = tmp_path_factory.mktemp("sam")
        c = tiny_config("sam", total_steps=3, checkpoint_every=3, batch_size=8)
        c.model.update(dict(global_attn_indexes=(1,), prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64,
                            iou_head_hidden_dim=32))
        c.evals = dict(amg=dict(type="amg_recall", every=3, examples=4, batch_size=4, points_per_side=4))
        loop.train_and_evaluate(c, str(root / "run"), devices=jax.devices()[:1])
        _TRAINED["run"] = str(root / "run")
        lines = [json.loads(x) for x in open(os.path.join(_TRAINED["run"], "metrics.jsonl"))]
        _TRAINED["metrics"] = {k: v for x in lines for k, v in x.items()}
    return _TRAINED["run"]


@pytest.fixture
def picture(tmp_path):
    """A 96x80 picture: a red disc and a blue square on grey."""
    im = np.full((80, 96, 3), 128, np.uint8)
    yy, xx = np.mgrid[:80, :96]
    im[(yy - 25) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (220, 30, 30)
    im[45:70, 55:85] = (30, 30, 220)
    path = str(tmp_path / "scene.png")
    Image.fromarray(im).save(path)
    return path


def test_training_logs_amg_recall(sam_workdir):
    m = _TRAINED["metrics"]
    assert 0.0 <= m["eval/amg_recall@0.5"] <= 1.0 and m["eval/amg_instances"] > 0
    assert 0.0 <= m["eval/amg_precision@0.5"] <= 1.0
    assert m["eval/amg_masks_per_image"] >= 0
    assert any(f.startswith("amg_masks_") for f in os.listdir(os.path.join(sam_workdir, "images")))


def test_segment_cli_points_and_auto(sam_workdir, picture, tmp_path):
    out = str(tmp_path / "points.png")
    proc = run_cli("segment", f"--workdir={sam_workdir}", f"--image={picture}", "--points=30,25;80,10",
                   "--labels=1,0", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("mask 0: score=") and "bbox=" in lines[0] and len(lines) == 2
    assert Image.open(out).size == (96 * 3, 80 * 3)   # enlarged by an integer factor to >= 256 px
    proc = run_cli("segment", f"--workdir={sam_workdir}", f"--image={picture}", "--auto",
                   "--points_per_side=4", "--pred_iou_thresh=0", "--stability_score_thresh=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(sam_workdir, "images", "segment_scene.png"))
    assert proc.stdout.strip().splitlines()[-1].endswith("segment_scene.png")


def test_segment_library_boxes_and_bad_input(sam_workdir, picture, tmp_path):
    from fmjax.train.segment import segment_image
    out = segment_image(sam_workdir, picture, boxes="15,10,45,40;55,45,84,69", out=str(tmp_path / "b.png"))
    assert len(out["masks"]) == 2 and out["step"] == 3
    assert out["masks"][0]["segmentation"].shape == (80, 96) and os.path.isfile(out["path"])
    for kwargs, text in (
            (dict(points="1,2,3"), "is not 2 comma-separated numbers"),
            (dict(points="1,2;3,4", labels="1"), "one label per point (2)"),
            (dict(points="1,2", auto=True), "--points and --auto together"),
            (dict(), "give one of --points"),
            (dict(points="100,2"), "must lie in the image"),
            (dict(boxes="10,10,5,20"), "x1 < x0"),
            (dict(points="1,2", points_per_side=4), "go with --auto"),
            (dict(auto=True, pred_iou_thresh=2.0), "--pred_iou_thresh=2.0")):
        with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
            segment_image(sam_workdir, picture, **{"points": None, **kwargs})
    with pytest.raises(ConfigError, match="cannot read it as an image"):
        bad = tmp_path / "bad.png"
        bad.write_text("not a png")
        segment_image(sam_workdir, str(bad), points="1,2")


def test_segment_cli_bad_input_is_one_line(sam_workdir, picture, tmp_path):
    mae = tmp_path / "mae"
    mae.mkdir()
    (mae / "config.json").write_text(load_config("mae").to_json())
    for args, text in (([f"--workdir={tmp_path / 'none'}", f"--image={picture}", "--auto"], "no such directory"),
                       ([f"--workdir={sam_workdir}", f"--image={tmp_path / 'none.png'}", "--auto"], "no such file"),
                       ([f"--workdir={sam_workdir}", f"--image={picture}", "--points=3;4"], "comma-separated"),
                       ([f"--workdir={mae}", f"--image={picture}", "--auto"], "needs a SAM workdir")):
        assert_one_line_error(run_cli("segment", *args), text)


@pytest.fixture
def owl_workdir(tiny_config, sam_workdir, tmp_path_factory):
    """A 3-step open-vocabulary detector (configs/owl.py, tiny; trained once) whose box_ap eval
    grounds its boxes through the SAM workdir."""
    if "owl" not in _TRAINED:
        from fmjax.train import loop
        root = tmp_path_factory.mktemp("owl")
        c = tiny_config("owl", total_steps=3, checkpoint_every=3, batch_size=8)
        c.evals = dict(box=dict(type="box_ap", every=3, examples=8, batch_size=8, sam_workdir=sam_workdir))
        loop.train_and_evaluate(c, str(root / "run"), devices=jax.devices()[:1])
        _TRAINED["owl"] = str(root / "run")
    return _TRAINED["owl"]


def test_grounded_segmentation_eval_and_cli(owl_workdir, sam_workdir, picture, tmp_path):
    """Text -> the detector's box -> SAM's mask: the box_ap eval logs grounded_miou and its
    pictures; segment_image(prompt=...) gives one mask per phrase; the flags' misuse is one line."""
    from fmjax.train.segment import segment_image
    rows = [json.loads(x) for x in open(os.path.join(owl_workdir, "metrics.jsonl"))]
    m = {k: v for x in rows for k, v in x.items()}
    for key in ("ap50", "grounded_miou", "grounded_iou@0.5", "compositional_acc", "grounding_acc",
                "relation_acc", "relation_grounding_acc"):
        assert 0.0 <= m.get(f"eval/box_{key}", 0.0) <= 1.0, (key, m)
    assert "eval/box_ap50" in m and "eval/box_grounded_miou" in m and "eval/box_relation_acc" in m
    assert m["eval/box_instances"] > 0
    assert any(f.startswith("box_boxes_") for f in os.listdir(os.path.join(owl_workdir, "images")))
    out = segment_image(sam_workdir, picture, prompt="a red circle;a blue square", detector_workdir=owl_workdir,
                        out=str(tmp_path / "g.png"))
    assert len(out["masks"]) == 2 and out["masks"][0]["segmentation"].shape == (80, 96)
    for kwargs, text in ((dict(prompt="a red circle"), "--prompt needs --detector_workdir"),
                         (dict(prompt="a;", detector_workdir=owl_workdir), "one or more ';'-separated"),
                         (dict(points="1,2", detector_workdir=owl_workdir), "goes with --prompt"),
                         (dict(prompt="x", detector_workdir=str(tmp_path / "none")), "no such directory"),
                         (dict(prompt="x", detector_workdir=sam_workdir), "must be an open-vocabulary detector")):
        with pytest.raises(ConfigError, match=text):
            segment_image(sam_workdir, picture, **kwargs)
    proc = run_cli("segment", f"--workdir={sam_workdir}", f"--image={picture}", "--prompt=a red circle",
                   f"--detector_workdir={owl_workdir}", f"--out={tmp_path / 'cli.png'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("prompt 'a red circle': box ") and os.path.isfile(tmp_path / "cli.png")
