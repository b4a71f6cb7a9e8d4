"""`fmjax_shapes`: the bundled, procedurally generated dataset.

Each example is a scene of 1-3 coloured shapes on a muted, textured
background, with a class label (the main object's shape), a caption, instance
masks and per-object attributes. Scenes depend only on (split, index), so every
resolution renders the same scene and preparation is fully deterministic.

The `simple` variant (`fmjax_shapes/simple_<resolution>`) renders the same scenes with
only the main object, on the background's smooth two-colour gradient (no blobs, texture
or noise): same labels, main-object attributes and held-out split, and a caption of the
one-object templates. It is for recipes that must learn within minutes on a CPU (the
`cpu` presets of DINO and diffusion): the full scenes' textured backgrounds and
distractor objects dominate what a tiny model learns first.

Some (shape, colour) combinations never appear on any object of the
train/validation/test splits; the `heldout` split has them as its main object,
for zero-shot tests.

Use `generate_example(index, split, resolution)` directly, or prepare the TFDS
builder (array_record, no TensorFlow needed) through `fmjax.data.sources`.
"""
import colorsys
import io
import math
import re

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "hexagon", "heart", "ring")
COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
COLOR_RGB = ((220, 40, 40), (40, 175, 60), (45, 85, 230), (240, 220, 45),
             (145, 60, 200), (250, 140, 20), (40, 210, 220), (245, 125, 185))
SIZE_NAMES = ("small", "large")
POSITION_NAMES = ("left", "right", "top", "bottom", "center")
MAX_OBJECTS = 3

SPLITS = ("train", "validation", "test", "heldout")
SPLIT_SIZES = {"train": 10000, "validation": 1000, "test": 1000, "heldout": 1000}
RESOLUTIONS = (32, 48, 64, 96, 128, 160, 192, 224, 256)
DEFAULT_RESOLUTION = 64
VARIANTS = ("full", "simple")   # builder config names: "<res>" (full), "simple_<res>"

# (shape, colour) index pairs that only the heldout split shows: one per shape
# and one per colour (3 is coprime with 8, so the map is a permutation).
HELDOUT_COMBOS = frozenset((s, (3 * s + 1) % len(COLOR_NAMES)) for s in range(len(CLASS_NAMES)))
SEEN_COMBOS = tuple((s, c) for s in range(len(CLASS_NAMES)) for c in range(len(COLOR_NAMES))
                    if (s, c) not in HELDOUT_COMBOS)

# Caption templates. {main}/{other}/{others} are "[size] colour shape" phrases;
# {main_where}/{other_where} are position phrases; {relation} places main
# relative to the second object; {count} is a number word.
SINGLE_TEMPLATES = (
    "a photo of a {main}.",
    "a {main}.",
    "a {main} {main_where}.",
    "there is a {main} {main_where}.",
    "an image of a {main} on a textured background.",
    "a picture showing a {main}.",
)
MULTI_TEMPLATES = (
    "a {main} {relation} a {other}.",
    "a photo of a {main} and {others}.",
    "a {main} {main_where}, with a {other} {other_where}.",
    "there is a {main} {relation} a {other}.",
    "{count} shapes: a {main} and {others}.",
    "a picture of a {main} next to {others}.",
)
CAPTION_TEMPLATES = SINGLE_TEMPLATES + MULTI_TEMPLATES
# Prompt ensemble for zero-shot classification over CLASS_NAMES.
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture showing a {}.",
                       "there is a {} in the center.", "an image of a {} on a textured background.")

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_CENTERS = ((0.24, 0.5), (0.76, 0.5), (0.5, 0.24), (0.5, 0.76), (0.5, 0.5))
_WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
_RADIUS = (0.15, 0.22)  # main object small, large; fraction of the image side
_OTHER_RADIUS = 0.09    # other objects are always clearly smaller than the main one, so the
                        # class label (the main object's shape) is identifiable from the image
_NUMBER_WORDS = {2: "two", 3: "three"}


def _unit_polygon(shape, n_circle=48):
    """Outline of `shape` as an (N, 2) array in a unit-radius frame, y down."""
    def ring(n, r=1.0, phase=-math.pi / 2):
        t = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([r * np.cos(t), r * np.sin(t)], -1)

    name = CLASS_NAMES[shape]
    if name in ("circle", "ring"):
        return ring(n_circle)
    if name == "square":
        return ring(4, 1.0, math.pi / 4) * 0.95
    if name == "triangle":
        return ring(3) * 1.05 + np.array([0.0, 0.2])
    if name == "hexagon":
        return ring(6, 1.0, 0.0)
    if name == "star":
        pts = ring(10)
        pts[1::2] *= 0.45
        return pts * 1.1
    if name == "cross":
        a = 0.33
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1),
                         (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], np.float64) * 0.95
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], -1) / 16.5
    raise ValueError(f"unknown shape index {shape}")


def _sample_scene(index, split):
    """Samples resolution-independent scene parameters for (split, index)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown fmjax_shapes split {split!r}; use one of {list(SPLITS)}")
    rng = np.random.default_rng([20240901, _SPLIT_IDS[split], int(index)])
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    heldout = sorted(HELDOUT_COMBOS)
    combos = [heldout[rng.integers(len(heldout))] if split == "heldout"
              else SEEN_COMBOS[rng.integers(len(SEEN_COMBOS))]]
    combos += [SEEN_COMBOS[rng.integers(len(SEEN_COMBOS))] for _ in range(n - 1)]
    positions = rng.permutation(len(POSITION_NAMES))[:n]
    main_size = int(rng.integers(2))
    # The main object is always bigger than the others (which are "small").
    sizes = [main_size] + [0] * (n - 1)
    objects = []
    for i, ((shape, color), pos, size) in enumerate(zip(combos, positions, sizes)):
        cx, cy = np.array(_CENTERS[pos]) + rng.uniform(-0.04, 0.04, 2)
        rot = 0.0 if CLASS_NAMES[shape] in ("circle", "ring") else rng.uniform(-25, 25)
        objects.append(dict(
            shape=int(shape), color=int(color), size=size, position=int(pos),
            center=(float(cx), float(cy)),
            radius=(_RADIUS[size] if i == 0 else _OTHER_RADIUS) * rng.uniform(0.9, 1.1),
            rotation=math.radians(rot),
            rgb=np.clip(np.array(COLOR_RGB[color]) + rng.normal(0, 8, 3), 0, 255)))
    hue = rng.uniform()
    bg_colors = [colorsys.hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0,
                                     rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.6))
                 for _ in range(2)]
    background = dict(
        colors=np.array(bg_colors), angle=rng.uniform(0, 2 * math.pi),
        blobs=rng.normal(0, 0.06, (5, 5)), texture=int(rng.integers(3)),
        freq=rng.uniform(3, 9), tex_angle=rng.uniform(0, math.pi), noise_seed=int(rng.integers(2**31)))
    return dict(objects=objects, background=background, caption_seed=int(rng.integers(2**31)))


def _render_background(bg, res, plain=False):
    """Muted two-colour gradient + low-frequency blobs + stripes/checks + noise (``plain``:
    the gradient only)."""
    yy, xx = (np.mgrid[0:res, 0:res] + 0.5) / res
    t = (xx - 0.5) * math.cos(bg["angle"]) + (yy - 0.5) * math.sin(bg["angle"])
    t = np.clip(t / 1.42 + 0.5, 0, 1)[..., None]
    img = bg["colors"][0] * (1 - t) + bg["colors"][1] * t
    if plain:
        return img * 255.0
    blobs = Image.fromarray(bg["blobs"].astype(np.float32), mode="F").resize((res, res), Image.BILINEAR)
    img = img + np.asarray(blobs)[..., None]
    u = xx * math.cos(bg["tex_angle"]) + yy * math.sin(bg["tex_angle"])
    if bg["texture"] == 1:
        img = img + 0.04 * np.sin(2 * math.pi * bg["freq"] * u)[..., None]
    elif bg["texture"] == 2:
        v = -xx * math.sin(bg["tex_angle"]) + yy * math.cos(bg["tex_angle"])
        checks = (np.floor(bg["freq"] * u) + np.floor(bg["freq"] * v)) % 2
        img = img + 0.035 * (checks[..., None] - 0.5)
    noise = np.random.default_rng(bg["noise_seed"]).normal(0, 0.02, (res, res, 1))
    return (img + noise) * 255.0


def _object_alpha(obj, res):
    """Anti-aliased coverage in [0, 1] of one object: drawn supersampled, box-downsampled."""
    ss = 4 if res <= 128 else 2
    big = res * ss
    pts = _unit_polygon(obj["shape"])
    c, s = math.cos(obj["rotation"]), math.sin(obj["rotation"])
    pts = pts @ np.array([[c, s], [-s, c]])
    pts = (pts * obj["radius"] + np.array(obj["center"])) * big
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in pts], fill=255)
    if CLASS_NAMES[obj["shape"]] == "ring":
        inner = (_unit_polygon(obj["shape"]) * 0.55 * obj["radius"] + np.array(obj["center"])) * big
        draw.polygon([tuple(p) for p in inner], fill=0)
    return np.asarray(canvas.resize((res, res), Image.BOX), np.float32) / 255.0


def _a_an(text):
    """Fixes English articles: 'a orange' -> 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _relation(main, other):
    """Where `main` is relative to `other`, from their centres."""
    dx = main["center"][0] - other["center"][0]
    dy = main["center"][1] - other["center"][1]
    if abs(dx) >= abs(dy):
        return "on the left of" if dx < 0 else "on the right of"
    return "above" if dy < 0 else "below"


def make_caption(objects, seed):
    """Picks a template and fills it in; always names the main object's colour and shape."""
    rng = np.random.default_rng(seed)

    def phrase(obj, with_size):
        words = [SIZE_NAMES[obj["size"]]] if with_size else []
        return " ".join(words + [COLOR_NAMES[obj["color"]], CLASS_NAMES[obj["shape"]]])

    with_size = bool(rng.uniform() < 0.6)
    descs = [phrase(o, with_size) for o in objects]
    main = objects[0]
    fields = dict(main=descs[0], main_where=_WHERE[main["position"]])
    if len(objects) == 1:
        template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
    else:
        template = MULTI_TEMPLATES[rng.integers(len(MULTI_TEMPLATES))]
        others = ["a " + d for d in descs[1:]]
        fields.update(
            other=descs[1], other_where=_WHERE[objects[1]["position"]],
            relation=_relation(main, objects[1]),
            others=" and ".join(others) if len(others) < 3 else ", ".join(others),
            count=_NUMBER_WORDS[len(objects)])
    return _a_an(template.format(**fields))


# Generated visual question answering about the main object (the largest; "it") and the scene
# (configs/flamingo.py): each kind has one question and two answer styles, a bare word ('short',
# VQAv2's answers) or a sentence ('sentence').
VQA_KINDS = ("shape", "colour", "count")
VQA_QUESTIONS = {"shape": "what shape is it?", "colour": "what colour is it?",
                 "count": "how many shapes are there?"}
VQA_STYLES = ("short", "sentence")
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def vqa_answer(kind, shape, color, num_objects, style="short") -> str:
    """The answer to ``VQA_QUESTIONS[kind]`` about a scene whose main object has class ``shape``
    and colour ``color`` and which holds ``num_objects`` objects, in ``style``."""
    if kind not in VQA_KINDS or style not in VQA_STYLES:
        raise ValueError(f"vqa_answer: kind {kind!r} / style {style!r}; valid {VQA_KINDS} / {VQA_STYLES}.")
    word = {"shape": CLASS_NAMES[shape], "colour": COLOR_NAMES[color],
            "count": _COUNT_WORDS[int(num_objects)]}[kind]
    if style == "short":
        return word
    if kind == "shape":
        return "it is " + _a_an("a " + word) + "."
    if kind == "colour":
        return f"it is {word}."
    return "there is one." if int(num_objects) == 1 else f"there are {word}."


def generate_example(index, split="train", resolution=DEFAULT_RESOLUTION, variant="full"):
    """Renders example `index` of `split` at `resolution` pixels (square).

    ``variant='simple'``: the same scene with only its main object, on a plain gradient
    background (see the module docstring).

    Returns a dict of numpy values:
      image uint8 (R, R, 3); label int64 (main object's shape, index into
      CLASS_NAMES); caption str; masks uint8 (3, R, R) visible instance masks
      (0/1, zeros for absent objects); num_objects int32; shapes, colors,
      sizes, positions int32 (3,) with -1 for absent objects. Object 0 is the
      main object; it is drawn last so it is never occluded.
    """
    if not 8 <= int(resolution) <= 1024:
        raise ValueError(f"fmjax_shapes resolution must be in [8, 1024], got {resolution}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown fmjax_shapes variant {variant!r}; use one of {list(VARIANTS)}")
    res = int(resolution)
    scene = _sample_scene(index, split)
    simple = variant == "simple"
    objects = scene["objects"][:1] if simple else scene["objects"]
    img = _render_background(scene["background"], res, plain=simple)
    masks = np.zeros((MAX_OBJECTS, res, res), np.uint8)
    for i in reversed(range(len(objects))):  # others first, main last (on top)
        alpha = _object_alpha(objects[i], res)[..., None]
        img = img * (1 - alpha) + objects[i]["rgb"] * alpha
        visible = alpha[..., 0] >= 0.5
        masks[:, visible] = 0
        masks[i, visible] = 1
    attrs = {k: np.full((MAX_OBJECTS,), -1, np.int32) for k in ("shapes", "colors", "sizes", "positions")}
    for i, obj in enumerate(objects):
        attrs["shapes"][i], attrs["colors"][i] = obj["shape"], obj["color"]
        attrs["sizes"][i], attrs["positions"][i] = obj["size"], obj["position"]
    return dict(
        image=np.clip(np.round(img), 0, 255).astype(np.uint8),
        label=np.int64(objects[0]["shape"]),
        caption=make_caption(objects, scene["caption_seed"]),
        masks=masks, num_objects=np.int32(len(objects)), **attrs)


def config_name(resolution, variant="full") -> str:
    """The builder config name: '64' (full scenes), 'simple_64' (the simple variant)."""
    return str(resolution) if variant == "full" else f"{variant}_{resolution}"


class FmjaxShapesConfig(tfds.core.BuilderConfig):
    """A resolution and variant of fmjax_shapes; the config name is ``config_name``, e.g.
    '64' or 'simple_32'."""

    def __init__(self, *, resolution, variant="full", **kwargs):
        what = "" if variant == "full" else f", {variant} variant (main object only, plain background)"
        super().__init__(name=config_name(resolution, variant),
                         description=f"{resolution}x{resolution} pixels{what}", **kwargs)
        self.resolution = resolution
        self.variant = variant


class FmjaxShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural coloured-shape scenes with labels, captions and instance masks."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Main object always larger than the others (identifiable label)."}
    BUILDER_CONFIGS = [FmjaxShapesConfig(resolution=r, variant=v) for v in VARIANTS for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = str(DEFAULT_RESOLUTION)

    # TFDS's default `code_path` needs the `importlib_resources` backport,
    # which is not installed; this file is the answer it would compute.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        res = self.builder_config.resolution
        ints = lambda: tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32)  # noqa: E731
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(dict(
                image=tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
                label=tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                caption=tfds.features.Text(),
                masks=tfds.features.Tensor(shape=(MAX_OBJECTS, res, res), dtype=np.uint8,
                                           encoding=tfds.features.Encoding.ZLIB),
                num_objects=tfds.features.Scalar(dtype=np.int32),
                shapes=ints(), colors=ints(), sizes=ints(), positions=ints(),
            )),
            supervised_keys=("image", "label"),
            # Record i of a split is generate_example(i, split); loaders shuffle.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                class_names=list(CLASS_NAMES), color_names=list(COLOR_NAMES),
                size_names=list(SIZE_NAMES), position_names=list(POSITION_NAMES),
                heldout_combos=sorted([list(c) for c in HELDOUT_COMBOS])),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        res, variant = self.builder_config.resolution, self.builder_config.variant
        for index in range(SPLIT_SIZES[split]):
            ex = generate_example(index, split, res, variant)
            buf = io.BytesIO()
            Image.fromarray(ex["image"]).save(buf, format="PNG", compress_level=1)
            ex["image"] = buf.getvalue()
            yield index, ex
