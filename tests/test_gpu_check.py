"""The GPU check runs end to end on this CPU with a tiny config, so it is ready the day a GPU is lent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_measures_every_batch_and_projects_the_paper_run():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--preset", "default", "--start", "4", "--max", "8", "--steps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "gpu_check" and record["preset"] == "default"
    sizes = record["all_batches"]
    assert set(sizes) == {"4", "8"}, sizes
    for size in sizes.values():
        assert size["tokens_per_s"] > 0 and size["step_s"] > 0
    # No compile inside the timed steps: half the rows cannot take ten times as long.
    assert sizes["4"]["step_s"] < 10 * sizes["8"]["step_s"], sizes
    for key in ("projected_paper_run_h_device_only", "projected_paper_run_h_with_pipeline"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert record["host_pack_rows_per_s"] > 0
