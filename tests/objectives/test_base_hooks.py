"""The objective protocol's declared hooks: defaults on the base class, ``supports`` for the
optional capabilities, and ``check`` running in the pre-compile config check."""
import pytest

from fmjax.errors import ConfigError
from fmjax.objectives import base
from fmjax.objectives.base import Objective, supports


class Bare(Objective):
    def init(self, rng, batch):
        return {}, {}


class Rich(Bare):
    def features(self, params, extra, images):
        return images

    def visualize(self, params, extra, batch, rng):
        return {}


def test_defaults_and_supports():
    bare, rich = Bare(None), Rich(None)
    assert bare.health({"train/loss": 1.0}) is None
    assert bare.check(None) is None
    assert bare.after_model_init({"w": 1}, {"e": 2}) == {"e": 2}
    for hook in base.OPTIONAL_HOOKS:
        assert not supports(bare, hook), hook
    assert not supports(bare, "features")          # the base's NotImplementedError stub
    assert supports(rich, "features") and supports(rich, "visualize")
    assert supports(bare, "init") and not supports(bare, "loss")


def test_supports_duck_typed_objectives():
    class Duck:
        def text_features(self, params, extra, tokens):
            return tokens
    assert supports(Duck(), "text_features") and not supports(Duck(), "visualize")


def test_every_registered_objective_declares_its_capabilities():
    """The shipped objectives, by capability (what evaluators ask for)."""
    import importlib
    accum = {"embed", "loss_from_embeddings"}  # losses that couple examples (grad accumulation)
    want = {"mae": {"visualize"}, "dino": {"visualize", "update_mask"} | accum,
            "clip": {"text_features", "update_mask", "project_params"} | accum,
            "supervised": {"eval_metrics", "predict"},
            "diffusion": {"generate", "visualize", "update_mask"},
            "linear_probe": {"eval_metrics", "predict"} | accum,
            "moco": {"visualize"} | accum,
            "byol": {"visualize"} | accum,
            "simclr": {"visualize"}}
    # Losses that couple the examples and refuse grad_accum_steps > 1 instead of accumulating
    # exactly (SimCLR: its head's BatchNorm normalises by the statistics of the batch it sees).
    refuses_accum = {"simclr"}
    for name, hooks in want.items():
        cls = [v for v in vars(importlib.import_module(f"fmjax.objectives.{name}")).values()
               if isinstance(v, type) and issubclass(v, Objective) and v is not Objective][0]
        obj = object.__new__(cls)
        have = {h for h in base.OPTIONAL_HOOKS if supports(obj, h)}
        assert have == hooks, (name, have)
        # A loss that couples examples says so, and has the hooks that keep it whole.
        assert bool(cls.couples_examples) == bool(hooks & accum) or name in refuses_accum, name
        if name in refuses_accum:
            assert cls.couples_examples and not hooks & accum, name


def test_objective_check_runs_in_the_config_check(monkeypatch):
    from fmjax.testing import load_config
    from fmjax.parallel import mesh as mesh_lib
    from fmjax.train import validate

    class Picky(Bare):
        def check(self, config):
            raise ConfigError("config.objective.foo=1 cannot work; set foo=2.")

    config = load_config("mae")
    with pytest.raises(ConfigError, match="foo=2"):
        validate.check(config, Picky(config), mesh_lib.make_mesh(config.mesh), evals=False)


# -- the backbone contract ---------------------------------------------------------------------

def test_objectives_check_capabilities_not_model_names():
    from fmjax.objectives.base import make_objective
    from fmjax.testing import load_config
    config = load_config("supervised")
    config.model = dict(name="unet", channels=16, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), num_groups=8, sample_size=16, num_classes=3)
    with pytest.raises(ValueError, match=r"objective 'supervised' needs a model with \['classifier', 'pooled'\].*"
                                         r"config.model.name='unet' has \['class_conditional', 'denoiser'\]; "
                                         r"models that fit: \['convnext', 'resnet', 'swin', 'tinyvit', 'vit'\]"):
        make_objective(config)
    config = load_config("diffusion")
    config.model = dict(name="mae", variant="S/16")
    with pytest.raises(ValueError, match=r"needs a model with \['denoiser'\].*models that fit: \['dit', 'unet'\]"):
        make_objective(config)


def test_a_registered_backbone_serves_an_existing_objective():
    """A new backbone (registered from outside fmjax.models, declaring 'classifier' and
    'pooled') trains under the supervised objective with no edit to the objective."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from fmjax.models import registry
    from fmjax.objectives.base import make_objective
    from fmjax.testing import load_config

    @registry.register_model("tiny_cnn_for_test")
    class TinyCNN(nn.Module):
        num_classes: int = 0
        width: int = 8
        dtype: jnp.dtype = jnp.float32
        capabilities = frozenset({"pooled", "classifier"})

        @nn.compact
        def __call__(self, images, train=False):
            x = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype)(images))
            pooled = x.mean(axis=(1, 2))
            return dict(pre_logits=pooled, logits=nn.Dense(self.num_classes)(pooled))

    try:
        config = load_config("supervised")
        config.model = dict(name="tiny_cnn_for_test", num_classes=4, width=8)
        obj = make_objective(config)
        batch = dict(image=jnp.ones((2, 8, 8, 3)), label=jnp.array([0, 3]))
        params, extra = obj.init(jax.random.PRNGKey(0), batch)
        loss, (metrics, _) = obj.loss(params, extra, batch, jax.random.PRNGKey(1), 0)
        assert jnp.isfinite(loss) and obj.features(params, extra, batch["image"]).shape == (2, 8)
        with pytest.raises(ValueError, match="already registered"):
            registry.register_model("vit")(TinyCNN)
    finally:
        registry._REGISTERED.pop("tiny_cnn_for_test", None)
