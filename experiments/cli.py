"""Shared command-line plumbing: tyro parsing with one-line errors, fixed exit codes, logging and the compilation cache.

Exit codes are :mod:`studyrec.errors`'s: a failure the library names gets one ``error:`` line and
its code (2 for bad input); ``--debug`` shows the traceback instead.

Compiled steps are cached across runs (a resume or a rerun starts in seconds, not a recompile), in
``$XDG_CACHE_HOME/studyrec/jax`` (``~/.cache/studyrec/jax`` when XDG_CACHE_HOME is unset); the
first log line says where. ``STUDYREC_COMPILATION_CACHE`` moves it (a folder) or turns it off
(``off``); otherwise ``JAX_COMPILATION_CACHE_DIR`` chooses the folder, as JAX's own convention.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from absl import flags as absl_flags

from studyrec.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, exit_code

T = TypeVar("T")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Grain reads absl flags; mark them parsed so it works outside absl.app.
    absl_flags.FLAGS.mark_as_parsed()
    enable_compilation_cache()
    tune_allocator()


def tune_allocator() -> None:
    """glibc's malloc set up for XLA's buffers (``return_large_buffers``, ``trim_heap_around_compiles``)."""
    return_large_buffers()
    trim_heap_around_compiles()


LARGE_BUFFER = 8 << 20
"""Bytes from which glibc serves an allocation from its own mapping (``return_large_buffers``)."""


def return_large_buffers() -> None:
    """Fixes glibc's mmap threshold at ``LARGE_BUFFER``, so freed step buffers go back to the system.

    Otherwise glibc raises the threshold after the first large free and keeps XLA's freed buffers
    in its heap: about 40 MB more peak RSS for a ``cpu-small`` run. Not glibc: nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, LARGE_BUFFER)  # M_MMAP_THRESHOLD


COMPILED = "/jax/core/compile/backend_compile_duration"
"""JAX's monitoring event at the end of each XLA compilation."""

LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
"""JAX's monitoring event at the end of each lowering to MLIR, just before XLA compiles the module."""


TRIM_AFTER_S = 1.0
"""Compilations at least this long are followed by a heap trim (``trim_heap_around_compiles``)."""

TRIM_BEFORE_S = 0.25
"""Lowerings at least this long (a large program) are followed by a heap trim, before XLA compiles."""


@functools.cache  # one listener per process, however often the CLI is set up
def trim_heap_around_compiles() -> None:
    """Hands glibc's free heap back to the system around each large XLA compilation.

    Compiling the ``cpu-small`` train step takes about 500 MB of small allocations. They are freed
    when it ends, but glibc keeps them in its heap, so the whole run stays that much larger: the
    heap is trimmed after each compilation of a second or more. It is trimmed before one too, once a
    lowering of a quarter second or more announces a large program, so the compiler starts from
    the smallest process (the eager compilations of the model's initialisation free about 90 MB
    when ``studyrec.train`` clears JAX's caches). Short compilations free little: trimming after
    each of the quick start's 62 made its compilations 3-4 s slower in all, against 3 trims after
    the long ones. Not glibc: nothing to do.
    """
    import jax.monitoring

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return

    def around_compile(event: str, duration: float, **kwargs) -> None:
        if (event == COMPILED and duration >= TRIM_AFTER_S) or (event == LOWERED and duration >= TRIM_BEFORE_S):
            trim(0)

    jax.monitoring.register_event_duration_secs_listener(around_compile)


OFF = ("off", "0", "false", "no", "none")
"""Values of ``STUDYREC_COMPILATION_CACHE`` and ``STUDYREC_HUGE_PAGES`` that turn them off."""

HUGE_PAGES = "glibc.malloc.hugetlb=1"
"""The glibc tunable that has malloc ask the kernel for transparent huge pages (glibc 2.35 on)."""

THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
"""The kernel's transparent huge page mode: ``[madvise]`` gives them to the processes that ask."""


def restart_with_huge_pages() -> None:
    """Runs this command again in place (``exec``: same PID, nothing done yet) with ``HUGE_PAGES`` in
    ``GLIBC_TUNABLES``, where glibc reads it: at start.

    XLA's CPU executables allocate their scratch buffer afresh each step. In 4 KiB pages a ``cpu-small``
    step took 73,000 page faults; in huge pages 7,000, and the step 16-18% less time. Nothing happens
    outside glibc 2.35+ on Linux, when the kernel gives huge pages to every process anyway or to none,
    when ``GLIBC_TUNABLES`` already names the tunable, or with ``STUDYREC_HUGE_PAGES=off``. Call it
    first thing in a ``__main__`` block, never from a library.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("STUDYREC_HUGE_PAGES", "").lower() in OFF or "glibc.malloc.hugetlb" in tunables:
        return
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open(THP_MODE) as f:
            mode = f.read()
    except (AttributeError, ValueError, OSError):
        return
    if name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35) or "[madvise]" not in mode:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def compilation_cache_dir(environ: dict[str, str] | None = None) -> str | None:
    """Where compiled steps are cached, or None when ``STUDYREC_COMPILATION_CACHE`` turns it off."""
    env = os.environ if environ is None else environ
    chosen = env.get("STUDYREC_COMPILATION_CACHE", "").strip()
    if chosen.lower() in OFF and chosen:
        return None
    if chosen:
        return os.path.expanduser(chosen)
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    xdg = env.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # the XDG rule
    return os.path.join(base, "studyrec", "jax")


def enable_compilation_cache() -> None:
    """Caches compiled steps where ``compilation_cache_dir`` says (or nowhere), and logs where."""
    import jax

    folder = compilation_cache_dir()
    log = logging.getLogger("studyrec")
    if folder is None:
        jax.config.update("jax_compilation_cache_dir", None)  # JAX reads JAX_COMPILATION_CACHE_DIR itself
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("compiled steps are not cached (STUDYREC_COMPILATION_CACHE=off)")
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    # Every computation, however quick to compile: the model's initialisation compiles dozens of small
    # ones, and loading them instead keeps about 40 MB of compiler memory off a rerun's peak.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    log.info("compiled steps are cached in %s; set STUDYREC_COMPILATION_CACHE to another folder to move it, "
             "or to off to disable it", folder)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RULE = re.compile(r"^[\s─━═╌┄-]*$")


def summarise_tyro_error(box: str) -> str:
    """tyro's error box as one line: its first section, plus a "did you mean" when it has one.

    tyro draws a framed box with the title in the top border, or (output not UTF-8) the title on
    a line of its own above a rule; both read the same here.
    """
    box = _ANSI.sub("", box)
    sections: list[list[str]] = [[]]
    for raw in box.splitlines():
        line = raw.strip().strip("│┃|").strip()
        if line.startswith(("╭", "╰", "┏", "┗")):
            continue
        if _RULE.match(line):
            sections.append([])
        else:
            sections[-1].append(line)
    sections = [" ".join(s).strip() for s in sections if s]
    if "╭" not in box and len(sections) > 1:
        sections = sections[1:]  # the title
    if not sections:
        return "the command line could not be parsed"
    message = sections[0]
    for section in sections[1:]:
        if section.startswith("Perhaps you meant:"):
            flag = re.search(r"--[\w.-]+", section)
            if flag:
                message += f"; did you mean {flag.group(0)}?"
    return message


def parse_flags(
    config_type: type[T], *, default: T, args: Sequence[str], prog: str, markers: Sequence = (), hint: str = ""
) -> T:
    """``tyro.cli``, except that a rejected command line prints one ``error:`` line and exits 2.

    With ``--debug`` among ``args``, tyro's full error box is printed as well.
    """
    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            config = tyro.cli(config_type, default=default, args=list(args), prog=prog, config=tuple(markers) or None)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        if "--debug" in args:
            sys.stderr.write(captured.getvalue())
        print(f"error: {summarise_tyro_error(captured.getvalue())} ({hint}{'; ' if hint else ''}see {prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.stderr.write(captured.getvalue())  # warnings from a successful parse
    return config


def _close_progress_bars() -> None:
    """Ends open tqdm bars, so that a message starts on a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def run_cli(main: Callable[[], object], debug: bool) -> None:
    """Runs ``main`` and maps failures to the exit codes above; ``debug`` re-raises with the traceback."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - sorted by exit_code; anything else propagates
        code = exit_code(e)
        _close_progress_bars()
        if debug or code is None:
            raise
        hint = "; rerun with --debug for the traceback" if code == EXIT_FAILED else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(code)
