"""Command-line flag parsing shared by the ``launch/`` scripts.

``app.run(main, flags_parser=fmjax.cli.parse_flags)`` turns a bad ``--config`` override
(an unknown key, a value of the wrong type) into the project's one-line error
(``fmjax: error: ...`` on stderr, exit code 2) instead of a traceback or absl's
"FATAL Flags parsing error" with exit code 1. Imports nothing heavy (no jax).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

from absl import flags

EXIT_BAD_INPUT = 2
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def config_path(spec: str) -> str:
    """The file of ``--config=FILE[:preset]`` (ml_collections' ``config_filename`` keeps the preset)."""
    path, sep, preset = spec.rpartition(":")
    return path if sep and path.endswith(".py") and "/" not in preset else spec


def _fail(msg: str):
    print(f"fmjax: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def _last_line(err: Exception) -> str:
    """The message of ``err`` without an embedded traceback (ml_collections nests one)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    return " ".join(lines)


def _load_config(argv: list[str]):
    """The config named by ``--config=FILE[:preset]`` in ``argv``, loaded without overrides."""
    spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    path = config_path(spec)
    preset = spec[len(path) + 1:]
    module_spec = importlib.util.spec_from_file_location("_fmjax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def _valid_keys(argv: list[str], path: list[str]) -> str:
    """Keys of the config at ``path`` (the parent of the unknown key), or ''."""
    try:
        node = _load_config(argv)
        for key in path:
            node = node[key]
        return ", ".join(sorted(node.keys()))
    except Exception:  # the config itself may not have loaded; the message still names the flag
        return ""


def _unknown_key_message(argv: list[str], err: Exception) -> str:
    text = str(err).replace("\\", "")  # "'widht'" or a repr of "'widht'\nDid you mean ..."
    found = re.search(r"'([\w-]+)'", text)
    missing = found.group(1) if found else ""
    close = re.search(r'Did you mean "([\w-]+)"', text)
    for arg in argv:
        m = re.match(r"--(config(?:\.[\w-]+)+)(=|$)", arg)
        if not m:
            continue
        parts = m.group(1).split(".")
        if missing in parts[1:]:
            idx = parts.index(missing, 1)
            where = ".".join(parts[:idx])
            valid = _valid_keys(argv, parts[1:idx])
            hint = f"; did you mean {close.group(1)!r}?" if close else ""
            hint += f"; valid keys of {where}: {valid}" if valid else ""
            return (f"unknown config key {'.'.join(parts[:idx + 1])!r} in {arg.split('=')[0]}{hint} "
                    "(check the spelling, or add the key to the config file).")
    return f"bad --config override: {err}."


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: parses ``argv``; bad flags end with one line and exit code 2."""
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:  # absl's --help / --helpshort / --helpfull print, then exit 1
        if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.stdout.flush()
            sys.exit(0)
        raise
    except flags.Error as e:
        _fail(f"{_last_line(e)} (see --helpshort).")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no config field
        _fail(_unknown_key_message(argv, e.args[0] if e.args else e))
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        path = config_path(flags.FLAGS["config"].config_filename)
        if not os.path.isfile(path):
            _fail(f"config file {path!r} not found (give its path, e.g. "
                  f"--config=configs/mae.py, relative to {os.getcwd()}).")
        try:  # the config file is loaded lazily; a missing file or unknown preset fails here
            flags.FLAGS.config.keys()
        except (OSError, ValueError) as e:
            _fail(f"cannot load --config={path}: {_last_line(e)}")
    return rest
