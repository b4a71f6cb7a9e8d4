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
    want = {"mae": {"visualize"}, "dino": {"visualize", "update_mask"},
            "clip": {"text_features", "update_mask", "project_params"},
            "supervised": {"eval_metrics", "predict"},
            "diffusion": {"generate", "visualize", "update_mask"}}
    for name, hooks in want.items():
        cls = [v for v in vars(importlib.import_module(f"fmjax.objectives.{name}")).values()
               if isinstance(v, type) and issubclass(v, Objective) and v is not Objective][0]
        obj = object.__new__(cls)
        have = {h for h in base.OPTIONAL_HOOKS if supports(obj, h)}
        assert have == hooks, (name, have)


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
