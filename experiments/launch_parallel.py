"""N local processes of one multi-process job: ``python -m experiments.launch_parallel --num-processes 2 -- <flags>``.

Starts ``python -m experiments.train <train flags> --dist.coordinator-address 127.0.0.1:<free port>
--dist.num-processes N --dist.process-id i`` for ``i = 0 .. N-1``, so that all of them form one JAX
runtime with one mesh over every process's devices:

- with GPUs, each process sees its own ``--devices-per-process`` GPUs (``CUDA_VISIBLE_DEVICES``);
- on CPU, each process gets ``--devices-per-process`` fake CPU devices (``JAX_NUM_CPU_DEVICES``)
  and the processes talk through gloo collectives.

Every line a process prints comes out prefixed with ``[i]``. When one process fails, the others are
stopped (SIGTERM, then SIGKILL after ``--grace-s``) and the launcher exits with the failing
process's exit code. SIGINT/SIGTERM to the launcher are passed on, so the job checkpoints and stops.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Literal

import tyro

from experiments.cli import EXIT_BAD_INPUT

EXIT_STOPPED = 130  # a process stopped by SIGINT/SIGTERM after its checkpoint (experiments.train)

# Flags the launcher fills in itself; giving them too would make processes disagree.
_RESERVED = ("--dist.auto", "--dist.coordinator-address", "--dist.num-processes", "--dist.process-id",
             "--dist.local-device-ids")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Start N local processes of a studyrec job as one ``jax.distributed`` run."""

    num_processes: int
    """Processes to start (on GPUs: at most the GPUs visible divided by --devices-per-process)."""
    devices_per_process: int = 1
    """GPUs per process, or fake CPU devices per process on CPU."""
    platform: Literal["auto", "cpu", "gpu"] = "auto"
    """gpu when nvidia-smi lists GPUs (auto), else cpu."""
    port: int | None = None
    """Coordinator port on 127.0.0.1 (default: a free one)."""
    module: str = "experiments.train"
    """The entry point each process runs with ``python -m``."""
    grace_s: float = 10.0
    """Seconds the other processes get to exit after SIGTERM before SIGKILL, once one has failed."""


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher flags before ``--``, forwarded flags after it."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check_forwarded(flags: list[str]) -> None:
    for flag in flags:
        name = flag.split("=", 1)[0].replace("_", "-")
        if name in _RESERVED:
            raise ValueError(f"{flag} cannot be forwarded: the launcher sets up the processes itself "
                             f"(--dist.auto is for schedulers such as SLURM; see docs)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """GPU ids this launcher may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else what nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def process_envs(cfg: LaunchConfig, base: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each process: its devices, unbuffered output."""
    base = dict(os.environ if base is None else base)
    base["PYTHONUNBUFFERED"] = "1"
    if cfg.num_processes < 1 or cfg.devices_per_process < 1:
        raise ValueError("--num-processes and --devices-per-process must be at least 1")
    gpus = visible_gpus() if cfg.platform != "cpu" else []
    if cfg.platform == "gpu" and not gpus:
        raise ValueError("--platform gpu, but no GPU is visible (nvidia-smi / CUDA_VISIBLE_DEVICES)")
    envs = []
    if gpus:
        need = cfg.num_processes * cfg.devices_per_process
        if need > len(gpus):
            raise ValueError(f"{cfg.num_processes} processes x {cfg.devices_per_process} GPUs need {need} GPUs; "
                             f"{len(gpus)} are visible")
        for i in range(cfg.num_processes):
            own = gpus[i * cfg.devices_per_process:(i + 1) * cfg.devices_per_process]
            envs.append({**base, "CUDA_VISIBLE_DEVICES": ",".join(own)})
    else:
        for _ in range(cfg.num_processes):
            envs.append({**base, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(cfg.devices_per_process)})
    return envs


def commands(cfg: LaunchConfig, forwarded: list[str], port: int) -> list[list[str]]:
    return [
        [sys.executable, "-u", "-m", cfg.module, *forwarded,
         "--dist.coordinator-address", f"127.0.0.1:{port}",
         "--dist.num-processes", str(cfg.num_processes),
         "--dist.process-id", str(i)]
        for i in range(cfg.num_processes)
    ]


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, so no process is left behind (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_PIECE = re.compile(rb"[^\r\n]*[\r\n]")


def _pump(source, sink, prefix: bytes, lock: threading.Lock) -> None:
    """Copies ``source`` to ``sink`` a line (or a ``\\r``-ended progress update) at a time, prefixed."""
    pending = b""
    while chunk := source.read1(65536):
        pending += chunk
        pieces = _PIECE.findall(pending)
        pending = pending[sum(map(len, pieces)):]
        pieces = [prefix + piece for piece in pieces if piece != b"\r"]  # tqdm starts each update with \r
        if pieces:
            with lock:
                sink.write(b"".join(pieces))
                sink.flush()
    if pending:
        with lock:
            sink.write(prefix + pending + b"\n")
            sink.flush()


class Launcher:
    """Starts the processes, streams their output, and stops all of them when one fails."""

    def __init__(self, cmds: list[list[str]], envs: list[dict[str, str]], grace_s: float = 10.0):
        self.cmds, self.envs, self.grace_s = cmds, envs, grace_s
        self.procs: list[subprocess.Popen] = []
        self.signalled: int | None = None
        self._lock = threading.Lock()

    def _say(self, message: str) -> None:
        with self._lock:
            sys.stderr.buffer.write(f"[launch] {message}\n".encode())
            sys.stderr.buffer.flush()

    def _send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum, frame) -> None:
        if self.signalled is None:
            self.signalled = signum
            self._say(f"got signal {signum}; passing it on (again to kill)")
            self._send(signum)
        else:
            self._send(signal.SIGKILL)

    def _wait(self, seconds: float) -> bool:
        """Whether every process ended within ``seconds``."""
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        return all(p.poll() is not None for p in self.procs)

    def _stop_all(self, wait_first: bool = False) -> None:
        """SIGTERM to the processes still running (after ``grace_s`` if ``wait_first``), SIGKILL ``grace_s`` later."""
        if wait_first and self._wait(self.grace_s):
            return
        self._send(signal.SIGTERM)
        if not self._wait(self.grace_s):
            self._say(f"killing the processes still running after {self.grace_s:g} s")
            self._send(signal.SIGKILL)

    def run(self) -> int:
        """Runs every process to the end; returns 0, or the exit code of the first that failed."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        pumps = []
        try:
            linux = sys.platform.startswith("linux")
            for cmd, env in zip(self.cmds, self.envs):
                self.procs.append(subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                    preexec_fn=_die_with_parent if linux else None,
                ))
            for i, p in enumerate(self.procs):
                prefix = f"[{i}] ".encode()
                for source, sink in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
                    t = threading.Thread(target=_pump, args=(source, sink, prefix, self._lock), daemon=True)
                    t.start()
                    pumps.append(t)
            failed: tuple[int, int] | None = None
            while [p.poll() for p in self.procs].count(None):  # polls every process (any() would stop early)
                if failed is None:
                    for i, p in enumerate(self.procs):
                        if p.returncode not in (None, 0):
                            failed = (i, p.returncode)
                            if self.signalled is None:
                                self._say(f"process {i} exited with code {p.returncode}; stopping the others")
                                # 130: a stop request, which every process follows after saving together.
                                self._stop_all(wait_first=p.returncode == EXIT_STOPPED)
                            break
                time.sleep(0.1)
            if failed is None:
                failed = next(((i, p.returncode) for i, p in enumerate(self.procs) if p.returncode), None)
        finally:
            if any(p.poll() is None for p in self.procs):  # an exception in the launcher itself
                self._send(signal.SIGKILL)
            for s, handler in previous.items():
                signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)
        if failed is None:
            return 0
        code = failed[1]
        return code if code > 0 else 128 - code  # killed by a signal: the shell's convention


def main(argv: list[str] | None = None) -> None:
    own, forwarded = split_argv(sys.argv[1:] if argv is None else argv)
    cfg = tyro.cli(LaunchConfig, args=own, prog="python -m experiments.launch_parallel",
                   description="Starts N local processes of one multi-process job; the flags after -- go to each "
                               "(python -m experiments.launch_parallel --num-processes 2 -- --steps 100).")
    try:
        check_forwarded(forwarded)
        envs = process_envs(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    port = cfg.port or free_port()
    sys.exit(Launcher(commands(cfg, forwarded, port), envs, cfg.grace_s).run())


if __name__ == "__main__":
    main()
