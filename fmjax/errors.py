"""Error types for bad input, importable from every layer (data, models, train, launch).

Each describes something the user can fix; the launchers print its message as one line
(``fmjax: error: ...``) and exit with code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value, flag or combination that cannot work; raised before anything is written."""


class DataError(ValueError):
    """An input example that cannot be read (a corrupt image, a bad captions line, mixed sizes)."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, parameter or output that is NaN or infinite."""


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir's lock."""
