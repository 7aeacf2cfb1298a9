"""Shared command-line plumbing: presets under tyro, and clean errors with exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from absl import flags as absl_flags

EXIT_BAD_INPUT = 2


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Grain reads absl flags; mark them parsed so it works outside absl.app.
    absl_flags.FLAGS.mark_as_parsed()


def preset_from_argv(argv: list[str], default: str = "default") -> str:
    """The value of ``--preset`` (either spelling), read before tyro so it can set the defaults."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return default


def run_cli(main: Callable[[], object], debug: bool) -> None:
    """Runs ``main``; bad input exits with code 2 and one clear message (a traceback with --debug)."""
    from studyrec.data.io import DataError

    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except (DataError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
