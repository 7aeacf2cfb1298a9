"""Kills, signals, damaged checkpoints and divergence lose no work and never corrupt a run.

The end-to-end tests run the real command line in subprocesses (two fake CPU devices, FSDP over
both) sharing one JAX compilation cache, and compare every interrupted run with an uninterrupted
one: the final parameters, every logged metric and the evaluation files must be identical.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from studyrec.models import ModelConfig, build
from studyrec.checkpoint import CHECKSUMS, CheckpointMismatch, Checkpoints

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "bad"
STEPS = 60
FLAGS = [
    "--steps", str(STEPS), "--save-every", "10", "--log-every", "5", "--eval-every", "20", "--eval-rows", "8",
    "--keep-checkpoints", "3", "--n-recommendations", "1", "5", "--fsdp", "2", "--warmup-steps", "20",
    "--arch.num-layers", "1", "--arch.d-model", "16", "--arch.qkv-dim", "16", "--arch.num-heads", "2",
    "--arch.mlp-dim", "32", "--per-device-batch-size", "1", "--wandb.mode", "disabled",
    "--train-data", str(DATA / "activity.csv"), "--valid-data", str(DATA / "valid.csv"),
    "--student-info", str(DATA / "students.csv"), "--school-info", str(DATA / "schools.csv"),
]
OUTPUTS = ("aggregate.csv", "per_student.csv", "recommendations.json", "vocab.json")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
    }


def command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--output-dir", str(run), *FLAGS, *extra]


def start(run: Path, env: dict, *extra: str) -> subprocess.Popen:
    """Starts the run in the background, its output in ``<run>.<start time>.log`` beside it."""
    started = time.time()
    with open(run.parent / f"{run.name}.{time.monotonic_ns()}.log", "w") as log:
        proc = subprocess.Popen(command(run, *extra), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.started = started
    return proc


def finish(run: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(run, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged_steps(run: Path) -> list[int]:
    """Steps in metrics.jsonl (a line being written is skipped)."""
    steps = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def latest_saved(run: Path) -> int:
    """The newest finished checkpoint's step (Orbax renames a checkpoint to its step when complete)."""
    folder = run / "checkpoints"
    return max((int(p.name) for p in folder.iterdir() if p.name.isdigit()), default=0) if folder.exists() else 0


def wait_for_progress(run: Path, proc: subprocess.Popen, beyond: int, timeout: float = 300) -> None:
    """Until this process logs a step past ``beyond`` (so it is in the training loop), or ends.

    Lines left by a killed run do not count: on resume they are dropped before anything new is logged,
    so a step past ``beyond`` in a file written since the process started is a new one.
    """
    path = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if path.exists() and path.stat().st_mtime >= proc.started and max(logged_steps(run), default=0) > beyond:
            return
        assert time.monotonic() < deadline, "the training run made no progress"
        time.sleep(0.02)


def restore_params(run: Path) -> list[np.ndarray]:
    config = json.loads((run / "config.json").read_text())
    model = build(config["model"], ModelConfig(**config["model_config"]), key=jax.random.key(123))
    checkpoints = Checkpoints(run)
    assert checkpoints.latest_step() == STEPS
    restored, _, meta = checkpoints.restore(STEPS, model)
    checkpoints.close()
    assert meta["step"] == STEPS
    return [np.asarray(leaf) for leaf in jax.tree.leaves(eqx.filter(restored, eqx.is_array))]


def metrics(run: Path) -> list[dict]:
    """Every logged metric but the timings."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def assert_same_run(reference: Path, run: Path) -> None:
    for a, b in zip(restore_params(reference), restore_params(run), strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics(run) == metrics(reference)
    assert [m["step"] for m in metrics(run)] == list(range(5, STEPS + 1, 5))
    for name in OUTPUTS:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    entries = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert entries == sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["40", "50", "60"]
    assert iterator_state(run) == iterator_state(reference) != []


def iterator_state(run: Path) -> list[tuple[str, str]]:
    """The Grain iterator position saved with the last checkpoint."""
    return sorted((p.name, p.read_text()) for p in (run / "checkpoints" / str(STEPS) / "data").glob("*.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    finish(run, env)
    return run


# --- kills and signals ---------------------------------------------------------------------------------


def kill_at_random_points(run: Path, env: dict, kills: int, rng: random.Random) -> list[tuple]:
    """Starts the run ``kills`` times and SIGKILLs it at a random moment once it trains past its checkpoint."""
    history = []
    for _ in range(kills):
        resumed_from = latest_saved(run)
        proc = start(run, env)
        wait_for_progress(run, proc, beyond=resumed_from)
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        logged = max(logged_steps(run), default=0)
        history.append({"resumed_from": resumed_from, "delay": round(delay, 3), "logged": logged})
    return history


def stop_with_signal(run: Path, env: dict, signum: int) -> int:
    """Sends ``signum`` once the run trains; checks the exit and the checkpoint; returns the step it stopped at."""
    resumed_from = latest_saved(run)
    proc = start(run, env)
    wait_for_progress(run, proc, beyond=resumed_from)
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == 130
    log = max(run.parent.glob(f"{run.name}.*.log"), key=lambda p: int(p.name.split(".")[1])).read_text()
    assert "Traceback" not in log, log[-3000:]
    stopped = int(re.search(rf"stopped by signal {int(signum)} after step (\d+)", log).group(1))
    assert 0 < stopped < STEPS
    checkpoints = Checkpoints(run)
    assert checkpoints.latest_step() == stopped  # the state after the last completed step
    assert (checkpoints.step_dir(stopped) / CHECKSUMS).exists()
    checkpoints.close()
    assert max(logged_steps(run)) <= stopped
    return stopped


def test_kill_then_sigterm_then_damaged_checkpoint_rerun_equals_an_uninterrupted_run(reference, env, tmp_path):
    """One SIGKILL at a random point, a SIGTERM, a damaged latest checkpoint: the end result is unchanged."""
    run = tmp_path / "run"
    history = kill_at_random_points(run, env, kills=1, rng=random.Random())
    assert history[0]["logged"] < STEPS, history  # killed while training
    stopped = stop_with_signal(run, env, signal.SIGTERM)
    previous = max((int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) < stopped),
                   default=0)
    victim = max((run / "checkpoints" / str(stopped) / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    victim.unlink()
    done = finish(run, env)
    assert f"checkpoints/{stopped} is damaged" in done.stderr and victim.name in done.stderr, done.stderr[-3000:]
    assert f"corrupt-{stopped}" in done.stderr
    assert (f"resumed from step {previous}" in done.stderr) if previous else ("resumed from" not in done.stderr)
    assert (run / "checkpoints" / f"corrupt-{stopped}").is_dir()
    shutil.rmtree(run / "checkpoints" / f"corrupt-{stopped}")
    assert_same_run(reference, run)


@pytest.mark.slow
def test_sigkill_at_many_random_points_then_rerun_equals_an_uninterrupted_run(reference, env, tmp_path):
    run = tmp_path / "run"
    history = kill_at_random_points(run, env, kills=5, rng=random.Random())
    assert any(h["logged"] < STEPS for h in history), history
    finish(run, env)
    assert not list((run / "checkpoints").glob("corrupt-*")), history
    assert_same_run(reference, run)


@pytest.mark.slow
def test_sigint_saves_the_last_completed_step_and_the_rerun_is_identical(reference, env, tmp_path):
    run = tmp_path / "run"
    stop_with_signal(run, env, signal.SIGINT)
    finish(run, env)
    assert_same_run(reference, run)


# --- damaged checkpoints -------------------------------------------------------------------------------


def tree(scale: float) -> dict:
    return {"w": jnp.arange(2048.0).reshape(64, 32) * scale, "b": jnp.full(32, float(scale))}


def damage_delete(step_dir: Path) -> None:
    max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size).unlink()


def damage_truncate(step_dir: Path) -> None:
    path = max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(path, path.stat().st_size // 2)


def damage_flip(step_dir: Path) -> None:  # same size: only the checksum can tell
    path = max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_meta(step_dir: Path) -> None:
    os.truncate(step_dir / "meta" / "metadata", 3)


def damage_metadata_unsealed(step_dir: Path) -> None:  # without checksums, Orbax's own read fails
    (step_dir / CHECKSUMS).unlink()
    (step_dir / "params" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [damage_delete, damage_truncate, damage_flip, damage_meta, damage_metadata_unsealed])
def test_restore_latest_falls_back_past_a_damaged_checkpoint(tmp_path, caplog, damage):
    checkpoints = Checkpoints(tmp_path)
    for step in (1, 2, 3):
        checkpoints.save(step, tree(step), tree(-step), {"model": "study"})
    checkpoints.close()
    damage(tmp_path / "checkpoints" / "3")
    checkpoints = Checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, "studyrec.train"):
        step, params, opt_state, meta = checkpoints.restore_latest(tree(0), tree(0), expect={"model": "study"})
    assert (step, meta["step"]) == (2, 2)
    np.testing.assert_array_equal(params["w"], tree(2)["w"])
    np.testing.assert_array_equal(opt_state["b"], tree(-2)["b"])
    unsealed = damage is damage_metadata_unsealed  # no checksums.json: never committed, not damaged
    reason, aside = ("was never committed", "uncommitted-3") if unsealed else ("is damaged", "corrupt-3")
    assert f"{tmp_path / 'checkpoints' / '3'} {reason}" in caplog.text and aside in caplog.text
    assert checkpoints.steps() == [1, 2] and (tmp_path / "checkpoints" / aside).is_dir()
    checkpoints.save(3, params, opt_state, meta)  # training goes on and writes step 3 again
    checkpoints.close()
    assert Checkpoints(tmp_path).restore_latest(tree(0), tree(0))[0] == 3


def test_unfinished_saves_are_removed_by_the_resuming_job_only(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, tree(1), tree(1), {})
    checkpoints.close()
    leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000"
    (leftover / "params").mkdir(parents=True)
    reader = Checkpoints(tmp_path)  # e.g. loading a live run for inference
    assert reader.steps() == [1] and leftover.exists()
    reader.close()
    assert Checkpoints(tmp_path).restore_latest(tree(0), tree(0))[0] == 1
    assert not leftover.exists()


def test_restore_latest_refuses_other_settings_without_moving_anything(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, tree(1), tree(1), {"model": "study", "vocab_size": 10})
    checkpoints.close()
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(CheckpointMismatch, match="vocab_size=10, but this run has vocab_size=12"):
        checkpoints.restore_latest(tree(0), tree(0), expect={"vocab_size": 12})
    with pytest.raises(CheckpointMismatch, match=r"parameter w with shape \(64, 32\), but this configuration builds"):
        checkpoints.restore_latest({"w": jnp.zeros((64, 16)), "b": jnp.zeros(32)}, tree(0))
    assert checkpoints.steps() == [1] and not list((tmp_path / "checkpoints").glob("corrupt-*"))


# --- divergence ----------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    # Adam moves every weight by about the learning rate, so 1e30 overflows float32 within two steps.
    args = ["--learning-rate", "1e30", "--warmup-steps", "1", "--log-every", "1", "--save-every", "2",
            "--eval-rows", "0", "--valid-data", "--steps", "10", "--fsdp", "1"]
    one_device = {**env, "JAX_NUM_CPU_DEVICES": "1"}
    done = subprocess.run(command(run, *args), cwd=ROOT, env=one_device, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the training loss became nan at step 3" in errors[0], done.stderr[-3000:]
    assert "the last good checkpoint (step 2) is kept" in errors[0] and "--learning-rate" in errors[0]
    checkpoints = Checkpoints(run)
    assert checkpoints.steps() == [2] and (checkpoints.step_dir(2) / CHECKSUMS).exists()
    config = json.loads((run / "config.json").read_text())
    model = build(config["model"], ModelConfig(**config["model_config"]), key=jax.random.key(0))
    step, restored, _, _ = checkpoints.restore_latest(model)  # verifies the checksums too
    assert step == 2
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(eqx.filter(restored, eqx.is_array)))


# --- safety --------------------------------------------------------------------------------------------


def test_no_pickle_anywhere():
    pattern = re.compile(  # code, not prose: "no pickle" in a docstring is fine
        r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b|\b(c?pickle|dill|cloudpickle|joblib|"
        r"shelve|marshal)\.\w|torch\.load|allow_pickle\s*=\s*True|read_pickle|to_pickle|__reduce__"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("studyrec", "experiments")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_a_finished_run_directory_is_data_only(reference):
    """JSON, CSV, JSONL and Orbax/TensorStore files; nothing that executes code when loaded."""
    suffixes = {p.suffix for p in reference.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".csv", ".jsonl", ".txt", ".ocdbt", ""}, suffixes
    for path in reference.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), path  # pickle protocol 2-5
