"""Runs the quick benchmarks, each in its own process, at small sizes; prints their JSON lines.

    python -m benchmarks.all                # about 3-5 minutes on a 2-core CPU
    python -m benchmarks.all --out results/bench.jsonl

Each benchmark runs as ``python -m benchmarks.X ...`` in a subprocess (fresh memory high-water mark,
fresh compilation cache) and must print one JSON line; the lines are echoed, optionally appended
to ``--out``, and a short table goes to stderr. The full-size runs are listed in the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Stopwatch, json_line, log

QUICK: list[tuple[str, list[str]]] = [
    ("data_pipeline", ["--interactions", "300000"]),
    ("model_step", ["--preset", "cpu-small", "--repeats", "3"]),
    ("model_step", ["--preset", "paper", "--batch", "16", "--repeats", "3"]),
    ("train", ["--preset", "cpu-small", "--steps", "10"]),
    ("eval_throughput", ["--students", "10000", "--recommend-students", "2000"]),
    ("scaling", ["--seq-lens", "65", "257", "--class-sizes", "15", "120", "--repeats", "2"]),
]

SUMMARY = {
    "data_pipeline": ("interactions_per_s", "rows_per_s", "peak_rss_mb"),
    "model_step": ("preset", "tokens_per_s", "peak_fraction", "compile_s"),
    "train": ("preset", "steps_per_s", "tokens_per_s", "peak_fraction", "host_wait_fraction"),
    "eval_throughput": ("eval_students_per_s", "recommend_students_per_s", "eval_vs_train_tokens"),
    "scaling": ("step_growth_last_vs_first_seq_len",),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all quick ones)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per benchmark")
    args = p.parse_args(argv)

    failures, lines = 0, []
    start = time.perf_counter()
    for name, flags in QUICK:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *flags]
        log(f"[benchmarks.all] {' '.join(cmd[1:])}")
        try:
            with Stopwatch() as watch:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            log(f"[benchmarks.all]   timed out after {args.timeout}s")
            failures += 1
            continue
        found = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode != 0 or not found:
            failures += 1
            log(f"[benchmarks.all]   FAILED (rc {res.returncode}):\n{res.stderr[-2000:]}")
            continue
        record = json.loads(found[-1])
        record["wall_s"] = round(watch.seconds, 1)
        lines.append(record)
        json_line(record)
        keys = SUMMARY.get(name, ())
        summary = ", ".join(f"{k}={_fmt(record.get(k))}" for k in keys)
        log(f"[benchmarks.all]   {record['wall_s']}s, load {record.get('load_avg_1m')}: {summary}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for record in lines:
                f.write(json.dumps(record) + "\n")
    log(f"[benchmarks.all] {len(lines)} ran, {failures} failed, {time.perf_counter() - start:.0f}s")
    return 1 if failures else 0


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
