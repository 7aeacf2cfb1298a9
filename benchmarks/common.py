"""Shared helpers for the benchmarks: timers, device description, measured matmul peak, RSS, FLOP counts,
JSON lines.

Every benchmark prints exactly one JSON line on stdout (progress goes to stderr), carrying the
device, the host's 1-minute load average at the time, shapes, dtype and the measured figures.
Nothing here is estimated: the peak is the best rate of a large jitted matmul timed in the same
process, just before the measurement that is compared with it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import cache

import numpy as np

from experiments.cli import COMPILED


def log(*args) -> None:
    """Progress to stderr, so stdout keeps only the JSON line."""
    print(*args, file=sys.stderr, flush=True)


def load_average() -> float:
    """The host's 1-minute load average (other users of a shared machine show up here)."""
    return round(os.getloadavg()[0], 2)


@cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """The JAX device the benchmark ran on, named so numbers can be compared across machines."""
    import jax

    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else f"{cpu_model()} ({os.cpu_count()} cores)"
    return {
        "device": kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return float("nan")


def json_line(record: dict) -> None:
    """Prints ``record`` as one JSON line on stdout (numpy scalars and arrays as plain JSON)."""
    print(json.dumps(record, default=_jsonable), flush=True)


def emit(name: str, record: dict) -> dict:
    """Prints one JSON line: benchmark name, device, load average, glibc's tunables, then the record."""
    line = {"benchmark": name, **device_info(), "load_avg_1m": load_average(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **record}  # huge pages or not
    json_line(line)
    return line


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# --- timing --------------------------------------------------------------------------------------


class Stopwatch:
    """Wall seconds spent inside a ``with`` block, in ``.seconds``; also stored as ``into[key]`` when given.

        with Stopwatch(stages, "load_s"):
            frame = load_activity(...)
    """

    def __init__(self, into: dict | None = None, key: str | None = None):
        self.into, self.key, self.seconds = into, key, float("nan")

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.into is not None:
            self.into[self.key] = self.seconds


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()`` (which must block until its result is ready),
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            fn()
        times.append(watch.seconds)
    return times


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Minimum and all wall times of ``fn()`` (which must block until its result is ready)."""
    times = timed(fn, repeats, warmup)
    return min(times), times


def compile_timed(jitted, *args):
    """``jitted`` lowered and compiled for ``args``: ``(compiled, seconds the compilation took)``."""
    with Stopwatch() as watch:
        compiled = jitted.lower(*args).compile()
    return compiled, watch.seconds


def train_steps(step, model, opt_state, batch, keys) -> tuple[object, object, dict, list[float]]:
    """Runs a train step (``studyrec.train.step.make_train_step``) once per key on one placed batch,
    blocking on each result: ``(model, opt_state, sums of the last step, wall time of each step)``."""
    import jax

    times, sums = [], None
    for key in keys:
        with Stopwatch() as watch:
            model, opt_state, sums = step(model, opt_state, batch, key)
            jax.block_until_ready(sums)
        times.append(watch.seconds)
    return model, opt_state, sums, times


def mean_loss(sums: dict) -> float:
    """The mean loss of a train step's summed metrics."""
    return float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0)


def matmul_kernel(dtype: str = "float32", n: int | None = None, chain: int | None = None):
    """A timed-ready dense matmul: ``(run, flops)`` where ``run()`` blocks until done.

    One call runs ``chain`` dependent ``n x n`` products inside one jitted loop, so dispatch cost
    does not count. Default sizes: 2048 on CPU, 8192 on accelerators.
    """
    import jax
    import jax.numpy as jnp

    on_cpu = jax.default_backend() == "cpu"
    n = n or (2048 if on_cpu else 8192)
    chain = chain or (2 if on_cpu else 20)
    dt = jnp.dtype(dtype)
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.float32).astype(dt)
    # Scaled so repeated products neither blow up nor vanish (and cannot be hoisted out of the loop).
    w = (jax.random.normal(kw, (n, n), jnp.float32) / np.sqrt(n)).astype(dt)

    @jax.jit
    def run(x, w):
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

    run(x, w).block_until_ready()
    return (lambda: run(x, w).block_until_ready()), 2.0 * n**3 * chain, n


def matmul_peak(
    dtype: str = "float32", n: int | None = None, chain: int | None = None, repeats: int = 5, warmup: int = 0
) -> dict:
    """The device's dense matmul rate for ``dtype``, measured now: best of ``repeats`` timed calls
    (after the one call that compiles it and ``warmup`` more)."""
    run, flops, n = matmul_kernel(dtype, n, chain)
    best, _ = best_time(run, repeats=repeats, warmup=warmup)
    return {"peak_flops": flops / best, "peak_n": n, "peak_dtype": dtype}


def matmul_rates(flops: float, times: list[float], n: int, dtype: str) -> dict:
    """The matmul peak from the wall times of a ``matmul_kernel`` call doing ``flops``: best and median rates."""
    return {
        "peak_flops": flops / min(times),
        "peak_flops_median": flops / statistics.median(times),
        "peak_n": n,
        "peak_dtype": dtype,
    }


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Times each blocking callable ``repeats`` times, alternating, so that load from other users of a
    shared machine hits all of them alike; returns every wall time per name."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with Stopwatch() as watch:
                fn()
            times[name].append(watch.seconds)
    return times


# --- analytic FLOP counts --------------------------------------------------------------------------


def decoder_flops_per_token(config, seq_len: int, streams: int = 1) -> dict:
    """Matmul FLOPs per token of one forward pass (embedding lookups excluded).

    Per layer: q, k, v and output projections, attention scores (QK^T) and weighted values (over
    all ``seq_len`` keys: the mask does not skip work), the two MLP matmuls; then the output layer
    over the vocabulary, and the copy head when the config has one (its query and key projections and
    scores; its scatter-add onto the vocabulary is not a matmul). Forward + backward is 3x the forward.

    ``forward`` and ``train`` count one stream: the decoder's work per token, as the reference's
    model does it. ``executed_forward`` and ``executed_train`` count what a model of ``streams``
    streams (``DecoderModel.streams``) multiplies: every layer but the last runs the queries, output
    projections, attention and MLP of each stream (keys and values come from the content stream
    alone), and the last layer and the output layer run the predicting stream only, as ``Study`` does.
    """
    d, qkv, mlp, V = config.d_model, config.qkv_dim, config.mlp_dim, config.vocab_size

    def layer(rows: int) -> tuple[int, int, int]:  # (projections, attention, MLP) with ``rows`` query rows per token
        return 2 * ((2 * rows + 2) * d * qkv), rows * 2 * 2 * seq_len * qkv, rows * 2 * 2 * d * mlp

    proj, attn, mlp_f = layer(1)
    out = 2 * d * V
    copy = 2 * (2 * d * d + seq_len * d) if getattr(config, "copy_head", False) else 0
    fwd = config.num_layers * (proj + attn + mlp_f) + out + copy
    executed = fwd + (config.num_layers - 1) * (sum(layer(streams)) - sum(layer(1)))
    return {
        "forward": fwd,
        "train": 3 * fwd,
        "executed_forward": executed,
        "executed_train": 3 * executed,
        "share_output_layer": out / fwd,
        "share_copy_head": copy / fwd,
        "share_attention_scores": config.num_layers * attn / fwd,
        "share_projections": config.num_layers * proj / fwd,
        "share_mlp": config.num_layers * mlp_f / fwd,
    }


# --- synthetic packed batches ----------------------------------------------------------------------


def generated_packer(
    n_students: int = 3000,
    *,
    seq_len: int = 65,
    chunk: int | None = None,
    vocab_size: int = 2000,
    seed: int = 0,
    class_size: tuple[int, int] = (15, 30),
    grouping: str = "school_grade",
    memory: dict | None = None,
):
    """A ClassroomPacker over generated data (in memory, no files) and its vocabulary; with
    ``memory`` (``studyrec.models.memory_options``) its rows carry the classroom memory."""
    import pandas as pd

    from studyrec.data import ClassroomPacker, Interactions, Vocabulary, make_chunks
    from studyrec.data.generate import GenerateConfig, generate
    from studyrec.data.memory import ClassroomMemory

    data = generate(
        GenerateConfig(n_students=n_students, seed=seed, n_titles=int(vocab_size * 1.2), class_size=class_size)
    )
    frame = pd.concat([data.train, data.valid], ignore_index=True)
    frame["timestamp"] = pd.to_datetime(frame["Date"]).to_numpy().astype("datetime64[s]").astype(np.int64)
    vocab = Vocabulary.build(frame["SHLF_NUM"], max_size=vocab_size)
    inter = Interactions.from_frame(frame, vocab, data.student_info, data.school_info, grouping)
    chunks = make_chunks(inter, chunk or seq_len)
    origin = int(frame["timestamp"].min())
    origin -= origin % 86400
    reads = ClassroomMemory.optional(inter, origin, memory)
    return ClassroomPacker(inter, chunks, seq_len, vocab.sep, origin, memory=reads), vocab


def preset_training(cfg, model, mesh, oov: int):
    """What ``experiments.train`` trains ``model`` with under the preset ``cfg``: ``(model, opt_state,
    step)``, the model and the optimizer's state placed on ``mesh``, ``step`` the jitted train step."""
    import equinox as eqx
    import jax

    from studyrec.sharding import shard_params
    from studyrec.train.step import make_optimizer, make_train_step

    optimizer = make_optimizer(
        model, peak_lr=cfg.learning_rate, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, decay_all=cfg.decay_all_params,
    )
    model = shard_params(model, mesh)
    opt_state = shard_params(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
    jax.clear_caches()  # as experiments.train before it compiles the step: initialisation's executables go
    return model, opt_state, make_train_step(optimizer, oov)


def base_record(config, *, batch: int, seq_len: int) -> dict:
    return {
        "dtype": config.dtype,
        "batch": batch,
        "seq_len": seq_len,
        "vocab_size": config.vocab_size,
        "num_layers": config.num_layers,
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "mlp_dim": config.mlp_dim,
    }


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) while active: recompilation shows up here."""

    EVENT = COMPILED

    def __init__(self):
        self.count, self.seconds, self.names = 0, 0.0, []

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration
            self.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        try:
            jax.monitoring.unregister_event_duration_listener(self._listen)
        except Exception:  # older jax: listeners cannot be removed; keep counting harmlessly
            pass
