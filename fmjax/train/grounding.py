"""Text -> boxes (the first half of Grounded-SAM): an open-vocabulary detector workdir
(configs/owl.py) finds the box of a phrase; ``fmjax.train.segment.Segmenter`` (a SAM workdir,
configs/sam.py) turns boxes into masks.

``Detector(workdir)`` restores the workdir once (``load_checkpoint``);
``detector.top_boxes(images01, phrases)`` gives, per image and phrase, the highest-scoring
patch's box (pixel xyxy of the image) and score. Images are float [0, 1] (H, W, 3) arrays; each side resizes
them (bicubic) to its model's input and applies its own ``config.data.pp_eval`` (without ``keep``),
so the two workdirs may differ in resolution and normalisation. Used by ``launch/segment.py
--prompt`` and the ``box_ap`` eval's ``sam_workdir`` (``fmjax/evals/box_ap.py``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import transforms
from fmjax.errors import ConfigError
from fmjax.train import files
from fmjax.train.restore import load_checkpoint, load_workdir_config


def preprocess(config, image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> the model input (size, size, C): bicubic resize, then pp_eval's ops
    other than ``keep``."""
    from PIL import Image
    x = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.uint8)
    try:
        pp = transforms.parse(config.data.pp_eval)
        ops = [t for t in pp.transforms if not isinstance(t, transforms.keep)]
        out = transforms.Compose(ops)({"image": x}, np.random.default_rng(0))["image"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config.data.pp_eval={config.data.pp_eval!r} cannot run on an image alone: {e}") from None
    return np.asarray(out, np.float32)


def model_inputs(config, images01, size: int) -> np.ndarray:
    """float [0, 1] images (B, H, W, 3) -> the inputs of a workdir's model (``preprocess``)."""
    u8 = np.round(np.clip(np.asarray(images01, np.float32), 0, 1) * 255).astype(np.uint8)
    return np.stack([preprocess(config, im, size) for im in u8])


def workdir_config(workdir: str, flag: str, what: str):
    wd = files.resolve(workdir)
    if not files.isdir(wd):
        raise ConfigError(f"{flag}={workdir}: no such directory; give a workdir written by "
                          f"launch/train.py --config={what}.")
    return wd, load_workdir_config(wd)


class Detector:
    """A restored ``owl`` workdir (its ``detector()`` hook)."""

    def __init__(self, workdir: str, step=None, devices=None, flag: str = "--detector_workdir"):
        wd, config = workdir_config(workdir, flag, "configs/owl.py")
        if config.objective.name != "owl":
            raise ConfigError(f"{flag}={workdir} holds a {config.objective.name!r} run; it must be an "
                              "open-vocabulary detector (configs/owl.py).")
        self.config, self.objective, _, _, state, self.step = load_checkpoint(wd, config, step, devices)
        self.model, params_of = self.objective.detector()
        self.params = params_of(state.params, state.extra)
        self.size = int(self.config.data.image_size)
        m = self.model
        self._queries = jax.jit(lambda p, t: m.apply({"params": p}, t, method=m.encode_queries))
        self._detect = jax.jit(lambda p, x, q: m.apply({"params": p}, x, q, method=m.detect))

    def query_embeds(self, phrases) -> jax.Array:
        from fmjax.data.text_ops import tokenize_texts
        return self._queries(self.params, jnp.asarray(tokenize_texts(self.config, list(phrases))))

    def detect(self, images01, phrases):
        """(scores (B, N, Q) sigmoid probabilities, boxes (B, N, 4) xyxy in [0, 1])."""
        x = jnp.asarray(model_inputs(self.config, images01, self.size))
        out = self._detect(self.params, x, self.query_embeds(phrases))
        from fmjax.objectives.owl import cxcywh_to_xyxy
        return np.asarray(jax.nn.sigmoid(out["logits"])), np.asarray(cxcywh_to_xyxy(out["boxes"]))

    def top_boxes(self, images01, phrases):
        """(boxes (B, Q, 4) pixel xyxy of the images (inclusive bounds), scores (B, Q))."""
        scores, boxes = self.detect(images01, phrases)
        best = scores.argmax(1)                                        # (B, Q)
        h, w = np.asarray(images01).shape[1:3]
        top = np.take_along_axis(boxes, best[..., None], 1)            # (B, Q, 4)
        px = top * np.array([w, h, w, h], np.float32) - np.array([0, 0, 1, 1], np.float32)
        px = np.clip(px, 0, np.array([w - 1, h - 1, w - 1, h - 1], np.float32))
        return px, np.take_along_axis(scores, best[:, None], 1)[:, 0]
