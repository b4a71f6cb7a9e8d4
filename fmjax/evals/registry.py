"""Eval types by name: ``config.evals.<name>.type='knn'`` -> the class registered as 'knn'.

Each eval type is a module ``fmjax/evals/<type>.py`` whose evaluator class registers itself::

    @registry.register("knn")
    class KnnEvaluator(common.Evaluator): ...

``get(type)`` imports ``fmjax.evals.<type>`` on first use (so a run imports only the eval
types it configures, as big_vision's ``evaluators/common.py`` does with ``importlib``); an
unknown type is a one-line ``ConfigError`` naming the valid ones. A module may register more
than one name (or a name differing from its own) if something imports it first.
"""
from __future__ import annotations

import importlib
import os
import pkgutil

from fmjax.errors import ConfigError

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: makes the class the evaluator of eval type ``name``."""
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"eval type {name!r} is registered twice ({_REGISTRY[name].__module__}, "
                             f"{cls.__module__}).")
        _REGISTRY[name] = cls
        cls.type_name = name
        return cls
    return wrap


def names() -> list[str]:
    """Every registered eval type, sorted (imports every module of ``fmjax/evals``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for module in pkgutil.iter_modules([here]):
        importlib.import_module(f"{__package__}.{module.name}")
    return sorted(_REGISTRY)


def get(type_name, where: str = "type"):
    """The evaluator class of ``type_name``; ``where`` names the config key in the error."""
    if isinstance(type_name, str) and type_name not in _REGISTRY and type_name.isidentifier():
        module = f"{__package__}.{type_name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but one of its imports does not: a real error
                raise
    if type_name not in _REGISTRY:
        raise ConfigError(f"{where}={type_name!r}; valid: {names()}.")
    return _REGISTRY[type_name]
