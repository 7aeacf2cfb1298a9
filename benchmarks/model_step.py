"""Forward + backward of the model (jitted, gradients only, no optimizer): tokens/s and matmul efficiency.

    python -m benchmarks.model_step                     # paper sizes, seq_len 65, vocab 2003
    python -m benchmarks.model_step --preset cpu-small --batch 64
    python -m benchmarks.model_step --no-dropout        # inference-mode dropout (fused attention path)

Achieved FLOP/s counts matmul FLOPs analytically (``common.decoder_flops_per_token``: projections,
attention scores and values over all seq_len keys, MLP, output layer; x3 for forward + backward;
embedding lookups excluded) over the measured step time. ``peak_fraction`` divides it by the dense
matmul rate measured in the same process, for the same dtype. Both use the best of the timed
repeats (the least disturbed by other load); medians are reported too. Packed rows come from
generated classroom data, so masks are realistic.

Those FLOPs are one stream's: the decoder's work per token, the same for ``study`` and the
reference's single-stream model. ``study`` runs two streams through every layer but the last, so
its step multiplies more: ``executed_peak_fraction`` counts those matmuls (``executed_train``), how
busy the step keeps the matmul units.
"""

from __future__ import annotations

import dataclasses

import argparse
import statistics

from benchmarks.common import (
    base_record,
    compile_timed,
    decoder_flops_per_token,
    emit,
    generated_packer,
    interleaved,
    log,
    matmul_kernel,
    matmul_rates,
    peak_rss_mb,
)


def build_step(model, oov: int, dropout: bool):
    """A jitted ``(params, batch, key) -> grads`` and the static half of the model."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from studyrec.models import batched_scores
    from studyrec.train.step import weighted_metrics

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, batch, key):
        m = eqx.combine(params, static)
        sums = weighted_metrics(batched_scores(m, batch, key if dropout else None), batch, oov)
        return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0)

    return jax.jit(jax.grad(loss)), params


def output_layer_step(rows: int, d: int, V: int, dtype: str):
    """The output layer + softmax cross-entropy alone (forward + backward), to show its share."""
    import jax
    import jax.numpy as jnp
    import optax

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    dt = jnp.dtype(dtype)
    h = jax.random.normal(k1, (rows, d), jnp.float32)
    w = jax.random.normal(k2, (d, V), jnp.float32) / d**0.5
    b = jnp.zeros(V)
    y = jax.random.randint(k3, (rows,), 0, V)

    def loss(h, w, b):
        logits = (h.astype(dt) @ w.astype(dt)).astype(jnp.float32) + b
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(f(h, w, b))


def main(argv: list[str] | None = None) -> dict:
    from studyrec.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper", choices=["paper", "cpu-small"])
    p.add_argument("--model", default="study", choices=tuple(MODELS))
    p.add_argument("--batch", type=int, default=0, help="rows per step (default: 32 on CPU, the preset's on accelerators)")
    p.add_argument("--seq-len", type=int, default=65)
    p.add_argument("--chunk", type=int, default=0, help="student chunk size (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=2003, help="output width (Vocabulary.logits_size)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--no-dropout", action="store_true", help="run the model in inference mode")
    p.add_argument("--attention-dropout", type=float, default=None, help="override the preset's attention dropout")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--class-size", type=int, nargs=2, default=(15, 30), help="generated class sizes (min max)")
    p.add_argument("--no-parts", action="store_true", help="skip timing the output layer alone")
    args = p.parse_args(argv)


    import equinox as eqx
    import jax
    import numpy as np

    from studyrec.models import build, memory_options
    from studyrec.config import PRESETS

    preset = PRESETS[args.preset]
    arch = preset.arch if args.dtype == "auto" else dataclasses.replace(preset.arch, dtype=args.dtype)
    if args.attention_dropout is not None:
        arch = dataclasses.replace(arch, attention_dropout=args.attention_dropout)
    platform = jax.default_backend()
    config = dataclasses.replace(preset, arch=arch, model=args.model, seq_len=args.seq_len, grade_levels=None).model_config(
        args.vocab_size, platform
    )
    batch = args.batch or (32 if platform == "cpu" else preset.per_device_batch_size)
    chunk = args.chunk or min(dataclasses.replace(preset, model=args.model).chunk_size, args.seq_len)

    packer, vocab = generated_packer(
        3000, seq_len=args.seq_len, chunk=chunk, vocab_size=args.vocab_size - 3, class_size=tuple(args.class_size),
        memory=memory_options(args.model, config),
    )
    host = packer.random_rows(0, np.arange(batch, dtype=np.int64))
    sample = jax.device_put(host)
    real = float((host.segments > 0).mean())

    model = build(args.model, config, key=jax.random.key(0))
    if args.no_dropout:
        model = eqx.nn.inference_mode(model)
    step, params = build_step(model, vocab.oov, dropout=not args.no_dropout)
    key = jax.random.key(1)

    compiled, compile_s = compile_timed(step, params, sample, key)
    log(f"compiled in {compile_s:.1f}s; timing {args.repeats} steps of {batch}x{args.seq_len}")

    jax.block_until_ready(compiled(params, sample, key))  # warm-up
    counter = iter(range(10**9))
    fns = {"step": lambda: jax.block_until_ready(compiled(params, sample, jax.random.fold_in(key, next(counter))))}
    peak_run, peak_flop, peak_n = matmul_kernel(config.dtype)
    fns["matmul"] = peak_run
    flops = decoder_flops_per_token(config, args.seq_len, MODELS[args.model].streams)
    tokens = batch * args.seq_len
    if not args.no_parts:
        fns["output_layer"] = output_layer_step(tokens, config.d_model, config.vocab_size, config.dtype)
        fns["output_layer"]()
    # Steps, the peak matmul and the output layer alone, alternating: each sees the same outside load.
    times = interleaved(fns, args.repeats)
    best, median = min(times["step"]), statistics.median(times["step"])
    peak = matmul_rates(peak_flop, times["matmul"], peak_n, config.dtype)
    achieved = flops["train"] * tokens / best

    parts = {}
    if not args.no_parts:
        out_t = min(times["output_layer"])
        parts = {
            "output_layer_xent_s": out_t,
            "output_layer_time_share": out_t / best,
            "output_layer_flop_share": flops["share_output_layer"],
        }

    record = {
        **base_record(config, batch=batch, seq_len=args.seq_len),
        "preset": args.preset,
        "model": args.model,
        "dropout": not args.no_dropout,
        "attention_dropout": config.attention_dropout if not args.no_dropout else 0.0,
        "real_token_fraction": real,
        "compile_s": compile_s,
        "step_s_best": best,
        "step_s_median": median,
        "tokens_per_s": tokens / best,
        "tokens_per_s_median": tokens / median,
        "flops_per_token": flops["train"],
        "achieved_flops": achieved,
        "peak_fraction": achieved / peak["peak_flops"],
        "peak_fraction_median": (flops["train"] * tokens / median) / peak["peak_flops_median"],
        "executed_flops_per_token": flops["executed_train"],
        "executed_peak_fraction": flops["executed_train"] * tokens / best / peak["peak_flops"],
        **peak,
        "flop_shares": {k: round(v, 3) for k, v in flops.items() if k.startswith("share")},
        **parts,
        "peak_rss_mb": peak_rss_mb(),
    }
    return emit("model_step", record)


if __name__ == "__main__":
    from experiments.cli import restart_with_huge_pages

    restart_with_huge_pages()  # as experiments.train runs
    main()
