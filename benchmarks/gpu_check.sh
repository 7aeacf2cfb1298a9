#!/usr/bin/env bash
# One-GPU check for the `paper` preset: tokens/s, bf16 MFU against the card's measured bf16 matmul
# peak, peak device memory at the largest per-device batch that fits (powers of two from 512 up),
# the Grain input pipeline's pace on this host, and the projected wall time of the 224,000-step
# paper run (global batch 2048 rows of 65 titles). Runs in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                     # from the repository root
#
# Installs nothing: it expects `pip install -e ".[cuda]"` (jax[cuda12]) to have been done. It
# prints progress on stderr and one JSON line (benchmark "gpu_check") on stdout.
#
# Knobs (environment), mostly for a dry run on a CPU:
#   GPU_CHECK_PRESET=paper  GPU_CHECK_START=512  GPU_CHECK_MAX=65536  GPU_CHECK_STEPS=10
#   GPU_CHECK_SEARCH_S=240 (seconds allowed for the batch search)  GPU_CHECK_THREADS=<cpus>
#   e.g. GPU_CHECK_PRESET=cpu-small GPU_CHECK_START=8 GPU_CHECK_MAX=16 GPU_CHECK_STEPS=2 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

exec timeout 470 "$PY" - <<'PYEOF'
import gc, os, statistics, time

import equinox as eqx
import jax
import numpy as np

from benchmarks.common import (CompileCounter, best_time, decoder_flops_per_token, emit, generated_packer, log,
                               matmul_kernel)
from studyrec.data.pipeline import prefetching, training_batches
from studyrec.models import build
from studyrec.train.config import PRESETS
from studyrec.train.mesh import make_mesh, place_batch, shard_params
from studyrec.train.step import make_optimizer, make_train_step

T0 = time.perf_counter()
PRESET = os.environ.get("GPU_CHECK_PRESET", "paper")
START = int(os.environ.get("GPU_CHECK_START", "512"))
MAX = int(os.environ.get("GPU_CHECK_MAX", "65536"))
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "10"))
SEARCH_S = float(os.environ.get("GPU_CHECK_SEARCH_S", "240"))
THREADS = int(os.environ.get("GPU_CHECK_THREADS", str(min(os.cpu_count() or 2, 16))))
PAPER_STEPS, PAPER_BATCH = 224_000, 2048

dev = jax.devices()[0]
log(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {THREADS} packing threads")
cfg = PRESETS[PRESET]
packer, vocab = generated_packer(6000, seq_len=cfg.seq_len, chunk=cfg.chunk_size, vocab_size=cfg.vocab_size)
config = cfg.arch.model_config(vocab.logits_size, cfg.grade_levels, cfg.seq_len, jax.default_backend(), model="study")
mesh = make_mesh(1, devices=[dev])
flops_per_token = decoder_flops_per_token(config, cfg.seq_len)["train"]

# The card's dense bf16 (compute dtype) matmul peak, measured now.
run_peak, peak_flop, peak_n = matmul_kernel(config.dtype)
peak = peak_flop / best_time(run_peak, repeats=5, warmup=1)[0]
log(f"measured {config.dtype} matmul peak: {peak / 1e12:.1f} TFLOP/s (n={peak_n})")


_template = build("study", config, key=jax.random.key(0))
OPT = make_optimizer(_template, peak_lr=cfg.learning_rate, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                     grad_clip=cfg.grad_clip, decay_all=cfg.decay_all_params)
STEP = make_train_step(OPT, vocab.oov)  # one jitted function: one compile per batch shape
del _template


def fresh():
    model = shard_params(build("study", config, key=jax.random.key(0)), mesh)
    state = shard_params(OPT.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
    return model, state, STEP


def measure(batch: int, steps: int) -> dict:
    """Compiles the real train step at ``batch`` rows, runs ``steps`` on one fixed batch; raises on OOM."""
    model, state, step = fresh()
    host = packer.random_rows(1, np.arange(batch, dtype=np.int64))
    fixed = place_batch(host, mesh)
    key = jax.random.key(2)
    t = time.perf_counter()
    model, state, sums = step(model, state, fixed, key)
    jax.block_until_ready(sums)
    first = time.perf_counter() - t
    times = []
    for i in range(steps):
        t = time.perf_counter()
        model, state, sums = step(model, state, fixed, jax.random.fold_in(key, i))
        jax.block_until_ready(sums)
        times.append(time.perf_counter() - t)
    stats = dev.memory_stats() or {}
    s = statistics.median(times)
    out = {
        "batch": batch, "step_s": s, "step_s_best": min(times), "first_step_s": first,
        "tokens_per_s": batch * cfg.seq_len / s,
        "mfu": flops_per_token * batch * cfg.seq_len / s / peak,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0),
    }
    del model, state, fixed, sums
    gc.collect()
    return out


def is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# 1. Powers of two from START while they fit (the paper's 2048 among them), within the time budget.
results = {}
sizes = sorted({PAPER_BATCH} - {b for b in [PAPER_BATCH] if b > MAX} | {START << i for i in range(20) if START << i <= MAX})
largest, oom_at = None, None
for b in sizes:
    if time.perf_counter() - T0 > SEARCH_S and largest is not None:
        log(f"batch search stopped before {b} (time budget {SEARCH_S:.0f}s)")
        break
    try:
        r = measure(b, STEPS if b in (PAPER_BATCH, START) else max(3, STEPS // 2))
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        oom_at = b
        log(f"batch {b}: out of memory")
        gc.collect()
        break
    results[b] = r
    largest = b
    gb = (r["peak_bytes_in_use"] or 0) / 2**30
    log(f"batch {b}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, step {r['step_s'] * 1e3:.1f} ms, "
        f"peak mem {gb:.1f} GiB, compile+first {r['first_step_s']:.1f}s")

# 2. The real pipeline at the paper batch: Grain prefetching feeding the donated step.
paper_b = PAPER_BATCH if PAPER_BATCH in results else (largest or START)
model, state, step = fresh()
n = max(STEPS, 5) + 2
it = prefetching(training_batches(packer, seed=0, global_batch=paper_b, num_steps=n), threads=THREADS, buffer=16)
wait, wall, compiled_after_first = 0.0, 0.0, 0
with CompileCounter() as compiles:
    for i in range(n):
        if i == 1:
            compiled_after_first = compiles.count
        t0 = time.perf_counter()
        local = next(it)
        t1 = time.perf_counter()
        model, state, sums = step(model, state, place_batch(local, mesh), jax.random.key(i))
        jax.block_until_ready(sums)
        if i >= 2:
            wait += t1 - t0
            wall += time.perf_counter() - t0
pipe_step = wall / (n - 2)
# Host packing rate alone (rows/s) with the same threads, to see the headroom.
it = prefetching(training_batches(packer, seed=5, global_batch=paper_b, num_steps=8), threads=THREADS, buffer=16)
t = time.perf_counter()
for _ in range(8):
    next(it)
host_rows_per_s = 8 * paper_b / (time.perf_counter() - t)

rows_total = PAPER_STEPS * PAPER_BATCH
dev_rows_per_s = paper_b / results[paper_b]["step_s"] if paper_b in results else None
record = {
    "preset": PRESET, "dtype": config.dtype, "seq_len": cfg.seq_len, "vocab_size": config.vocab_size,
    "num_layers": config.num_layers, "d_model": config.d_model, "attention_dropout": config.attention_dropout,
    "peak_matmul_flops": peak, "peak_n": peak_n,
    "largest_batch": largest, "oom_batch": oom_at,
    "at_largest": results.get(largest), "at_paper_batch": results.get(PAPER_BATCH),
    "all_batches": {str(k): {kk: v[kk] for kk in ("tokens_per_s", "mfu", "step_s", "peak_bytes_in_use")} for k, v in results.items()},
    "pipeline_batch": paper_b, "pipeline_step_s": pipe_step, "pipeline_tokens_per_s": paper_b * cfg.seq_len / pipe_step,
    "host_wait_fraction": wait / wall, "host_pack_rows_per_s": host_rows_per_s, "packing_threads": THREADS,
    "recompiles_in_pipeline": compiles.count - compiled_after_first,
    "projected_paper_run_h_device_only": rows_total / dev_rows_per_s / 3600 if dev_rows_per_s else None,
    "projected_paper_run_h_with_pipeline": rows_total / (paper_b / pipe_step) / 3600,
    "projected_paper_run_h_at_largest_batch": (rows_total / (largest / results[largest]["step_s"]) / 3600) if largest else None,
    "elapsed_s": time.perf_counter() - T0,
}
log(f"paper run (224k steps x 2048 rows): {record['projected_paper_run_h_with_pipeline']:.2f} h with the Grain pipeline "
    f"(host wait {record['host_wait_fraction']:.1%}), {record['projected_paper_run_h_device_only'] or float('nan'):.2f} h device only; "
    f"host packs {host_rows_per_s:,.0f} rows/s")
emit("gpu_check", record)
PYEOF
