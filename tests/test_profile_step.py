"""The step profiler attributes a real train step's time to its ops, on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_step_attributes_the_step_to_named_ops():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--preset", "default", "--batch", "4", "--steps", "2",
         "--warmup", "2", "--students", "300", "--top", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "profile_step" and record["model"] == "study" and record["batch"] == 4
    top = record["top"]
    assert len(top) == 10 and record["ops"] >= 10
    times = [row["ms"] for row in top]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    assert all(row["shape"] for row in top), top  # every counted event is an instruction of the compiled step
    # Ops run on at most every core at once: their time per step is within reach of the wall step.
    step = record["step_ms_median"]
    assert 0.1 * step < record["op_ms_per_step"] < (os.cpu_count() + 1) * step, record
