"""The real training step fed by the real Grain pipeline: steps/s, tokens/s, peak fraction, host wait.

    python -m benchmarks.train                          # cpu-small preset, its per-device batch
    python -m benchmarks.train --preset paper --batch 32 --steps 6

What runs is what ``experiments.train`` runs: ``make_optimizer`` + ``make_train_step`` (AdamW,
donated buffers) on ``make_mesh`` over every device, parameters placed by ``shard_params``, batches
from ``training_batches`` + ``prefetching`` (Grain, background threads) placed with ``place_batch``.
Data are generated classrooms (``studyrec.data.generate``) with the preset's seq_len, chunk size and
a 2000-title vocabulary.

The loop blocks on every step's result, so nothing hides in asynchronous dispatch:
``host_wait_fraction`` is the time spent blocked in ``next(iterator)`` over the wall time of the
timed steps (0 means the device never waited for data); ``wall`` sums the pipelined steps from
``next()`` to the step's result. ``pipeline_overhead`` compares them with the same step on one fixed,
pre-placed batch, timed alternately with them: on a CPU the packing threads share the cores with
the step, so this is where the input pipeline's cost would show. A dense matmul is timed after
every step as well: ``peak_fraction`` is best step against best matmul, ``peak_fraction_median``
median against median (steadier when other users load the machine); both count one stream's FLOPs,
and ``executed_peak_fraction_fixed_batch`` every matmul the step runs (see ``benchmarks.model_step``).
``step_cpu_s_median`` is the process's CPU time per step over all cores: on a shared machine it
moves less with outside load than the wall time. Compilations during the timed steps are counted (``recompiles``: must be 0).
"""

from __future__ import annotations

import dataclasses

import argparse
import statistics
import time

from benchmarks.common import (
    CompileCounter,
    decoder_flops_per_token,
    emit,
    generated_packer,
    log,
    matmul_kernel,
    matmul_rates,
    mean_loss,
    peak_rss_mb,
    preset_training,
    timed,
    train_steps,
)


def main(argv: list[str] | None = None) -> dict:
    from studyrec.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=["cpu-small", "paper", "default"])
    p.add_argument("--model", default="study", choices=tuple(MODELS))
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--students", type=int, default=3000, help="generated students")
    p.add_argument("--threads", type=int, default=2, help="Grain packing threads")
    p.add_argument("--prefetch", type=int, default=0, help="Grain buffer (default: the preset's)")
    p.add_argument("--memory-size", type=int, default=None, help="classroom memory titles (default: the preset's; 0: none)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from experiments.cli import tune_allocator
    from studyrec.data.pipeline import prefetching, training_batches
    from studyrec.models import build, memory_options
    from studyrec.config import PRESETS
    from studyrec.sharding import make_mesh, place_batch

    tune_allocator()  # glibc as experiments.train sets it, so that peak_rss_mb is a run's
    cfg = PRESETS[args.preset]
    per_device = args.batch or cfg.per_device_batch_size
    n_dev = jax.device_count()
    global_batch = per_device * n_dev
    cfg = dataclasses.replace(cfg, model=args.model)
    if args.memory_size is not None:
        cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, memory_size=args.memory_size))
    packer, vocab = generated_packer(
        args.students, seq_len=cfg.seq_len, chunk=cfg.chunk_size, vocab_size=cfg.data.vocab_size,
        memory=memory_options(args.model, cfg.arch),
    )
    config = cfg.model_config(vocab.logits_size, jax.default_backend())

    mesh = make_mesh(cfg.fsdp)
    model = build(args.model, config, key=jax.random.key(cfg.seed))
    model, opt_state, step_fn = preset_training(cfg, model, mesh, vocab.oov)
    dropout_key = jax.random.key(cfg.seed + 2)

    total = args.warmup + args.steps
    iterator = prefetching(
        training_batches(packer, seed=cfg.seed, global_batch=global_batch, num_steps=total),
        threads=args.threads, buffer=args.prefetch or cfg.prefetch,
    )
    run_peak, peak_flop, peak_n = matmul_kernel(config.dtype)
    peak_times = []

    step_times, waits, place_times, fixed_times, totals, cpu_times = [], [], [], [], [], []
    first_step_s = fixed = None
    wall, real_tokens = 0.0, 0
    with CompileCounter() as compiles:
        for step in range(total):
            if step == args.warmup:
                compiles_before = compiles.count
            t0 = time.perf_counter()
            local = next(iterator)
            t1 = time.perf_counter()
            batch = place_batch(local, mesh)
            t2, c2 = time.perf_counter(), time.process_time()
            model, opt_state, sums = step_fn(model, opt_state, batch, jax.random.fold_in(dropout_key, step))
            jax.block_until_ready(sums)
            t3, c3 = time.perf_counter(), time.process_time()
            if step == 0:
                first_step_s = t3 - t0
                log(f"first step (compile) {first_step_s:.1f}s")
                fixed = place_batch(local, mesh)
            if step >= args.warmup:
                real_tokens += int((np.asarray(local.segments) > 0).sum())
                wall += t3 - t0
                totals.append(t3 - t0)
                waits.append(t1 - t0)
                place_times.append(t2 - t1)
                step_times.append(t3 - t2)
                cpu_times.append(c3 - c2)
                # The same step on one fixed, pre-placed batch, alternating with the pipelined steps so
                # that outside load hits both alike: no packing competes with it for the cores.
                model, opt_state, sums, times = train_steps(
                    step_fn, model, opt_state, fixed, [jax.random.fold_in(dropout_key, 10**6 + step)]
                )
                fixed_times += times
                peak_times += timed(run_peak, 1)  # and the matmul peak, so that all three see the same outside load
        recompiles = compiles.count - compiles_before
    loss = mean_loss(sums)

    tokens = global_batch * cfg.seq_len
    counts = decoder_flops_per_token(config, cfg.seq_len, MODELS[args.model].streams)
    flops, executed = counts["train"] * tokens, counts["executed_train"] * tokens
    med_step = statistics.median(step_times)
    rates = matmul_rates(peak_flop, peak_times, peak_n, config.dtype)
    peak = rates["peak_flops"]
    record = {
        "preset": args.preset,
        "model": args.model,
        "dtype": config.dtype,
        "per_device_batch": per_device,
        "global_batch": global_batch,
        "seq_len": cfg.seq_len,
        "chunk_size": cfg.chunk_size,
        "memory_size": config.memory_size,
        "vocab_size": config.vocab_size,
        "num_layers": config.num_layers,
        "d_model": config.d_model,
        "mesh": dict(mesh.shape),
        "timed_steps": args.steps,
        "steps_per_s": args.steps / wall,
        "tokens_per_s": args.steps * tokens / wall,
        "real_tokens_per_s": real_tokens / wall,
        "real_token_fraction": real_tokens / (args.steps * tokens),
        "step_s_median": med_step,
        "step_s_fixed_batch_median": statistics.median(fixed_times),
        # CPU seconds of the process per step (every core): less sensitive to a shared machine's load than wall time.
        "step_cpu_s_median": statistics.median(cpu_times),
        "pipeline_overhead": wall / sum(fixed_times) - 1,
        "host_wait_fraction": sum(waits) / wall,
        "host_wait_max_s": max(waits),
        "place_fraction": sum(place_times) / wall,
        "achieved_flops": flops * args.steps / wall,
        "peak_fraction": flops / min(totals) / peak,
        "peak_fraction_median": (flops / statistics.median(totals)) / rates["peak_flops_median"],
        "peak_fraction_fixed_batch": flops / min(fixed_times) / peak,
        "executed_peak_fraction_fixed_batch": executed / min(fixed_times) / peak,
        "peak_flops": peak,
        "peak_flops_median": rates["peak_flops_median"],
        "peak_n": peak_n,
        "first_step_s": first_step_s,
        "compile_s": first_step_s - med_step if first_step_s else None,
        "recompiles": recompiles,
        "grain_threads": args.threads,
        "prefetch": args.prefetch or cfg.prefetch,
        "loss": loss,
        "peak_rss_mb": peak_rss_mb(),
    }
    return emit("train", record)


if __name__ == "__main__":
    from experiments.cli import restart_with_huge_pages

    restart_with_huge_pages()  # as experiments.train runs
    main()
