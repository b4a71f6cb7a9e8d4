"""The ``loss`` eval type: the objective's loss on a held-out split with a fixed rng."""
from __future__ import annotations

from fmjax.evals import common, registry


@registry.register("loss")
class LossEvaluator(common.SeededEvaluator):
    """``eval/<name>``: the mean of the objective's loss over the full batches of ``split``
    (the padded tail batch is skipped: a mean over it would be biased); batch ``i`` uses the
    rng ``fold_in(PRNGKey(seed), i)`` (``seed``, default 1234)."""

    def run(self, state, step, writer):
        loss_fn = self.ctx.jit("loss")
        total, count = 0.0, 0
        with self.ctx.scope():
            for batch, valid, rng in self.seeded_batches():
                if not valid.all():  # padded tail batch
                    continue
                loss = loss_fn(state.params, state.extra, batch, rng, state.step)
                total, count = total + float(loss), count + 1
        return {"": total / max(count, 1)}
