"""Multi-process training on one machine: 2 processes x 2 fake CPU devices (gloo) against 1 x 4.

The two runs see the same global batches on a 4-device mesh, so their losses, final parameters
and final evaluation must agree to float tolerance. Both run as subprocesses at once: the test
process already has 8 devices, and ``jax.distributed`` must start before any backend does.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import grain
import jax
import numpy as np
import pandas as pd
import pytest

from experiments import launch_parallel
from studyrec.models import ModelConfig, build
from studyrec.checkpoint import Checkpoints
from studyrec.train.distributed import EXIT_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--arch.num-layers 1 --arch.d-model 16 --arch.qkv-dim 16 --arch.num-heads 2 --arch.mlp-dim 32 "
        "--per-device-batch-size 2 --steps 6 --eval-every 3 --save-every 3 --log-every 1 --eval-rows 16 "
        "--n-recommendations 1 5 --wandb.mode disabled").split()


def env(**extra) -> dict[str, str]:
    # Unoptimised XLA code compiles in two thirds of the time; both runs use it, and the model is tiny.
    xla = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla,
            **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs both jobs concurrently; returns (single-process dir, multi-process dir, launcher output)."""
    base = tmp_path_factory.mktemp("multihost")
    single, multi = base / "single", base / "multi"
    logs = {name: open(base / f"{name}.log", "w+") for name in ("single", "multi")}  # pipes could fill and stall
    start = time.monotonic()
    one = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *TINY, "--output-dir", str(single)],
        cwd=ROOT, env=env(JAX_NUM_CPU_DEVICES="4"), stdout=logs["single"], stderr=subprocess.STDOUT,
    )
    two = subprocess.Popen(
        [sys.executable, "-m", "experiments.launch_parallel", "--num-processes", "2", "--devices-per-process", "2",
         "--platform", "cpu", "--", *TINY, "--output-dir", str(multi), "--dist.timeout-s", "120"],
        cwd=ROOT, env=env(), stdout=logs["multi"], stderr=subprocess.STDOUT,
    )
    one.wait(timeout=300)
    two.wait(timeout=300)
    print(f"both runs took {time.monotonic() - start:.1f} s")
    out_one, out_two = ((base / f"{name}.log").read_text() for name in ("single", "multi"))
    for f in logs.values():
        f.close()
    assert one.returncode == 0, out_one[-3000:]
    assert two.returncode == 0, out_two[-3000:]
    return single, multi, out_two


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_processes_and_devices_are_as_asked(runs):
    single, multi, log = runs
    assert json.loads((multi / "config.json").read_text())["processes"] == 2
    assert json.loads((multi / "config.json").read_text())["devices"] == 4
    assert json.loads((single / "config.json").read_text())["devices"] == 4
    assert "[0] INFO studyrec.train: process 0 of 2: 2 local of 4 cpu devices" in log
    assert "[1] INFO studyrec.train: process 1 of 2: 2 local of 4 cpu devices" in log


def test_losses_match_and_only_process_0_logs(runs):
    single, multi, log = runs
    a, b = read_metrics(single), read_metrics(multi)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # one line per step: process 1 wrote nothing
    for x, y in zip(a, b):
        for key in ("train/loss", "train/accuracy", "train/grad_norm", "eval/train_loss", "eval/valid_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    tables = [line for line in log.splitlines() if "Evaluation_Type" in line]  # the final table, logged once
    assert len(tables) == 1 and tables[0].startswith("[0] ")


def restore_last(run_dir: Path):
    """The last checkpoint's step, parameters and data position, restored by this one process."""
    record = json.loads((run_dir / "config.json").read_text())
    shapes = eqx.filter_eval_shape(build, record["model"], ModelConfig(**record["model_config"]), key=jax.random.key(0))
    template = jax.tree.map(  # zeros of the right shapes: restoring needs no initialisation
        lambda x: jax.device_put(np.zeros(x.shape, x.dtype)) if isinstance(x, jax.ShapeDtypeStruct) else x, shapes
    )
    checkpoints = Checkpoints(run_dir)
    step = checkpoints.latest_step()
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    model, _, meta = checkpoints.restore(step, template, data_iterator=iterator)
    checkpoints.close()
    return step, model, next(iterator)


def test_final_parameters_match(runs):
    single, multi, _ = runs
    (step_a, a, next_a), (step_b, b, next_b) = restore_last(single), restore_last(multi)
    assert step_a == step_b == 6
    assert next_a == next_b == 6  # a run saved by 2 processes resumes in 1 at the same batch
    leaves_a = jax.tree.leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        if hasattr(x, "shape"):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))


def test_final_evaluation_matches(runs):
    single, multi, _ = runs
    a, b = pd.read_csv(single / "aggregate.csv"), pd.read_csv(multi / "aggregate.csv")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b, rtol=1e-6, atol=1e-9)
    students_a, students_b = pd.read_csv(single / "per_student.csv"), pd.read_csv(multi / "per_student.csv")
    assert len(students_a) == len(students_b)  # every student scored once, not once per process


def test_unreachable_coordinator_or_missing_process_fails_clearly_within_the_timeout(tmp_path):
    port = launch_parallel.free_port()  # nobody listens there

    def join(process_id: int, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "experiments.train", *TINY, "--output-dir", str(tmp_path / f"run{process_id}"),
             "--dist.coordinator-address", f"127.0.0.1:{port}", "--dist.num-processes", "2",
             "--dist.process-id", str(process_id), "--dist.timeout-s", "3"],
            cwd=ROOT, env=env(JAX_NUM_CPU_DEVICES="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    start = time.monotonic()
    lonely_worker = join(1, port)  # its coordinator never starts
    lonely_coordinator = join(0, launch_parallel.free_port())  # its process 1 never starts
    _, worker_err = lonely_worker.communicate(timeout=120)
    _, coordinator_err = lonely_coordinator.communicate(timeout=120)
    assert time.monotonic() - start < 60
    assert lonely_worker.returncode == EXIT_TIMEOUT, worker_err[-2000:]
    assert f"could not reach the coordinator at 127.0.0.1:{port} within --dist.timeout-s 3" in worker_err
    assert lonely_coordinator.returncode == EXIT_TIMEOUT, coordinator_err[-2000:]
    assert "process 0 of 2: not every process joined the run" in coordinator_err
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


def test_launcher_refuses_flags_it_sets(capsys):
    for flag in ("--dist.auto", "--dist.process-id=1", "--dist.coordinator_address", "--dist.num-processes"):
        with pytest.raises(SystemExit) as e:
            launch_parallel.main(["--num-processes", "2", "--", "--steps", "3", flag])
        assert e.value.code == 2
        assert "cannot be forwarded" in capsys.readouterr().err


def test_launcher_gives_each_process_its_devices(monkeypatch):
    cfg = launch_parallel.LaunchConfig(num_processes=2, devices_per_process=3, platform="cpu")
    envs = launch_parallel.process_envs(cfg, base={})
    assert [e["JAX_NUM_CPU_DEVICES"] for e in envs] == ["3", "3"]
    assert all(e["JAX_PLATFORMS"] == "cpu" for e in envs)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    gpu = launch_parallel.LaunchConfig(num_processes=2, devices_per_process=2, platform="gpu")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in launch_parallel.process_envs(gpu, base={})] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="need 8 GPUs; 4 are visible"):
        launch_parallel.process_envs(launch_parallel.LaunchConfig(num_processes=4, devices_per_process=2), base={})
    cmds = launch_parallel.commands(cfg, ["--steps", "3"], 1234)
    assert cmds[1][-6:] == ["--dist.coordinator-address", "127.0.0.1:1234", "--dist.num-processes", "2",
                            "--dist.process-id", "1"]


def test_launcher_prefixes_output_and_stops_all_when_one_fails(tmp_path):
    (tmp_path / "fake_worker.py").write_text(
        "import sys, time\n"
        "i = int(sys.argv[sys.argv.index('--dist.process-id') + 1])\n"
        "print('hello from', i, flush=True)\n"
        "if i == 1:\n"
        "    sys.exit(7)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.launch_parallel", "--num-processes", "2", "--platform", "cpu",
         "--module", "fake_worker", "--grace-s", "2"],
        cwd=ROOT, env=env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 7
    assert time.monotonic() - start < 30
    assert "[0] hello from 0" in result.stdout and "[1] hello from 1" in result.stdout
    assert "process 1 exited with code 7; stopping the others" in result.stderr


def test_a_process_that_dies_stops_the_others(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys\n"
        "import numpy as np\n"
        "from jax.experimental import multihost_utils\n"
        "from studyrec.train import distributed\n"
        "from studyrec.config import DistConfig\n"
        "pid, port = int(sys.argv[1]), sys.argv[2]\n"
        "distributed.initialize(DistConfig(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=pid,"
        " timeout_s=5))\n"
        "with distributed.leave_on_error():\n"
        "    multihost_utils.process_allgather(np.ones(1))\n"
        "    if pid == 1:\n"
        "        os._exit(9)  # dies without a word\n"
        "    for _ in range(10_000):\n"
        "        multihost_utils.process_allgather(np.ones(1))\n"
    )
    port = str(launch_parallel.free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=ROOT, env=env(JAX_NUM_CPU_DEVICES="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 9
    assert procs[0].returncode != 0
    assert time.monotonic() - start < 60
    assert any(why in err for why in ("another task died", "Connection closed by peer", "failed alone")), err[-3000:]
