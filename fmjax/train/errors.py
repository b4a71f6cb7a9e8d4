"""Turns expected user errors into one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys
import traceback

from fmjax.errors import ConfigError, DataError, NonFiniteError, WorkdirBusyError
from fmjax.train.checkpoint import IncompatibleCheckpointError

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, IncompatibleCheckpointError, FileNotFoundError,
               FloatingPointError, NonFiniteError, WorkdirBusyError)


EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def run_with_clean_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as e:  # Ctrl-C: the loop saved the step (its message says) or had none
        if os.environ.get("FMJAX_TRACEBACK"):
            traceback.print_exc()
        msg = getattr(e, "message", None) or ("interrupted (Ctrl-C); the checkpoints already committed "
                                              "are kept; run the same command to resume.")
        print(f"fmjax: {msg}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as e:
        if os.environ.get("FMJAX_TRACEBACK"):
            traceback.print_exc()
        msg = " ".join(str(e).split())  # one line
        print(f"fmjax: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
