"""Where a train step's time goes: per-op (CPU) or per-kernel (GPU) time from a ``jax.profiler`` trace.

    python -m benchmarks.profile_step                                   # cpu-small, study, its batch
    python -m benchmarks.profile_step --preset paper --batch 2048       # on a GPU
    python -m benchmarks.profile_step --trace-dir /tmp/trace            # keep the trace for Perfetto

The real step (``make_train_step``: AdamW, donated buffers) runs on one fixed batch of generated
classrooms; after warm-up steps, ``--steps`` steps are traced. On a GPU the device's kernels are
counted; on a CPU, the events named after the compiled module's instructions (XLA's thunks run
them, on both cores at once, so their sum can exceed the wall time). The table on stderr gives each
op's time per step, its share of the wall step and, where the compiled module names it, its output
shape; the JSON line on stdout holds the same for the ``--top`` most expensive ops.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path

from benchmarks.common import base_record, emit, generated_packer, log, preset_training, train_steps


def op_times(trace_file: Path, op_names: set[str]) -> tuple[collections.Counter, collections.Counter]:
    """Microseconds and calls per op name: the device's events where the trace has a device, else
    the events named in ``op_names``."""
    events = json.loads(gzip.open(trace_file).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    micros, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("name", "").startswith("command_buffer"):  # a CUDA graph wraps kernels counted on their own
            continue
        if (e["pid"] in devices) if devices else (e["name"] in op_names):
            micros[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    return micros, calls


def output_shapes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> output shape, from a compiled module's text."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            shapes.setdefault(m.group(1), m.group(2))
    return shapes


def shape_of(op: str, shapes: dict[str, str]) -> str | None:
    """The output shape of an op: a GPU kernel carries its fusion's name with ``_N`` for ``.N``;
    library kernels (cuBLAS, cuDNN) carry none."""
    return shapes.get(op) or shapes.get(re.sub(r"_(\d+)$", r".\1", op))


def main(argv: list[str] | None = None) -> dict:
    from studyrec.config import PRESETS
    from studyrec.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--model", default="study", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=None, help="rows (default: the preset's per-device batch)")
    p.add_argument("--steps", type=int, default=3, help="traced steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before (the first compiles)")
    p.add_argument("--students", type=int, default=3000, help="generated students")
    p.add_argument("--top", type=int, default=25, help="ops in the table and the JSON line")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary directory)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from studyrec.models import build, memory_options
    from studyrec.sharding import make_mesh, place_batch

    dev = jax.devices()[0]
    cfg = dataclasses.replace(PRESETS[args.preset], model=args.model)
    batch = args.batch or cfg.per_device_batch_size
    packer, vocab = generated_packer(
        args.students, seq_len=cfg.seq_len, chunk=cfg.chunk_size, vocab_size=cfg.data.vocab_size,
        memory=memory_options(args.model, cfg.arch),
    )
    config = cfg.model_config(vocab.logits_size, jax.default_backend())
    mesh = make_mesh(1, devices=[dev])
    model = build(args.model, config, key=jax.random.key(0))
    model, state, step = preset_training(cfg, model, mesh, vocab.oov)
    fixed = place_batch(packer.random_rows(1, np.arange(batch, dtype=np.int64)), mesh)
    key = jax.random.key(1)
    with warnings.catch_warnings():  # the batch's int arrays are donated with the rest, and cannot be reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        step = step.lower(model, state, fixed, key).compile()  # one executable: the trace names its ops
    shapes = output_shapes(step.compiled.as_text())
    log(f"device: {dev.device_kind} ({dev.platform}), {args.model} at {args.preset} sizes, batch {batch}, {config.dtype}")

    keys = [jax.random.fold_in(key, i) for i in range(args.warmup + args.steps)]
    model, state, _, _ = train_steps(step, model, state, fixed, keys[: args.warmup])
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="profile_step_"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        model, state, _, times = train_steps(step, model, state, fixed, keys[args.warmup :])
    micros, calls = op_times(next(trace_dir.glob("**/*.json.gz")), set(shapes))
    if args.trace_dir is None:
        shutil.rmtree(trace_dir, ignore_errors=True)
    if not micros:
        raise SystemExit("the trace holds no op events: nothing to attribute the step's time to")

    step_ms = statistics.median(times) * 1e3
    per_step = {name: us / args.steps / 1e3 for name, us in micros.items()}
    top = [
        {"op": name, "ms": ms, "share_of_step": ms / step_ms, "calls": calls[name] // args.steps, "shape": shape_of(name, shapes)}
        for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]
    ]
    log(f"step {step_ms:.1f} ms (median of {args.steps} traced), op time {sum(per_step.values()):.1f} ms per step")
    for row in top:
        log(f"{row['ms']:8.2f} ms {100 * row['share_of_step']:5.1f}% x{row['calls']:<4d} {row['op'][:48]:48s} {row['shape'] or ''}")
    return emit("profile_step", {
        **base_record(config, batch=batch, seq_len=cfg.seq_len),
        "preset": args.preset, "model": args.model, "traced_steps": args.steps, "step_ms_median": step_ms,
        "op_ms_per_step": sum(per_step.values()), "ops": len(per_step), "top": top,
    })


if __name__ == "__main__":
    from experiments.cli import restart_with_huge_pages

    restart_with_huge_pages()  # as experiments.train runs
    main()
