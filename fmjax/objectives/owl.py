"""Open-vocabulary detection, OWL-ViT style (Minderer et al., 2022; ``fmjax/models/owl.py``):
every patch token of a CLIP image tower predicts a box and a class embedding that is scored
against the text tower's embeddings of phrases.

The data give instances, not boxes: ``masks`` (B, K, H, W) of the first ``num_objects``
instances, with per-instance attribute indices ``colors`` and ``shapes`` (B, K) (the bundled
``fmjax_shapes`` features). Each instance's box is its visible mask's bounds (moved with the
mask by any joint augmentation), its phrase ``objective.template`` filled with the attribute
names ``objective.color_names`` / ``objective.shape_names``. The training vocabulary is every
(shape, colour) phrase but the ``objective.exclude`` pairs (the shapes' held-out combinations:
the text tower never sees those phrases as classes, so detecting them is open-vocabulary); every
step the text tower embeds the vocabulary (V phrases) once.

Loss (DETR's set prediction, as OWL-ViT trains it): the ground-truth instances are matched
one-to-one to patch predictions by the minimum total cost ``class_weight`` x focal class cost
(Deformable DETR's: alpha-weighted focal terms of the phrase's probability) + ``l1_weight`` x
L1 of (cx, cy, w, h) + ``giou_weight`` x (-GIoU). The matching is exact: for K <= 4 instances
an instance's partner is among its K cheapest patches (any other partner could be swapped for
a free one of those at no more cost), so the K^K candidate assignments are enumerated in the
step; more instances use scipy's Hungarian algorithm on the host (``jax.pure_callback``). Then
``class_weight`` x sigmoid focal loss (alpha ``focal_alpha``, gamma 2) over all patches x
phrases, with the matched patch's phrase as the only positive, + ``l1_weight`` x L1 +
``giou_weight`` x (1 - GIoU) of the matched boxes, each summed and divided by the number of
instances in the global batch (so the loss couples the examples).

Reference options (scenic's OWL-ViT, google-research/scenic scenic/projects/owl_vit/
matching_base_models.py; tests/reference/test_owl_trajectory.py): ``normalization='per_example'``
divides each image's class and box sums by its own instance count (at least 1) and averages
over the images (scenic's configs set it; it pairs with per-example gradient clipping,
``optimizer.clip_mode='per_example'``); ``box_l1='xyxy'`` takes the box loss's L1 on the
corners (scenic's ``weighted_box_l1_loss`` of the xyxy boxes; its matching cost, like fmjax's,
uses (cx, cy, w, h)); ``prior_prob`` p > 0 sets the class head's ``logit_shift`` bias to
log(p / (1 - p)) at init (scenic's trainer with ``config.prior_prob``, 0.01 in its configs).
Defaults: 'global', 'cxcywh' and 0 (DETR's, facebookresearch/detr models/detr.py
``SetCriterion``, and the model's init).

Relation queries (``relation_queries`` R > 0; default 0): referring expressions with a spatial
relation, ``relation_template`` ('a red circle on the left of a blue square.'). Per image the
first R ordered pairs (A, B) of instances whose phrases are unique in the image and whose box
centres are clearly apart on one axis (``relation_margin``; the relation by the dominant axis,
as the shapes captions word it, computed from the augmented boxes, so a flip swaps it) add two
queries: the true phrase, positive only at A's matched patch, and the same phrase with the
opposite relation, positive nowhere (a hard negative that differs in one word). Their sigmoid
focal loss over the image's own 2R columns (other images' are ignored) is added with weight
``class_weight`` x ``relation_weight``, divided by the number of pairs. The phrases' tokens are
tabulated once for every (phrase, relation, phrase) of the training vocabulary (V x 4 x V rows),
so the text tower embeds V + 2R x batch queries a step.

``detector()`` gives evals and ``launch/segment.py --prompt`` the model: ``fmjax/evals/box_ap.py``
(AP50 over phrases, compositional accuracy, grounded masks through a SAM workdir).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective
from fmjax.objectives.sam import mask_box, sigmoid_focal

EXACT_MATCH_MAX = 4   # enumerate K^K assignments up to this many instances per image


# -- boxes -------------------------------------------------------------------------------------
def cxcywh_to_xyxy(b):
    cx, cy, w, h = jnp.moveaxis(b, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def generalized_iou(a, b):
    """GIoU of xyxy boxes, broadcast over the leading axes (Rezatofighi et al., 2019)."""
    area = lambda x: jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)  # noqa: E731
    lt, rb = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), -1)
    union = area(a) + area(b) - inter
    iou = inter / jnp.maximum(union, 1e-9)
    lt2, rb2 = jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])
    hull = jnp.prod(jnp.clip(rb2 - lt2, 0), -1)
    return iou - (hull - union) / jnp.maximum(hull, 1e-9)


def instance_boxes(masks):
    """(..., H, W) instance masks -> (..., 4) cxcywh in [0, 1] of their visible pixels' bounds
    (pixel x0 .. x1 inclusive covers [x0, x1 + 1) / W); zeros for empty masks."""
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    flat = masks.reshape((-1, h, w)) > 0
    box = mask_box(flat)   # inclusive pixel bounds, zeros when empty
    scale = jnp.asarray([w, h, w, h], jnp.float32)
    xyxy = (box + jnp.asarray([0, 0, 1, 1], jnp.float32)) / scale
    out = jnp.where(flat.any((-2, -1))[:, None], xyxy_to_cxcywh(xyxy), 0.0)
    return out.reshape(lead + (4,))


# -- losses ------------------------------------------------------------------------------------
def match_cost(logits, boxes, labels, gt_boxes, class_weight, l1_weight, giou_weight, alpha=0.25):
    """(B, N, V) logits, (B, N, 4) boxes, (B, K) labels, (B, K, 4) ground truth -> (B, N, K) cost
    (Deformable DETR's matcher: focal class cost, L1 and -GIoU)."""
    p = jax.nn.sigmoid(jnp.take_along_axis(logits, labels[:, None, :], axis=-1))   # (B, N, K)
    neg = (1 - alpha) * p ** 2 * -jnp.log(1 - p + 1e-8)
    pos = alpha * (1 - p) ** 2 * -jnp.log(p + 1e-8)
    l1 = jnp.abs(boxes[:, :, None] - gt_boxes[:, None]).sum(-1)
    giou = generalized_iou(cxcywh_to_xyxy(boxes)[:, :, None], cxcywh_to_xyxy(gt_boxes)[:, None])
    return class_weight * (pos - neg) + l1_weight * l1 - giou_weight * giou


def exact_match(cost, valid):
    """(B, N, K) cost, (B, K) valid -> (B, K) int32 patch of each instance: the assignment of
    the valid instances to distinct patches with the least total cost (see the module
    docstring; invalid instances get some patch, which the losses ignore). Needs N >= K."""
    b, n, k = cost.shape
    if k > EXACT_MATCH_MAX:
        return hungarian_match(cost, valid)
    kk = min(k, n)
    cand = jax.lax.top_k(-jnp.swapaxes(cost, 1, 2), kk)[1]                    # (B, K, kk)
    combos = jnp.asarray(list(itertools.product(range(kk), repeat=k)), jnp.int32)  # (C, K)
    assigned = jnp.take_along_axis(cand[:, None], combos[None, :, :, None], -1)[..., 0]  # (B, C, K)
    per = jnp.take_along_axis(jnp.swapaxes(cost, 1, 2)[:, None], assigned[..., None], -1)[..., 0]
    total = (per * valid[:, None]).sum(-1)
    ok = jnp.ones(total.shape, bool)
    for i in range(k):
        for j in range(i + 1, k):
            both = valid[:, None, i] & valid[:, None, j]
            ok &= ~both | (assigned[..., i] != assigned[..., j])
    best = jnp.argmin(jnp.where(ok, total, jnp.inf), axis=1)
    return jnp.take_along_axis(assigned, best[:, None, None], 1)[:, 0]


def hungarian_match(cost, valid):
    """``exact_match`` by scipy's ``linear_sum_assignment`` on the host."""
    def host(c, v):
        from scipy.optimize import linear_sum_assignment
        c, v = np.asarray(c, np.float64), np.asarray(v, bool)
        out = np.zeros(v.shape, np.int32)
        for i in range(c.shape[0]):
            cols = np.flatnonzero(v[i])
            if len(cols):
                rows, which = linear_sum_assignment(c[i][:, cols])
                out[i, cols[which]] = rows
        return out
    shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    return jax.pure_callback(host, shape, cost, valid, vmap_method="sequential")


# Spatial relations between two instances, as the shapes captions word them
# (fmjax/data/shapes.py _relation): the box_ap eval's relation queries and the objective's
# ``relation_queries``.
RELATIONS = ("on the left of", "on the right of", "above", "below")
OPPOSITE_RELATION = (1, 0, 3, 2)


def spatial_relation(center_a, center_b, margin: float, xp=np):
    """Where the instance centred at ``center_a`` (..., 2) (x, y; y down) lies relative to the one
    at ``center_b``: ``(relation, clear)``, relation an index of ``RELATIONS`` by the dominant axis
    of the offset (as the shapes captions decide it), clear where the two axes' offsets differ by
    at least ``margin``. ``xp``: numpy or jax.numpy."""
    dx = center_a[..., 0] - center_b[..., 0]
    dy = center_a[..., 1] - center_b[..., 1]
    clear = xp.abs(xp.abs(dx) - xp.abs(dy)) >= margin
    rel = xp.where(xp.abs(dx) >= xp.abs(dy), xp.where(dx < 0, 0, 1), xp.where(dy < 0, 2, 3))
    return rel, clear


class OWLObjective(Objective):
    batch_keys = ("image", "masks", "num_objects", "colors", "shapes")
    couples_examples = "the class and box losses are divided by the global batch's number of instances"

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("open_vocab_detection",), "objective 'owl'", config.model.name)
        o = config.objective
        self.colors = tuple(o.get("color_names", ()) or ())
        self.shapes = tuple(o.get("shape_names", ()) or ())
        self.template = str(o.get("template", "a photo of a {color} {shape}."))
        self.relation_template = str(o.get(
            "relation_template", "a photo of a {color} {shape} {relation} a {other_color} {other_shape}."))
        self.exclude = {tuple(int(v) for v in p) for p in (o.get("exclude", ()) or ())}
        self.class_weight = float(o.get("class_weight", 2.0))
        self.l1_weight = float(o.get("l1_weight", 5.0))
        self.giou_weight = float(o.get("giou_weight", 2.0))
        self.focal_alpha = float(o.get("focal_alpha", 0.25))
        self.relation_queries = int(o.get("relation_queries", 0))
        self.relation_weight = float(o.get("relation_weight", 1.0))
        self.relation_margin = float(o.get("relation_margin", 0.1))
        self.normalization = str(o.get("normalization", "global"))
        self.box_l1 = str(o.get("box_l1", "cxcywh"))
        self.prior_prob = float(o.get("prior_prob", 0.0) or 0.0)
        if self.normalization == "per_example":   # each image's losses are its own: no coupling
            self.couples_examples = ""
        self._tokens = self._relation_table = None

    # -- the vocabulary ----------------------------------------------------------------------------
    def phrase(self, shape: int, color: int) -> str:
        return self.template.format(color=self.colors[color], shape=self.shapes[shape])

    def vocabulary(self, include_excluded: bool = False) -> list[tuple[int, int]]:
        """(shape, colour) index pairs, shape-major; the training one leaves out ``exclude``."""
        return [(s, c) for s in range(len(self.shapes)) for c in range(len(self.colors))
                if include_excluded or (s, c) not in self.exclude]

    def tokens(self, pairs=None) -> np.ndarray:
        """int32 (V, L) token ids of the phrases of ``pairs`` (default: the training vocabulary)."""
        from fmjax.data.text_ops import tokenize_texts
        if pairs is None:
            if self._tokens is None:
                self._tokens = tokenize_texts(self.config, [self.phrase(*p) for p in self.vocabulary()])
            return self._tokens
        return tokenize_texts(self.config, [self.phrase(*p) for p in pairs])

    def relation_phrase(self, a, relation: int, b) -> str:
        """The referring expression for instance ``a`` = (shape, colour) placed ``RELATIONS[relation]``
        instance ``b``, e.g. 'a photo of a red circle on the left of a blue square.'."""
        return self.relation_template.format(
            color=self.colors[a[1]], shape=self.shapes[a[0]], relation=RELATIONS[relation],
            other_color=self.colors[b[1]], other_shape=self.shapes[b[0]])

    def relation_tokens(self, triples) -> np.ndarray:
        """int32 (T, L) token ids of ``relation_phrase(a, relation, b)`` for each triple."""
        from fmjax.data.text_ops import tokenize_texts
        return tokenize_texts(self.config, [self.relation_phrase(*t) for t in triples])

    def relation_table(self) -> np.ndarray:
        """int32 (V * 4 * V, L): the tokens of every relation phrase over the training vocabulary,
        row ``(a * 4 + relation) * V + b`` for vocabulary indices a, b (tokenized once; the order
        ``relation_slots`` indexes)."""
        if self._relation_table is None:
            vocab = self.vocabulary()
            self._relation_table = self.relation_tokens(
                [(a, r, b) for a in vocab for r in range(len(RELATIONS)) for b in vocab])
        return self._relation_table

    def check(self, config):
        if not self.colors or not self.shapes:
            raise ConfigError("objective 'owl' needs config.objective.color_names and shape_names (the "
                              "attribute names the data's 'colors' / 'shapes' indices refer to).")
        try:
            self.phrase(0, 0)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config.objective.template={self.template!r} must hold {{color}} and "
                              f"{{shape}} and nothing else in braces ({e}).") from None
        try:
            self.relation_phrase((0, 0), 0, (0, 0))
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config.objective.relation_template={self.relation_template!r} must hold "
                              "{color}, {shape}, {relation}, {other_color} and {other_shape} and nothing "
                              f"else in braces ({e}).") from None
        if not config.data.get("tokenize"):
            raise ConfigError("objective 'owl' embeds its phrases with config.data.tokenize's tokenizer; "
                              "set config.data.tokenize (as configs/clip.py does).")
        if not self.vocabulary():
            raise ConfigError("config.objective.exclude leaves no phrase to train on.")
        if self.relation_queries < 0 or self.relation_weight < 0 or not 0 <= self.relation_margin <= 1:
            raise ConfigError(
                f"config.objective.relation_queries={self.relation_queries} / relation_weight="
                f"{self.relation_weight} / relation_margin={self.relation_margin}: queries and weight "
                "must be >= 0 (0: no relation queries) and the margin in [0, 1].")
        if self.normalization not in ("global", "per_example"):
            raise ConfigError(f"config.objective.normalization={self.normalization!r}; valid: 'global' (DETR's: "
                              "divided by the global batch's instances) or 'per_example' (scenic OWL-ViT's).")
        if self.box_l1 not in ("cxcywh", "xyxy"):
            raise ConfigError(f"config.objective.box_l1={self.box_l1!r}; valid: 'cxcywh' (DETR's box loss) or "
                              "'xyxy' (scenic OWL-ViT's: L1 of the corners).")
        if not 0.0 <= self.prior_prob < 1.0:
            raise ConfigError(f"config.objective.prior_prob={self.prior_prob} must be in [0, 1) (0: the "
                              "model's init; scenic's 0.01 starts every logit at logit(0.01)).")
        size = config.data.get("image_size")
        if size and size % self.model.patch_size:
            raise ConfigError(f"config.data.image_size={size} is not a multiple of the patch size "
                              f"{self.model.patch_size}.")

    def init(self, rng, batch):
        tokens = jnp.asarray(self.tokens()[:2])
        params = self.model.init({"params": rng}, batch["image"][:1], tokens)["params"]
        if self.prior_prob:   # scenic trainer.py: class_head/logit_shift/bias = logit(prior_prob)
            head = dict(params["class_head"])
            shift = dict(head["logit_shift"])
            value = float(np.log(self.prior_prob) - np.log1p(-self.prior_prob))
            shift["bias"] = jax.tree.map(lambda b: jnp.full(b.shape, value, b.dtype), shift["bias"])
            head["logit_shift"] = shift
            params = dict(params, class_head=head)
        return params, {}

    # -- the step ----------------------------------------------------------------------------------
    def targets(self, batch):
        """(boxes (B, K, 4) cxcywh, labels (B, K) training-vocabulary index, valid (B, K))."""
        masks = batch["masks"]
        k = masks.shape[1]
        boxes = instance_boxes(masks)
        present = jnp.arange(k)[None] < batch["num_objects"].reshape(-1, 1)
        shapes, colors = batch["shapes"].astype(jnp.int32), batch["colors"].astype(jnp.int32)
        table = np.full((len(self.shapes), len(self.colors)), -1, np.int32)
        for i, (s, c) in enumerate(self.vocabulary()):
            table[s, c] = i
        labels = jnp.asarray(table)[jnp.clip(shapes, 0), jnp.clip(colors, 0)]
        valid = present & (masks > 0).any((-2, -1)) & (labels >= 0) & (shapes >= 0) & (colors >= 0)
        return boxes, jnp.maximum(labels, 0), valid

    def detect(self, params, images, tokens, train: bool = False, rng=None):
        m = self.model
        rngs = {"dropout": rng} if rng is not None else {}
        q = m.apply({"params": params}, tokens, train, method=m.encode_queries, rngs=rngs)
        return m.apply({"params": params}, images, q, train, method=m.detect, rngs=rngs)

    def relation_slots(self, gt, labels, valid):
        """The step's relation queries: per image the first ``relation_queries`` ordered pairs (A, B)
        of valid instances whose phrases are unique in the image and whose centres are clearly
        apart on one axis (``relation_margin``). Returns (subject (B, R) instance index, rows (B, R, 2)
        of ``relation_table()`` for the true and the opposite relation, used (B, R))."""
        k, v = labels.shape[1], len(self.vocabulary())
        same = (labels[:, :, None] == labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        unique = valid & (same.sum(-1) == 1)
        pairs = np.asarray([(a, b) for a in range(k) for b in range(k) if a != b], np.int32)   # (P, 2)
        pa, pb = pairs[:, 0], pairs[:, 1]
        rel, clear = spatial_relation(gt[:, pa, :2], gt[:, pb, :2], self.relation_margin, jnp)
        ok = unique[:, pa] & unique[:, pb] & clear                                      # (B, P)
        rank = jnp.cumsum(ok, -1) - 1
        pick = ok[:, None, :] & (rank[:, None, :] == jnp.arange(self.relation_queries)[None, :, None])
        used = pick.any(-1)                                                             # (B, R)
        p = jnp.argmax(pick, -1)                                                        # (B, R)
        rel = jnp.take_along_axis(rel, p, 1)
        subject, other = jnp.asarray(pa)[p], jnp.asarray(pb)[p]
        la, lb = jnp.take_along_axis(labels, subject, 1), jnp.take_along_axis(labels, other, 1)
        opposite = jnp.asarray(OPPOSITE_RELATION)[rel]
        nrel = len(RELATIONS)
        rows = jnp.stack([(la * nrel + rel) * v + lb, (la * nrel + opposite) * v + lb], -1)
        return subject, jnp.where(used[..., None], rows, 0), used

    def loss(self, params, extra, batch, rng, step):
        tokens = jnp.asarray(self.tokens())
        gt, labels, valid = self.targets(batch)
        v = tokens.shape[0]
        if self.relation_queries:
            subject, rows, used = self.relation_slots(gt, labels, valid)
            b, r = used.shape
            tokens = jnp.concatenate([tokens, jnp.asarray(self.relation_table())[rows.reshape(-1)]])
        out = self.detect(params, batch["image"], tokens, train=True, rng=rng)
        logits, boxes = out["logits"], out["boxes"]
        if self.relation_queries:   # each image's own 2R relation columns; the rest of the batch's are ignored
            rel_logits = logits[..., v:].reshape(logits.shape[:2] + (b, 2 * r))
            rel_logits = rel_logits[jnp.arange(b), :, jnp.arange(b)]                  # (B, N, 2R)
            logits = logits[..., :v]
        cost = match_cost(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(boxes), labels, gt,
                          self.class_weight, self.l1_weight, self.giou_weight, self.focal_alpha)
        idx = jax.lax.stop_gradient(exact_match(cost, valid))                 # (B, K)
        w = valid.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        if self.normalization == "per_example":   # scenic: each image's sums / its instances, then the mean
            norm = lambda per_image, count: (per_image / jnp.maximum(count, 1.0)).mean()  # noqa: E731
        else:                                     # DETR: the batch's sums / the batch's instances
            norm = lambda per_image, count: per_image.sum() / jnp.maximum(count.sum(), 1.0)  # noqa: E731
        count = w.sum(1)                                                       # (B,)
        b, npatch, v = logits.shape
        onehot = jax.nn.one_hot(idx, npatch, dtype=jnp.float32) * w[..., None]          # (B, K, N)
        target = jnp.einsum("bkn,bkv->bnv", onehot, jax.nn.one_hot(labels, v, dtype=jnp.float32))
        cls = norm(sigmoid_focal(logits, jnp.minimum(target, 1.0), self.focal_alpha).sum((1, 2)), count)
        pred = jnp.take_along_axis(boxes, idx[..., None], 1)                  # (B, K, 4)
        if self.box_l1 == "xyxy":
            l1 = norm((jnp.abs(cxcywh_to_xyxy(pred) - cxcywh_to_xyxy(gt)).sum(-1) * w).sum(1), count)
        else:
            l1 = norm((jnp.abs(pred - gt).sum(-1) * w).sum(1), count)
        giou = generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt))
        giou_loss = norm(((1 - giou) * w).sum(1), count)
        total = self.class_weight * cls + self.l1_weight * l1 + self.giou_weight * giou_loss
        # how often the matched patch ranks its phrase first among all phrases / patches
        top = jnp.take_along_axis(logits, idx[..., None], 1).argmax(-1) == labels
        metrics = {"loss_class": cls, "loss_l1": l1, "loss_giou": giou_loss,
                   "matched_giou": (giou * w).sum() / n, "matched_top1": (top * w).sum() / n,
                   "instances": w.sum()}
        if self.relation_queries:
            # the true phrase is positive at its subject's matched patch only; the swapped one
            # nowhere (a hard negative: the same words, the opposite relation)
            patch = jnp.take_along_axis(idx, subject, 1)                                # (B, R)
            target = jnp.stack([jax.nn.one_hot(patch, npatch, dtype=jnp.float32),
                                jnp.zeros((b, r, npatch), jnp.float32)], -1)            # (B, R, N, 2)
            target = jnp.moveaxis(target, 2, 1).reshape(b, npatch, 2 * r)
            mask = jnp.repeat(used.astype(jnp.float32), 2, -1)[:, None, :]             # (B, 1, 2R)
            nr = jnp.maximum(used.sum().astype(jnp.float32), 1.0)
            rel_loss = norm((sigmoid_focal(rel_logits, target, self.focal_alpha) * mask).sum((1, 2)),
                            used.sum(1).astype(jnp.float32))
            total = total + self.class_weight * self.relation_weight * rel_loss
            at = jnp.take_along_axis(rel_logits, patch.repeat(2, -1)[:, None, :], 1)[:, 0]   # (B, 2R)
            right = (at[:, 0::2] > at[:, 1::2]) & used
            metrics.update(loss_relation=rel_loss, relation_pairs=used.sum().astype(jnp.float32),
                           relation_top1=right.sum() / nr)
        return total, (metrics, extra)

    # -- for evals and tools --------------------------------------------------------------------------
    def features(self, params, extra, images):
        """The CLIP image embedding (normalised): zero-shot, retrieval and kNN evals of the
        detector's CLIP."""
        m = self.model
        return m.apply({"params": params}, images, method=lambda mod, x: mod.clip_model.encode_image(x))

    def text_features(self, params, extra, tokens):
        m = self.model
        return m.apply({"params": params}, tokens, method=lambda mod, t: mod.clip_model.encode_text(t))

    def detector(self):
        """``(model, params_of)``: the OWL-ViT module and ``params_of(params, extra)`` -> its
        params (``model.encode_queries`` / ``model.detect``)."""
        return self.model, (lambda params, extra: params)


def make(config) -> OWLObjective:
    return OWLObjective(config)
