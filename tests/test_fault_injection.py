"""Fault injection: a run killed at any moment, a checkpoint save included, resumes bit-identically.

Each faulty run is the real command line in a subprocess, started through a small wrapper that
watches its own ``checkpoints/`` folder from a thread and SIGKILLs the process at a chosen moment:

- ``mid-save``: while Orbax is writing a checkpoint into its temporary directory;
- ``unsealed``: after Orbax renamed the checkpoint into place, before ``checksums.json`` commits it;
- ``random``: at a random moment after training started (a step, an evaluation, a log line).

Nothing in studyrec knows about these faults: the wrapper only watches files and kills. After the
kills the same command runs to the end, and the result must equal an uninterrupted run: final
parameters, every logged metric and the evaluation files (``test_resume.assert_same_run``).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_resume import ROOT, assert_same_run, command, env, finish, latest_saved, reference  # noqa: F401

WRAPPER = r"""
import os, random, runpy, signal, sys, threading, time
from pathlib import Path

mode, delay, folder = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]) / "checkpoints"
sys.argv = ["experiments.train", *sys.argv[4:]]
started = time.time()


def existing_steps():
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def fault_seen(before):
    if mode == "random":  # training has started: this process logged a step
        log = folder.parent / "metrics.jsonl"
        return log.exists() and log.stat().st_mtime >= started
    for path in (folder.iterdir() if folder.is_dir() else ()):
        if mode == "mid-save" and "orbax-checkpoint-tmp" in path.name:
            return True
        if mode == "unsealed" and path.name.isdigit() and path.name not in before and not (path / "checksums.json").exists():
            return True
    return False


def watch():
    before = existing_steps()
    while not fault_seen(before):
        time.sleep(0.0005)
    time.sleep(delay)
    print(f"fault injected: {mode} after {delay:.3f} s", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


threading.Thread(target=watch, daemon=True).start()
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


def run_with_fault(run: Path, env: dict, mode: str, delay: float) -> subprocess.CompletedProcess:
    """The training command under the wrapper; returns once the process ended (killed, or finished first)."""
    args = [sys.executable, "-c", WRAPPER, mode, str(delay), str(run), *command(run)[3:]]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def inject(run: Path, env: dict, mode: str, rng: random.Random, delays: tuple[float, float]) -> dict:
    resumed_from = latest_saved(run)
    delay = rng.uniform(*delays)
    done = run_with_fault(run, env, mode, delay)
    killed = done.returncode == -9
    assert killed or done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return {"mode": mode, "delay": round(delay, 4), "resumed_from": resumed_from, "killed": killed}


def finish_and_compare(reference: Path, run: Path, env: dict, history: list[dict]) -> None:
    done = finish(run, env)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not list((run / "checkpoints").glob("corrupt-*")), (history, done.stderr[-3000:])
    for leftover in (run / "checkpoints").glob("uncommitted-*"):  # set aside, not damage: compared away
        shutil.rmtree(leftover)
    assert_same_run(reference, run)


@pytest.mark.parametrize("mode", ["mid-save", "unsealed"])
def test_a_kill_during_a_checkpoint_save_resumes_bit_identically(reference, env, tmp_path, mode):  # noqa: F811
    run = tmp_path / "run"
    history = [inject(run, env, mode, random.Random(), delays=(0.0, 0.02))]
    assert history[0]["killed"], history
    finish_and_compare(reference, run, env, history)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_kills_at_random_moments_and_during_saves_resume_bit_identically(reference, env, tmp_path, seed):  # noqa: F811
    rng = random.Random(seed)
    run = tmp_path / "run"
    history = []
    for _ in range(4):
        mode = rng.choice(["mid-save", "unsealed", "random"])
        history.append(inject(run, env, mode, rng, delays=(0.0, 0.3 if mode == "random" else 0.05)))
    assert any(h["killed"] for h in history), history
    finish_and_compare(reference, run, env, history)
