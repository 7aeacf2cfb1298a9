"""How a job meets its surroundings: one job per run directory, the ``WANDB_*`` conventions, and
the compilation cache's folder (``XDG_CACHE_HOME``, ``STUDYREC_COMPILATION_CACHE``)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import baselines
from studyrec.config import WandbConfig, resolve_wandb
from studyrec.train.lock import LOCK_FILE, RunDirectoryBusy, RunDirectoryLock

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "bad"
TINY = [
    "--steps", "2", "--arch.num-layers", "1", "--arch.d-model", "16", "--arch.qkv-dim", "16", "--arch.num-heads", "2",
    "--arch.mlp-dim", "32", "--per-device-batch-size", "1", "--eval-rows", "8", "--n-recommendations", "1",
    "--train-data", str(DATA / "activity.csv"), "--valid-data", str(DATA / "valid.csv"),
    "--student-info", str(DATA / "students.csv"), "--school-info", str(DATA / "schools.csv"),
]


def child_env(**overrides: str | None) -> dict[str, str]:
    """This process's environment (PYTHONPATH included) for a child, with ``overrides`` (None unsets)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONUNBUFFERED": "1",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tests' shared cache serves every repeated step
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def train(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.train", "--output-dir", str(run), *TINY, *extra],
                          cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry's size, modification time and (files) contents, the directory itself included."""
    entries = [directory, *directory.rglob("*")]
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in entries}


# --- one job per run directory ---------------------------------------------------------------------------


HOLD = """
import sys, time
from studyrec.train.lock import RunDirectoryLock
RunDirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""

TRY = """
import sys
from studyrec.train.lock import RunDirectoryBusy, RunDirectoryLock
try:
    RunDirectoryLock(sys.argv[1]).acquire()
    print("acquired")
except RunDirectoryBusy as e:
    print("busy:", e)
"""


def python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=60, **kwargs)


def test_a_held_run_directory_is_refused_to_another_process_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunDirectoryLock(run):
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"] and holder["command"]
        refused = python(TRY, str(run))
        assert refused.stdout.startswith("busy:"), refused.stdout + refused.stderr
        assert f"pid {os.getpid()} on host " in refused.stdout and "--output-dir" in refused.stdout
    assert (run / LOCK_FILE).read_text() == ""  # released at the end of the with block, no holder named
    assert python(TRY, str(run)).stdout.strip() == "acquired"


def test_the_lock_of_a_killed_process_does_not_block_the_next(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid} "):
            RunDirectoryLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead holder's record stays
    with RunDirectoryLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunDirectoryLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "this file system has no locks" in caplog.text


def test_training_into_a_run_directory_in_use_exits_2_at_once_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    with RunDirectoryLock(run):
        before = snapshot(run)
        done = train(run)
        after = snapshot(run)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = error_lines(done.stderr)
    assert f"--output-dir {run} is in use by pid {os.getpid()} on host " in line, line
    assert "train study" not in done.stderr  # refused before the first step
    assert after == before


def test_a_baseline_into_a_run_directory_in_use_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    with RunDirectoryLock(run):
        before = snapshot(run)
        with pytest.raises(SystemExit) as exit_info:
            baselines.main(["--baseline", "popularity", "--output-dir", str(run)])
        assert exit_info.value.code == 2
        assert f"is in use by pid {os.getpid()} " in capsys.readouterr().err.strip().splitlines()[-1]
        assert snapshot(run) == before


def wait_for_holder(run: Path, pid: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first training ended before it took the lock"
        try:
            if json.loads((run / LOCK_FILE).read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no lock taken by pid {pid} within {timeout} s")


@pytest.mark.slow
def test_a_second_training_is_refused_while_the_first_runs_and_resumes_after_it_is_killed(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.train", "--output-dir", str(run), *TINY]
    first = subprocess.Popen([*command, "--steps", "1000000", "--save-every", "1000000"], cwd=ROOT, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_holder(run, first.pid, first)
        second = train(run)
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = error_lines(second.stderr)
        assert f"is in use by pid {first.pid} on host " in line and "experiments.train" in line, line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = train(run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / LOCK_FILE).read_text() == ""  # released at the end, the killed holder forgotten


# --- W&B: the WANDB_* variables apply unless a flag is given ------------------------------------------------


def test_resolve_wandb_takes_the_flag_else_the_environment_else_our_default(tmp_path):
    run = tmp_path / "my-run"
    assert resolve_wandb(WandbConfig(), run, environ={}) == WandbConfig(
        mode="offline", project="studyrec", entity=None, name="my-run", tags=(), dir=str(run))
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "p", "WANDB_ENTITY": "team", "WANDB_NAME": "n",
           "WANDB_TAGS": "a,b", "WANDB_DIR": "/somewhere"}
    assert resolve_wandb(WandbConfig(), run, environ=env) == WandbConfig(
        mode="disabled", project="p", entity="team", name="n", tags=("a", "b"), dir="/somewhere")
    flags = WandbConfig(mode="online", project="q", entity="me", name="m", tags=(), dir="/there")
    assert resolve_wandb(flags, run, environ=env) == flags
    assert resolve_wandb(WandbConfig(), run, environ={"WANDB_MODE": "dryrun"}).mode == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes' is not a W&B mode"):
        resolve_wandb(WandbConfig(), run, environ={"WANDB_MODE": "sometimes"})


def test_wandb_mode_disabled_in_the_environment_applies_unless_the_flag_says_offline(tmp_path):
    env = child_env(WANDB_MODE="disabled", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                    WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    quiet, logged = tmp_path / "quiet", tmp_path / "logged"
    done = train(quiet, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (quiet / "wandb").exists() and not (quiet / "wandb_id.txt").exists()
    assert json.loads((quiet / "config.json").read_text())["config"]["wandb"]["mode"] == "disabled"

    done = train(logged, "--wandb.mode", "offline", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (logged / "wandb").is_dir() and (logged / "wandb_id.txt").exists()
    assert json.loads((logged / "config.json").read_text())["config"]["wandb"]["mode"] == "offline"


# --- the compilation cache --------------------------------------------------------------------------------

COMPILE = """
from experiments.cli import setup_logging
setup_logging()
import jax, jax.numpy as jnp
print(jax.config.jax_compilation_cache_dir)
print(jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)).sum())
"""


def compile_once(tmp_path: Path, **overrides: str | None) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Compiles a function with HOME and XDG_CACHE_HOME in ``tmp_path``; returns the run, HOME and XDG_CACHE_HOME."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    env = child_env(**{"HOME": str(home), "XDG_CACHE_HOME": str(xdg), "JAX_COMPILATION_CACHE_DIR": None,
                       "STUDYREC_COMPILATION_CACHE": None, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **overrides})
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, home, xdg


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_compilation_cache_goes_under_xdg_cache_home_and_is_announced(tmp_path):
    done, home, xdg = compile_once(tmp_path)
    folder = xdg / "studyrec" / "jax"
    assert done.stdout.splitlines()[0] == str(folder)
    assert files_under(folder) and not files_under(home)
    [announcement] = [line for line in done.stderr.splitlines() if "compiled steps are cached" in line]
    assert announcement.startswith("INFO ") and str(folder) in announcement and "STUDYREC_COMPILATION_CACHE" in announcement


def test_studyrec_compilation_cache_moves_the_cache(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    done, home, xdg = compile_once(tmp_path, STUDYREC_COMPILATION_CACHE=str(elsewhere),
                                   JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-dir"))
    assert done.stdout.splitlines()[0] == str(elsewhere)
    assert files_under(elsewhere) and not files_under(home) and not files_under(xdg)
    assert not files_under(tmp_path / "jax-dir")


def test_studyrec_compilation_cache_off_writes_no_cache_anywhere(tmp_path):
    jax_dir = tmp_path / "jax-dir"  # off wins over JAX's own variable too
    done, home, xdg = compile_once(tmp_path, STUDYREC_COMPILATION_CACHE="off", JAX_COMPILATION_CACHE_DIR=str(jax_dir))
    assert done.stdout.splitlines()[0] == "None"
    assert not files_under(home) and not files_under(xdg) and not files_under(jax_dir)
    assert "compiled steps are not cached" in done.stderr


def test_the_heap_is_handed_back_around_large_compilations_and_only_then():
    """``trim_heap_around_compiles`` calls glibc's ``malloc_trim(0)`` after XLA compiles that take at least
    ``TRIM_AFTER_S`` and after lowerings that take at least ``TRIM_BEFORE_S`` (before their compile);
    a cached function compiles nothing, so it trims nothing."""
    done = python(
        """
import ctypes
calls = []
class FakeLibc:
    def malloc_trim(self, pad):
        calls.append(pad)
ctypes.CDLL = lambda name: FakeLibc()
import jax, jax.numpy as jnp
import experiments.cli
from experiments.cli import trim_heap_around_compiles
experiments.cli.TRIM_AFTER_S, experiments.cli.TRIM_BEFORE_S = 0.0, 60.0
x = jnp.ones(3)
f = jax.jit(lambda x: jnp.sin(x) * 2)
trim_heap_around_compiles()
f(x).block_until_ready()
compiled = len(calls)
f(x).block_until_ready()
cached = len(calls)
experiments.cli.TRIM_AFTER_S = 60.0
jax.jit(lambda x: x + 1)(x).block_until_ready()
short = len(calls)
experiments.cli.TRIM_BEFORE_S = 0.0
jax.jit(lambda x: x + 2)(x).block_until_ready()
print(compiled, cached, short, len(calls), set(calls))
"""
    )
    assert done.returncode == 0, done.stderr
    compiled, cached, short, lowered, pads = done.stdout.strip().splitlines()[-1].split(" ", 4)
    assert int(compiled) >= 1 and cached == compiled == short and int(lowered) == int(short) + 1 and pads == "{0}", done.stdout


RESTART = """
import os, sys
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
from experiments.cli import restart_with_huge_pages
restart_with_huge_pages()
print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


def huge_pages_possible() -> bool:
    """glibc 2.35+ and the kernel giving huge pages to the processes that ask (what the restart needs)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except (AttributeError, ValueError, OSError):
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35) and "[madvise]" in mode


@pytest.mark.parametrize("setting", [None, "off"])
def test_commands_restart_once_in_place_with_huge_pages_where_the_system_gives_them(setting):
    env = {k: v for k, v in child_env().items() if k not in ("GLIBC_TUNABLES", "STUDYREC_HUGE_PAGES")}
    if setting is not None:
        env["STUDYREC_HUGE_PAGES"] = setting
    done = subprocess.run([sys.executable, "-c", RESTART, "a", "--b"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    pid = lines[0].split()[1]
    if setting is None and huge_pages_possible():
        assert lines == [f"start {pid} None", f"start {pid} glibc.malloc.hugetlb=1",
                         f"running {pid} glibc.malloc.hugetlb=1 ['a', '--b']"], lines
    else:
        assert lines == [f"start {pid} None", f"running {pid} None ['a', '--b']"], lines
