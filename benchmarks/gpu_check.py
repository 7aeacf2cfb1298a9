"""One-GPU check for the `paper` preset: tokens/s, MFU, peak memory, input pipeline pace, projected run time.

    python -m benchmarks.gpu_check                        # from the repository root
    bash benchmarks/gpu_check.sh                          # the same under `timeout 470`
    python -m benchmarks.gpu_check --preset cpu-small --start 8 --max 16 --steps 2   # a dry run on a CPU

It measures tokens/s, bf16 MFU against the card's measured bf16 matmul peak, peak device memory at
the largest per-device batch that fits (powers of two from ``--start`` up), the Grain input
pipeline's pace on this host, and the projected wall time of the 224,000-step paper run (global
batch 2048 rows of 65 titles). On one H200 it took 3 minutes with ``--search-s 150`` (2026-11-30).

Installs nothing: it expects `pip install -e ".[cuda]"` (jax[cuda12]) to have been done. It prints
progress on stderr and one JSON line (benchmark "gpu_check") on stdout.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time

import tyro

from benchmarks.common import (
    CompileCounter,
    Stopwatch,
    decoder_flops_per_token,
    emit,
    generated_packer,
    log,
    matmul_peak,
    mean_loss,
    train_steps,
)

PAPER_STEPS, PAPER_BATCH = 224_000, 2048


@dataclasses.dataclass(frozen=True)
class GpuCheckConfig:
    preset: str = "paper"
    """Training preset (studyrec.config.PRESETS) whose model and data shapes are measured."""
    model: str = "study"
    """Model to build (a name in studyrec.models.MODELS)."""
    start: int = 512
    """Smallest per-device batch of the search (then powers of two times it)."""
    max: int = 65536
    """Largest per-device batch tried."""
    steps: int = 10
    """Timed steps at the paper batch and at --start (half as many, at least 3, at other sizes)."""
    search_s: float = 240.0
    """Seconds allowed for the batch search (it stops before the next size once spent)."""
    threads: int = min(os.cpu_count() or 2, 16)
    """Grain packing threads."""


def print_gpus() -> None:
    """The cards' names, memory and driver on stderr, when ``nvidia-smi`` is there."""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        subprocess.run(query, stdout=sys.stderr, check=False)


def is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(cfg: GpuCheckConfig) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before JAX starts its backend
    print_gpus()

    import equinox as eqx
    import jax
    import numpy as np

    from studyrec.data.pipeline import prefetching, training_batches
    from studyrec.errors import EXIT_BAD_INPUT
    from studyrec.models import MODELS, build, memory_options
    from studyrec.sharding import make_mesh, place_batch, shard_params
    from studyrec.config import PRESETS
    from studyrec.train.step import make_optimizer, make_train_step

    t_start = time.perf_counter()
    for flag, value, known in (("--preset", cfg.preset, PRESETS), ("--model", cfg.model, MODELS)):
        if value not in known:
            print(f"error: {flag} {value!r} is not one of {', '.join(known)}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {cfg.threads} packing threads")
    preset = PRESETS[cfg.preset]
    seq_len = preset.seq_len
    preset = dataclasses.replace(preset, model=cfg.model)
    packer, vocab = generated_packer(
        6000, seq_len=seq_len, chunk=preset.chunk_size, vocab_size=preset.data.vocab_size,
        memory=memory_options(cfg.model, preset.arch),
    )
    config = preset.model_config(vocab.logits_size, jax.default_backend())
    mesh = make_mesh(1, devices=[dev])
    counts = decoder_flops_per_token(config, seq_len, MODELS[cfg.model].streams)
    flops_per_token, executed_per_token = counts["train"], counts["executed_train"]

    # The card's dense bf16 (compute dtype) matmul peak, measured now.
    measured = matmul_peak(config.dtype, repeats=5, warmup=1)
    peak, peak_n = measured["peak_flops"], measured["peak_n"]
    log(f"measured {config.dtype} matmul peak: {peak / 1e12:.1f} TFLOP/s (n={peak_n})")

    template = build(cfg.model, config, key=jax.random.key(0))
    optimizer = make_optimizer(
        template, peak_lr=preset.learning_rate, warmup=preset.warmup_steps, weight_decay=preset.weight_decay,
        grad_clip=preset.grad_clip, decay_all=preset.decay_all_params,
    )
    step = make_train_step(optimizer, vocab.oov)  # one jitted function: one compile per batch shape
    del template

    def fresh():
        model = shard_params(build(cfg.model, config, key=jax.random.key(0)), mesh)
        state = shard_params(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
        return model, state

    def measure(batch: int, steps: int) -> dict:
        """Compiles the real train step at ``batch`` rows, runs ``steps`` on one fixed batch; raises on OOM."""
        model, state = fresh()
        fixed = place_batch(packer.random_rows(1, np.arange(batch, dtype=np.int64)), mesh)
        key = jax.random.key(2)
        # Two untimed steps: the first compiles, the second compiles again for the step's own outputs
        # (their layouts differ from a fresh model's), which would otherwise land in the timed steps.
        model, state, sums, (first, _) = train_steps(step, model, state, fixed, [key, jax.random.fold_in(key, 2**31)])
        keys = [jax.random.fold_in(key, i) for i in range(steps)]
        model, state, sums, times = train_steps(step, model, state, fixed, keys)
        stats = dev.memory_stats() or {}
        s = statistics.median(times)
        out = {
            "batch": batch, "step_s": s, "step_s_best": min(times), "first_step_s": first,
            "tokens_per_s": batch * seq_len / s,
            "mfu": flops_per_token * batch * seq_len / s / peak,
            "executed_peak_fraction": executed_per_token * batch * seq_len / s / peak,  # both streams' matmuls
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
            "loss": mean_loss(sums),
        }
        del model, state, fixed, sums
        gc.collect()
        return out

    # 1. Powers of two from --start while they fit (the paper's 2048 among them), within the time budget.
    results = {}
    sizes = sorted(({PAPER_BATCH} if PAPER_BATCH <= cfg.max else set()) | {cfg.start << i for i in range(20) if cfg.start << i <= cfg.max})
    largest, oom_at = None, None
    for b in sizes:
        if time.perf_counter() - t_start > cfg.search_s and largest is not None:
            log(f"batch search stopped before {b} (time budget {cfg.search_s:.0f}s)")
            break
        try:
            r = measure(b, cfg.steps if b in (PAPER_BATCH, cfg.start) else max(3, cfg.steps // 2))
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
    paper_b = PAPER_BATCH if PAPER_BATCH in results else (largest or cfg.start)
    model, state = fresh()
    n = max(cfg.steps, 5) + 2
    it = prefetching(training_batches(packer, seed=0, global_batch=paper_b, num_steps=n), threads=cfg.threads, buffer=16)
    wait, wall, compiled_after_first = 0.0, 0.0, 0
    with CompileCounter() as compiles:
        for i in range(n):
            if i == 1:
                compiled_after_first = compiles.count
            with Stopwatch() as total:
                with Stopwatch() as waiting:
                    local = next(it)
                model, state, sums = step(model, state, place_batch(local, mesh), jax.random.key(i))
                jax.block_until_ready(sums)
            if i >= 2:
                wait += waiting.seconds
                wall += total.seconds
    pipe_step = wall / (n - 2)
    # Host packing rate alone (rows/s) with the same threads, to see the headroom.
    it = prefetching(training_batches(packer, seed=5, global_batch=paper_b, num_steps=8), threads=cfg.threads, buffer=16)
    with Stopwatch() as packing:
        for _ in range(8):
            next(it)
    host_rows_per_s = 8 * paper_b / packing.seconds

    rows_total = PAPER_STEPS * PAPER_BATCH
    dev_rows_per_s = paper_b / results[paper_b]["step_s"] if paper_b in results else None
    record = {
        "preset": cfg.preset, "dtype": config.dtype, "seq_len": seq_len, "vocab_size": config.vocab_size,
        "num_layers": config.num_layers, "d_model": config.d_model, "attention_dropout": config.attention_dropout,
        "peak_matmul_flops": peak, "peak_n": peak_n,
        "largest_batch": largest, "oom_batch": oom_at,
        "at_largest": results.get(largest), "at_paper_batch": results.get(PAPER_BATCH),
        "all_batches": {
            str(k): {kk: v[kk] for kk in ("tokens_per_s", "mfu", "step_s", "peak_bytes_in_use")} for k, v in results.items()
        },
        "pipeline_batch": paper_b, "pipeline_step_s": pipe_step, "pipeline_tokens_per_s": paper_b * seq_len / pipe_step,
        "host_wait_fraction": wait / wall, "host_pack_rows_per_s": host_rows_per_s, "packing_threads": cfg.threads,
        "recompiles_in_pipeline": compiles.count - compiled_after_first,
        "projected_paper_run_h_device_only": rows_total / dev_rows_per_s / 3600 if dev_rows_per_s else None,
        "projected_paper_run_h_with_pipeline": rows_total / (paper_b / pipe_step) / 3600,
        "projected_paper_run_h_at_largest_batch": (
            (rows_total / (largest / results[largest]["step_s"]) / 3600) if largest else None
        ),
        "elapsed_s": time.perf_counter() - t_start,
    }
    log(f"paper run (224k steps x 2048 rows): {record['projected_paper_run_h_with_pipeline']:.2f} h with the Grain pipeline "
        f"(host wait {record['host_wait_fraction']:.1%}), "
        f"{record['projected_paper_run_h_device_only'] or float('nan'):.2f} h device only; "
        f"host packs {host_rows_per_s:,.0f} rows/s")
    return emit("gpu_check", record)


if __name__ == "__main__":
    main(tyro.cli(GpuCheckConfig, prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]))
