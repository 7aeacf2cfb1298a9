"""What can go wrong, and the exit code each failure gets, shared by the library and its CLIs.

Exit codes: 0 done; 1 an operating-system failure such as a full disk; 2 bad input, a flag or a
file (one ``error:`` line: what, where, how to fix it); 3 training diverged (a non-finite loss; the
last good checkpoint is kept); 124 processes of a multi-host run did not all join in time; 130
stopped by SIGINT or SIGTERM (during training, after saving a checkpoint).
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Bad input (``DataError`` and ``ConfigError`` are ValueErrors): exit code 2."""


def exit_code(error: BaseException) -> int | None:
    """The exit code for an error that deserves one line, or None for a bug (shown as a traceback)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, TrainingError):
        return EXIT_DIVERGED
    if isinstance(error, BAD_INPUT):
        return EXIT_BAD_INPUT
    if isinstance(error, OSError):
        return EXIT_FAILED
    return None
