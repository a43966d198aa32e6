"""What every absl entrypoint shares."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app

HELP_FLAGS = {"-h", "--help", "--helpshort", "--helpfull"}


def run_app(main: Callable) -> None:
    """`absl.app.run(main)`, except that asking for help exits 0 (absl exits 1 after it)."""
    try:
        app.run(main)
    except SystemExit as exit_:
        asked_help = HELP_FLAGS & set(sys.argv[1:])
        raise SystemExit(0 if asked_help and exit_.code == 1 else exit_.code) from None
