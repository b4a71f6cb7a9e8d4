"""The ``metrics`` eval type: the objective's per-example ``eval_metrics`` averaged over a split."""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.evals import common, registry


@registry.register("metrics")
class MetricsEvaluator(common.SeededEvaluator):
    """``eval/<name>_<metric>``: each of ``objective.eval_metrics(params, extra, batch, rng)``'s
    per-example values averaged over ``split`` (padding excluded); batch ``i`` uses the rng
    ``fold_in(PRNGKey(seed), i)`` (``seed``, default 1234). An objective's
    ``eval_metric_ratios = {name: (numerator, denominator)}`` adds ``eval/<name>_<name>``, the
    ratio of those two split means (e.g. the dVAE's reconstruction over its baseline MSE)."""

    requires = {"eval_metrics": "eval_metrics"}

    def run(self, state, step, writer):
        fn = self.ctx.jit("eval_metrics")
        sums, count = {}, 0
        with self.ctx.scope():
            for batch, valid, rng in self.seeded_batches():
                values = fn(state.params, state.extra, batch, rng)
                if jax.process_count() > 1:
                    values = multihost_utils.process_allgather(values, tiled=True)
                    valid = multihost_utils.process_allgather(valid, tiled=True)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(np.asarray(v)[valid].sum())
                count += int(valid.sum())
        out = {k: v / max(count, 1) for k, v in sums.items()}
        for k, (num, den) in (getattr(self.ctx.objective, "eval_metric_ratios", None) or {}).items():
            if num in out and den in out and out[den] > 0:
                out[k] = out[num] / out[den]
        return out
