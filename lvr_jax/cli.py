"""What every absl entrypoint shares: help exits 0, a bad flag exits 2 with a one-line message."""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags
from ml_collections.config_flags.config_flags import is_config_flag  # meant for users

HELP_FLAGS = {"-h", "--help", "--helpshort", "--helpfull"}
USAGE_ERROR = 2  # argparse's exit status for a bad command line
# `--config.optim.lr=1` (or `--noconfig.x`): group 1 is the key path, here "optim.lr".
_OVERRIDE = re.compile(r"^--?(?:no)?[A-Za-z_]\w*\.([^=\s]+)")


class CommandLineError(ValueError):
    """A run the flags or config ask for that cannot go ahead; `run_app` reports it in one line."""


def run_app(main: Callable, define_flags: Optional[Callable[[], None]] = None) -> None:
    """`absl.app.run(main)`, except that asking for help exits 0 (absl exits 1 after it) and
    a bad flag, config file or config override, or a CommandLineError from `main`, exits 2
    with one line on stderr.

    Pass `define_flags` to have it run here: a config flag whose file is not on the command
    line parses its default file, and the overrides, as it is defined.
    """
    try:
        if define_flags is not None:
            _explained(define_flags, sys.argv)
        app.run(functools.partial(_run_main, main), flags_parser=parse_flags)
    except SystemExit as exit_:
        asked_help = HELP_FLAGS & set(sys.argv[1:])
        raise SystemExit(0 if asked_help and exit_.code == 1 else exit_.code) from None


def _run_main(main: Callable, argv: list[str]):
    try:
        return main(argv)
    except CommandLineError as error:
        _exit_with_usage_error(str(error))


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (an `app.run` flags_parser) with mistakes reported in one line."""
    return _explained(lambda: _parse_and_load(argv), argv)


def _parse_and_load(argv: Sequence[str]) -> list[str]:
    remaining = flags.FLAGS(list(argv))
    for name in list(flags.FLAGS):
        if is_config_flag(flags.FLAGS[name]):
            # ml_collections defers a config file's load error to the config's first use.
            getattr(flags.FLAGS[name].value, "keys", None)
    return remaining


def _explained(parse: Callable, argv: Sequence[str]):
    """parse(), with a command-line mistake turned into `prog: error: ...` and exit 2."""
    try:
        return parse()
    except (flags.Error, OSError, KeyError, AttributeError) as error:
        message = flag_error_message(error, argv)
        if message is None:
            raise
        _exit_with_usage_error(message)


def _exit_with_usage_error(message: str) -> None:
    print(f"{_program()}: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR) from None


def flag_error_message(error: BaseException, argv: Sequence[str]) -> Optional[str]:
    """One line for an error raised while parsing `argv`; None if the command line is not
    at fault (the error is then re-raised as it was)."""
    if isinstance(error, flags.Error):
        return str(error)  # absl's own: "Unknown command line flag 'x'. Did you mean: y ?"
    if isinstance(error, OSError):
        return _config_file_message(error)
    key = _missing_key(error)
    return None if key is None else _unknown_key_message(key, str(error), argv)


def _config_file_message(error: OSError) -> Optional[str]:
    """What ml_collections could not load: a missing config file, or the OSError inside it."""
    if not isinstance(error.__cause__, OSError):  # not ml_collections' deferred load error
        return None
    cause = error.__cause__
    attempted = re.search(r"Attempted \[[^\]]*\]:\n\s*(.+)", str(cause))
    if attempted:  # ml_collections lists the paths it tried for a file that is not there
        return f"config file {attempted.group(1).strip()} not found"
    if cause.filename is not None:
        return f"loading the config failed: {cause.strerror}: {cause.filename}"
    return str(cause).splitlines()[0]


def _missing_key(error: Optional[BaseException]) -> Optional[str]:
    """The key of the innermost KeyError in the chain (ml_collections wraps it twice)."""
    key = None
    while error is not None:
        if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
            key = error.args[0]
        error = error.__context__
    return key


def _unknown_key_message(key: str, text: str, argv: Sequence[str]) -> Optional[str]:
    """`unknown config key optim.lrr (did you mean optim.lr?)`, if an override names `key`."""
    overrides = [match.group(1) for match in map(_OVERRIDE.match, argv) if match]
    path = next((p.split(".") for p in overrides if key in p.split(".")), None)
    if path is None:
        return None
    message = f"unknown config key {'.'.join(path)}"
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    if suggestion:
        path[path.index(key)] = suggestion.group(1)
        message += f" (did you mean {'.'.join(path)}?)"
    return message


def _program() -> str:
    """The name the user ran: `lvr_jax.train` for `python -m lvr_jax.train`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None:
        return os.path.basename(sys.argv[0])
    return spec.name.removesuffix(".__main__")
