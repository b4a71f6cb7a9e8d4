"""Examples that cannot be read: one-line ``DataError``s, and an optional budget of skipped ones.

A source raises :class:`BadExampleError` (a ``fmjax.errors.DataError``) for an example it cannot
read: a corrupt, truncated or missing image file, a TFDS record that does not decode. The
message names the file (or dataset, split and index) and the fix; the launchers print it as one
``fmjax: error:`` line with exit code 2.

``config.data.skip_bad_examples=N`` (``sources.get_source(..., skip_bad_examples=N)``) wraps the
source in :class:`SkipBadExamples`: up to ``N`` distinct unreadable examples are each replaced
by the next readable one (index ``i+1``, ``i+2``, ... wrapping around), with a one-line warning
on stderr naming the file. The substitute depends only on the index, so batch shapes and
resumes stay deterministic. The budget is counted per process (and per grain worker process,
each holding its own copy of the source); it restarts with every run. Past it, the next
unreadable example is a ``DataError``.
"""
from __future__ import annotations

import sys
import threading

from fmjax.errors import ConfigError, DataError

SKIP_FLAG = "--config.data.skip_bad_examples"


class BadExampleError(DataError):
    """Example ``what`` (e.g. ``image /data/x.png``) cannot be read because of ``reason``;
    ``fix`` says what the user can do about it (besides skipping it)."""

    def __init__(self, what: str, reason: str, fix: str):
        self.what, self.reason, self.fix = what, " ".join(str(reason).split()), fix
        super().__init__(f"unreadable {what} ({self.reason}): {fix}, or set {SKIP_FLAG}=N to skip "
                         "up to N unreadable examples (each replaced by the next readable one)")

    def __reduce__(self):  # picklable across grain worker processes
        return (self.__class__, (self.what, self.reason, self.fix))


def check_budget(skip_bad_examples) -> int:
    """``skip_bad_examples`` as an int >= 0; anything else is a ConfigError."""
    if isinstance(skip_bad_examples, bool) or not isinstance(skip_bad_examples, (int, float)) \
            or skip_bad_examples < 0 or int(skip_bad_examples) != skip_bad_examples:
        raise ConfigError(f"config.data.skip_bad_examples={skip_bad_examples!r}: use a whole number "
                          ">= 0 (0, the default, stops at the first unreadable example).")
    return int(skip_bad_examples)


class SkipBadExamples:
    """``source[i]``, with up to ``max_bad`` distinct unreadable examples replaced by the next
    readable one. Other attributes (``paths``, ``class_names``, ...) are the source's."""

    def __init__(self, source, max_bad: int):
        self.source = source
        self.max_bad = check_budget(max_bad)
        self._bad = {}  # index -> what, in the order met
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):
        if name.startswith("_") or name in ("source", "max_bad"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"SkipBadExamples({self.source!r}, max_bad={self.max_bad})"

    def __getitem__(self, index):
        index = int(index)
        n = len(self.source)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:  # known bad: not read again
                continue
            try:
                return self.source[j]
            except BadExampleError as e:
                self._skip(j, e)
        raise DataError(f"no readable example in {self.source!r}: every one of its {n} examples "
                        "failed to decode; check the files (and their format) or the dataset path.")

    def _skip(self, index: int, error: BadExampleError):
        with self._lock:
            if index in self._bad:
                return
            if len(self._bad) >= self.max_bad:
                skipped = list(self._bad.values())
                shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
                raise DataError(
                    f"unreadable {error.what} ({error.reason}), and config.data.skip_bad_examples="
                    f"{self.max_bad} unreadable examples were already skipped"
                    + (f" ({shown})" if skipped else "")
                    + f": {error.fix}, or raise {SKIP_FLAG}.") from None
            self._bad[index] = error.what
            # One write of the whole line, under the lock: grain's reader threads can skip two
            # examples at once, and print()'s separate writes of text and newline interleave.
            sys.stderr.write(f"fmjax: warning: skipping unreadable {error.what} ({error.reason}); "
                             f"example {index} is replaced by the next readable one ({len(self._bad)} "
                             f"of config.data.skip_bad_examples={self.max_bad})\n")
            sys.stderr.flush()


def skip_bad_examples(source, max_bad):
    """``source`` itself when ``max_bad`` is 0, else ``SkipBadExamples(source, max_bad)``."""
    max_bad = check_budget(max_bad)
    return SkipBadExamples(source, max_bad) if max_bad else source
