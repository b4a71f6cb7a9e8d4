"""The ``loss`` eval type: the objective's loss on a held-out split with a fixed rng."""
from __future__ import annotations

from fmjax.errors import ConfigError
from fmjax.evals import common, registry


@registry.register("loss")
class LossEvaluator(common.SeededEvaluator):
    """``eval/<name>``: the mean of the objective's loss over the full batches of ``split``
    (the padded tail batch is skipped: a mean over it would be biased); batch ``i`` uses the
    rng ``fold_in(PRNGKey(seed), i)`` (``seed``, default 1234). ``examples`` fewer than one
    batch is a one-line ConfigError at the check (it reported a loss of 0.0 before); a split
    that turns out shorter than one batch is the same error when the eval runs."""

    @classmethod
    def check_options(cls, where, ev, config, objective):
        super().check_options(where, ev, config, objective)
        batch = ev.get("batch_size") or config.batch_size
        examples = ev.get("examples")
        if examples and common.is_int(batch) and examples < batch:
            raise ConfigError(_too_few(where, f"examples={examples}", batch))

    def run(self, state, step, writer):
        loss_fn = self.ctx.jit("loss")
        total, count = 0.0, 0
        with self.ctx.scope():
            for batch, valid, rng in self.seeded_batches():
                if not valid.all():  # padded tail batch
                    continue
                loss = loss_fn(state.params, state.extra, batch, rng, state.step)
                total, count = total + float(loss), count + 1
        if not count:
            raise ConfigError(_too_few(self.where, f"split {self.split!r} of {self.dataset!r} has "
                                       f"{len(self.source())} examples", self.batch_size))
        return {"": total / count}


def _too_few(where: str, what: str, batch: int) -> str:
    return (f"{where}: {what}, fewer than one full batch of {batch} (the loss eval skips the padded "
            f"tail batch, so it would average nothing); raise {where}.examples to at least {batch} "
            f"or set {where}.batch_size to at most that many.")
