"""The base of every host-side transform (see ``fmjax.data.transforms``)."""
from typing import Any, Dict

import numpy as np

Example = Dict[str, Any]


class Transform:
    """Base class: ``__call__(example, rng) -> example`` (a new dict)."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
