"""How the step time grows with seq_len and with classroom size.

    python -m benchmarks.scaling                                  # cpu-small sizes
    python -m benchmarks.scaling --preset paper --seq-lens 65 129 --class-sizes 15 60

seq_len: forward + backward (``model_step.build_step``: jitted, gradients only) at a fixed token
budget per step (``--tokens``, default 32 x 65 rows: 8 rows of 257, 4 of 513), so a flat
``step_s`` means cost linear in tokens and any growth is attention's quadratic part (scores,
masks, softmax over seq_len keys). Chunks are ``--chunk`` interactions (default 16), so longer
rows hold more classmates.

Classroom size: generated classes of exactly N students, seq_len 65, chunk 16: the host packing
rate (``random_rows``, batches of 1024) and the step time on those rows (one compiled step: the
shapes do not change).
"""

from __future__ import annotations

import dataclasses

import argparse
import statistics

import numpy as np

from benchmarks.common import compile_timed, decoder_flops_per_token, emit, generated_packer, log, peak_rss_mb, timed


def main(argv: list[str] | None = None) -> dict:
    from studyrec.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=["cpu-small", "paper", "default"])
    p.add_argument("--model", default="study", choices=tuple(MODELS))
    p.add_argument("--seq-lens", type=int, nargs="*", default=[65, 129, 257, 513])
    p.add_argument("--class-sizes", type=int, nargs="*", default=[5, 15, 30, 60, 120])
    p.add_argument("--tokens", type=int, default=32 * 65, help="tokens per step (rows = tokens // seq_len)")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--students", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-dropout", action="store_true", help="inference mode (the fused attention path)")
    p.add_argument("--memory-size", type=int, default=None, help="classroom memory titles (default: the preset's; 0: none)")
    args = p.parse_args(argv)

    import equinox as eqx
    import jax

    from benchmarks.model_step import build_step
    from studyrec.models import build, memory_options
    from studyrec.config import PRESETS

    preset = PRESETS[args.preset]
    if args.memory_size is not None:
        preset = dataclasses.replace(preset, arch=dataclasses.replace(preset.arch, memory_size=args.memory_size))
    platform = jax.default_backend()
    key = jax.random.key(1)
    memory = memory_options(args.model, preset.arch)

    def make(seq_len: int):
        config = dataclasses.replace(preset, model=args.model, seq_len=seq_len, grade_levels=None).model_config(2003, platform)
        model = build(args.model, config, key=jax.random.key(0))
        if args.no_dropout:
            model = eqx.nn.inference_mode(model)
        return config, model

    by_seq = []
    for T in args.seq_lens:
        rows = max(1, args.tokens // T)
        packer, vocab = generated_packer(args.students, seq_len=T, chunk=min(args.chunk, T), memory=memory)
        sample = jax.device_put(packer.random_rows(0, np.arange(rows, dtype=np.int64)))
        config, model = make(T)
        step, params = build_step(model, vocab.oov, dropout=not args.no_dropout)
        compiled, compile_s = compile_timed(step, params, sample, key)
        run = lambda: jax.block_until_ready(compiled(params, sample, key))  # noqa: E731
        times = timed(run, args.repeats, warmup=1)
        best = min(times)
        flops = decoder_flops_per_token(config, T)
        by_seq.append({
            "seq_len": T, "rows": rows, "tokens": rows * T, "compile_s": round(compile_s, 2),
            "step_s": best, "step_s_median": statistics.median(times), "tokens_per_s": rows * T / best,
            "flops_per_token": flops["train"], "attention_flop_share": round(flops["share_attention_scores"], 3),
            "real_token_fraction": float((np.asarray(sample.segments) > 0).mean()),
        })
        log(f"  seq_len {T}: {rows}x{T}, step {best * 1e3:.0f} ms, compile {compile_s:.1f}s")

    by_class = []
    if args.class_sizes:
        T, rows = 65, max(1, args.tokens // 65)
        config, model = make(T)
        compiled = params = None
        for size in args.class_sizes:
            packer, vocab = generated_packer(
                args.students, seq_len=T, chunk=min(args.chunk, T), class_size=(size, size), memory=memory
            )
            B = 1024
            pack_t = timed(lambda: packer.random_rows(0, np.arange(B, dtype=np.int64)), args.repeats)
            host = packer.random_rows(0, np.arange(rows, dtype=np.int64))
            sample = jax.device_put(host)
            if compiled is None:
                step, params = build_step(model, vocab.oov, dropout=not args.no_dropout)
                compiled = step.lower(params, sample, key).compile()
            run = lambda: jax.block_until_ready(compiled(params, sample, key))  # noqa: E731
            times = timed(run, args.repeats, warmup=1)
            students_per_row = float(host.segments.max(axis=1).mean())
            by_class.append({
                "class_size": size, "pack_rows_per_s": B / min(pack_t), "step_s": min(times),
                "tokens_per_s": rows * T / min(times), "students_per_row": round(students_per_row, 2),
                "real_token_fraction": round(float((host.segments > 0).mean()), 3),
            })
            log(f"  class size {size}: pack {B / min(pack_t):,.0f} rows/s, step {min(times) * 1e3:.0f} ms, "
                f"{students_per_row:.1f} students/row")

    config, _ = make(65)
    record = {
        "preset": args.preset, "model": args.model, "memory_size": config.memory_size, "dtype": config.dtype,
        "d_model": config.d_model,
        "num_layers": config.num_layers, "vocab_size": config.vocab_size, "dropout": not args.no_dropout,
        "tokens_per_step": args.tokens, "chunk_size": args.chunk,
        "by_seq_len": by_seq, "by_class_size": by_class,
        "step_growth_last_vs_first_seq_len": (by_seq[-1]["step_s"] / by_seq[0]["step_s"]) if len(by_seq) > 1 else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    return emit("scaling", record)


if __name__ == "__main__":
    main()
