"""Joining a multi-process run through ``jax.distributed`` (JAX's own runtime, nothing home-made).

One process per host (or per GPU) calls :func:`initialize` before anything touches a JAX device;
afterwards ``jax.devices()`` lists the devices of every process and one mesh spans them all.

Local fake CPU devices: each process gets as many as JAX's own ``JAX_NUM_CPU_DEVICES`` environment
variable says (read when ``jax`` is imported; ``experiments.launch_parallel --devices-per-process``
sets it). CPU processes talk through gloo collectives.

Failures never hang silently: if the coordinator is unreachable or not every process joins within
``--dist.timeout-s``, the process prints what went wrong and exits with :data:`EXIT_TIMEOUT`. A
process that dies later stops sending heartbeats; JAX then aborts every other process within
``min(--dist.timeout-s, 100)`` seconds ("the JAX distributed service detected fatal errors"). A
process that fails alone (inside :func:`leave_on_error`) leaves after a few seconds instead of
waiting at exit for processes stuck in a collective with it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading

import jax

from studyrec.errors import EXIT_FAILED, EXIT_TIMEOUT, exit_code
from studyrec.config import DistConfig

logger = logging.getLogger("studyrec.train")

"""Exit code of a process that could not join the run in time (as ``timeout(1)``)."""

_HEARTBEAT_S = 100  # JAX's defaults
_SHUTDOWN_S = 300
_LEAVE_WAIT_S = 10
_failure: BaseException | None = None


def _validate(config: DistConfig) -> bool:
    """Whether the flags ask for ``jax.distributed``; raises on an inconsistent mix."""
    manual = config.coordinator_address is not None or config.num_processes is not None or config.process_id is not None
    if not (config.auto or manual):
        return False
    if config.auto and manual:
        raise ValueError("use either --dist.auto or the manual --dist.* flags, not both")
    if manual:
        if config.coordinator_address is None or config.num_processes is None or config.process_id is None:
            raise ValueError(
                "a manual launch needs --dist.coordinator-address, --dist.num-processes and --dist.process-id"
            )
        host, _, port = config.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist.coordinator-address {config.coordinator_address!r} is not host:port")
        if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
            raise ValueError(
                f"--dist.process-id {config.process_id} is not in [0, --dist.num-processes {config.num_processes})"
            )
    if config.timeout_s < 1:
        raise ValueError(f"--dist.timeout-s {config.timeout_s} must be at least 1")
    return True


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _join_failure(config: DistConfig) -> str:
    if config.auto:
        return (
            f"could not join the multi-process run detected from the environment within --dist.timeout-s "
            f"{config.timeout_s}: the coordinator is unreachable or some process never started"
        )
    who = f"process {config.process_id} of {config.num_processes}"
    if config.process_id != 0 and not reachable(config.coordinator_address):
        return (
            f"{who} could not reach the coordinator at {config.coordinator_address} within --dist.timeout-s "
            f"{config.timeout_s}: is process 0 running, and is that host:port right and open?"
        )
    return (
        f"{who}: not every process joined the run at {config.coordinator_address} within --dist.timeout-s "
        f"{config.timeout_s}; check that all {config.num_processes} processes started with the same "
        f"--dist.coordinator-address and --dist.num-processes and distinct --dist.process-id"
    )


class _Watchdog:
    """Exits the process with a clear message if the block takes longer than ``timeout_s``.

    ``jax.distributed.initialize`` blocks in C++ (with the GIL released) and, on its own deadline,
    aborts the process with a stack trace; this fires first and says what went wrong.
    """

    def __init__(self, timeout_s: float, message):
        self._timer = threading.Timer(timeout_s, self._fire, args=(message,))
        self._timer.daemon = True

    @staticmethod
    def _fire(message) -> None:
        print(f"error: {message()}", file=sys.stderr, flush=True)
        os._exit(EXIT_TIMEOUT)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def initialize(config: DistConfig) -> None:
    """Initialises ``jax.distributed`` when the config asks for it; a no-op for one process.

    Must run before any JAX computation (JAX raises otherwise). Exits with :data:`EXIT_TIMEOUT` and
    a one-line explanation if the run cannot be joined within ``config.timeout_s`` seconds.
    """
    if not _validate(config) or jax.distributed.is_initialized():
        return
    # CPU devices need a collectives backend to talk across processes; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        # JAX's own deadline is a little later than ours, so the watchdog explains the failure.
        initialization_timeout=config.timeout_s + 30,
        heartbeat_timeout_seconds=min(config.timeout_s, _HEARTBEAT_S),
        # How long a finished process waits at exit for the others (process 0 writes the final files last).
        shutdown_timeout_seconds=max(config.timeout_s, _SHUTDOWN_S),
    )
    if not config.auto:
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = list(config.local_device_ids)
    where = "from the environment" if config.auto else f"at {config.coordinator_address}"
    logger.info("joining the multi-process run %s (timeout %d s)", where, config.timeout_s)
    with _Watchdog(config.timeout_s, lambda: _join_failure(config)):
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:
            if config.auto:
                raise ValueError(f"--dist.auto found no cluster it knows (SLURM, Open MPI, TPU, ...): {e}") from None
            raise
        # Connecting is not enough: the first device query builds the global topology with every process.
        devices = jax.devices()
    atexit.register(_leave_if_failed)  # runs before JAX's own exit handler, which was registered first
    logger.info(
        "process %d of %d: %d local of %d %s devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), len(devices), devices[0].platform,
    )


@contextlib.contextmanager
def leave_on_error():
    """Lets a process that fails on its own leave the run at exit instead of waiting for the others.

    At exit, JAX waits (up to its shutdown timeout) until every process arrives. After an error
    that every process meets together (bad data, a stop request) they all arrive and exit normally.
    After an error on this process alone, the others are stuck in a collective and never arrive:
    this process then exits after a few seconds, and JAX stops the others as soon as it notices
    (at once when process 0 left, else within the heartbeat timeout).
    """
    global _failure
    try:
        yield
    except BaseException as e:
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            _failure = e
        raise


def _exit_code(error: BaseException) -> int:
    code = exit_code(error)
    return EXIT_FAILED if code is None else code


def _leave_if_failed() -> None:
    if _failure is None:
        return
    done = threading.Event()

    def shutdown():
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        done.set()

    threading.Thread(target=shutdown, daemon=True).start()
    if done.wait(_LEAVE_WAIT_S):
        return  # every process arrived: a normal exit
    print(
        f"error: process {jax.process_index()} failed alone ({type(_failure).__name__}); leaving the run without "
        "the others, which JAX will stop",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(_exit_code(_failure))
