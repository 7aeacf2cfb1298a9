"""How much memory a training job needs, checked against what the machine has before anything runs.

Every term is a pure function of the model config, the row length, the batch and the model kind, in
bytes per device. The estimate is deliberately on the safe side: ``tests/test_limits.py`` holds it
at or above XLA's own figure for the compiled training step (arguments + outputs + temporaries)
and within a small factor of it, so it cannot drift silently as the model changes.
"""

from __future__ import annotations

import dataclasses
import os

from studyrec.models.config import ModelConfig
from studyrec.models.decoder import GAP_BUCKETS
from studyrec.models.registry import model_class

FLOAT = 4
"""Bytes of a float32: parameters, optimizer state and every softmax are float32 whatever the compute dtype."""

SAMPLE_FIELDS = 4
"""int32 arrays of one row per token in a ``Sample`` (titles, segments, timestamps, positions)."""

HOST_SAFETY = 0.9
"""Share of the host's available memory a CPU job may plan to use (the rest: Python, XLA, the OS)."""


def parameter_count(config: ModelConfig) -> int:
    """Number of float32 parameters of the decoder (every model kind shares it)."""
    V, d, qkv, M, H = config.vocab_size, config.d_model, config.qkv_dim, config.mlp_dim, config.num_heads
    per_layer = 4 * d + 4 * d * qkv + 2 * d * M + M + d  # two LayerNorms, attention, MLP
    per_layer += H * (int(config.recency_bias) + int(config.own_bias is not None))
    total = config.num_layers * per_layer + V * d + 2 * d + V  # embedding, final LayerNorm, output bias
    total += 0 if config.tie_embeddings else d * V
    total += 0 if config.num_grade_levels is None else (config.num_grade_levels + 1) * V
    total += GAP_BUCKETS * d if config.gap_embedding else 0
    if config.copy_head:
        total += 2 * d * d + d + 2 + int(config.own_bias is not None) + int(config.copy_order_bias) + int(config.copy_seen_bias)
    if config.memory_size:
        total += d * d + d + 3  # the memory head
    return total


def streams(model: str) -> int:
    """Token streams the blocks run over: two for lag-free STUDY (content and query), else one."""
    return model_class(model).streams


def activation_bytes(config: ModelConfig, seq_len: int, rows: int, *, model: str, training: bool) -> int:
    """Intermediate values of a forward pass over ``rows`` rows (and its backward pass when ``training``).

    Training keeps every layer's values for the backward pass; inference holds one layer at a time.
    Counted in float32 whatever the compute dtype (softmaxes, LayerNorm and logits are float32).
    """
    T, s = seq_len, streams(model)
    layers = config.num_layers if training else 1
    return rows * FLOAT * (layers * _layer_values(config, T, s, training) + _head_values(config, T, training))


def _layer_values(config: ModelConfig, T: int, s: int, training: bool) -> int:
    """Floats one block holds per row: attention scores [heads, s*T, T] (raw, biased, masked,
    softmaxed, dropped out, and their gradients) and token-wise values [s*T, width]."""
    score_copies = 10 if training else 4
    width = 12 * config.d_model + 4 * config.qkv_dim + 4 * config.mlp_dim
    return score_copies * config.num_heads * s * T * T + s * T * width + 2 * T * T  # + the mask and bias inputs


def _head_values(config: ModelConfig, T: int, training: bool) -> int:
    """Floats the output layer holds per row: logits [T, vocab] (softmax, cross-entropy and, with the
    copy or memory head, its scatter, log and mixture, plus gradients), the copy head's scores [T, T]
    and the memory head's embeddings and scores [T, K, d + 8]."""
    pointers = int(config.copy_head) + int(config.memory_size > 0)
    vocab_copies = (8 + 6 * pointers) if training else (3 + 3 * pointers)
    copy_scores = 8 * T * T if config.copy_head else 0
    memory = (2 if training else 1) * T * config.memory_size * (config.d_model + 8)
    return vocab_copies * T * config.vocab_size + copy_scores + memory + 4 * T * config.d_model


def batch_bytes(seq_len: int, rows: int, memory_size: int = 0) -> int:
    """A packed batch of ``rows`` rows: ``SAMPLE_FIELDS`` int32 arrays [rows, seq_len], the grade [rows],
    three int32 memory arrays [rows, seq_len, memory_size] and, in evaluation, the int64 source of
    each token [rows, seq_len]."""
    return rows * (SAMPLE_FIELDS * 4 * seq_len + 4 + 8 * seq_len + 12 * seq_len * memory_size)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training job needs on each device, by what holds them, and on the host."""

    state: int
    """Parameters and Adam's two moments, resident for the whole run."""
    train_step: int
    """One training step: the new parameters and optimizer state, gradients, activations, the batch."""
    probes: int
    """The fixed train and validation batches, resident, scored every --eval-every steps."""
    probe_eval: int
    """Scoring the probes, one global batch's rows at a time (in parts scored at once, on a CPU)."""
    final_eval: int
    """One batch of the final evaluation (inference and top-k)."""
    host: int
    """Host memory outside the devices: packed batches waiting in the prefetch buffer."""

    @property
    def device(self) -> int:
        """The peak on one device: what stays resident plus the largest transient."""
        return self.state + self.probes + max(self.train_step, self.probe_eval, self.final_eval)

    def describe(self) -> str:
        parts = {
            "parameters and optimizer": self.state,
            "training step": self.train_step,
            "evaluation of the --eval-rows batches": self.probes + self.probe_eval,
            "final evaluation": self.final_eval,
        }
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items())


def estimate(
    config: ModelConfig,
    *,
    seq_len: int,
    per_device_batch: int,
    eval_rows_per_device: int,
    prefetch: int,
    model: str = "study",
    fsdp: int = 1,
    local_devices: int = 1,
) -> MemoryEstimate:
    """Per-device bytes of a training job (see :class:`MemoryEstimate`).

    Arguments:
        config: the model's sizes; ``config.dtype`` does not lower the estimate (see ``activation_bytes``).
        seq_len: tokens per packed row.
        per_device_batch: training rows per device per step.
        eval_rows_per_device: rows of the fixed evaluation batches held on one device (0: none).
        prefetch: training batches packed ahead on the host.
        model: a registered model name (its ``streams`` matter).
        fsdp: devices sharing each parameter.
        local_devices: devices of this process (each host batch carries rows for all of them).
    """
    params = parameter_count(config) * FLOAT // fsdp
    state = 3 * params  # parameters, Adam's mu and nu
    # New parameters and optimizer state before the old are freed, the gradients, the update and
    # Adam's intermediate moments.
    update = 6 * params
    train_step = update + activation_bytes(config, seq_len, per_device_batch, model=model, training=True)
    K = config.memory_size
    train_step += batch_bytes(seq_len, per_device_batch, K)
    probes = 2 * batch_bytes(seq_len, eval_rows_per_device, K)
    probe_eval = activation_bytes(config, seq_len, per_device_batch, model=model, training=False)  # a batch at a time
    final_eval = activation_bytes(config, seq_len, per_device_batch, model=model, training=False)
    final_eval += batch_bytes(seq_len, per_device_batch, K)
    # Batches in the buffer, the one being placed, and each packing thread's working copy.
    host = (prefetch + 1 + min(os.cpu_count() or 1, 16)) * 2 * batch_bytes(seq_len, per_device_batch * local_devices, K)
    return MemoryEstimate(state, train_step, probes, probe_eval, final_eval, host)


@dataclasses.dataclass(frozen=True)
class Available:
    """Memory a job may use: ``device`` bytes per device (None: the host's memory is the devices'),
    ``host`` bytes of host memory, and where the figures come from."""

    device: int | None
    host: int
    source: str


def host_available() -> int:
    """Bytes the host can still give: MemAvailable of /proc/meminfo, else free pages (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def available(device) -> Available:
    """What ``device`` (a jax device) and its host offer: the allocator's limit on GPU/TPU, host RAM on CPU."""
    host = host_available()
    stats = None if device.platform == "cpu" else _memory_stats(device)
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return Available(free, host, f"{device.platform.upper()} memory limit of {device.device_kind}")
    if device.platform != "cpu":
        return Available(None, 1 << 62, f"{device.platform} reports no memory figures")  # do not guess
    return Available(None, int(host * HOST_SAFETY), f"{HOST_SAFETY:.0%} of the host's available memory")


def _memory_stats(device) -> dict | None:
    try:
        return device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None


def fits(need: MemoryEstimate, have: Available, local_devices: int) -> bool:
    if have.device is None:  # devices live in host memory
        return need.device * local_devices + need.host <= have.host
    return need.device <= have.device and need.host <= have.host


def shortfall(need: MemoryEstimate, have: Available, local_devices: int) -> str:
    """``"<needed> ... but <available>"`` for an error message."""
    if have.device is None:
        total = need.device * local_devices + need.host
        shared = f", shared by {local_devices} CPU devices" if local_devices > 1 else ""
        return (
            f"needs about {format_bytes(total)} ({format_bytes(need.device)} per device: {need.describe()}; "
            f"host batches {format_bytes(need.host)}) but {format_bytes(have.host)} is available ({have.source}{shared})"
        )
    if need.device > have.device:
        return (
            f"needs about {format_bytes(need.device)} per device ({need.describe()}) but "
            f"{format_bytes(have.device)} is available ({have.source})"
        )
    return f"needs about {format_bytes(need.host)} of host memory for packed batches but {format_bytes(have.host)} is available"


def largest_fitting(estimate_for, have: Available, local_devices: int, upper: int) -> int:
    """The largest batch in ``1..upper`` whose ``estimate_for(batch)`` fits (0 when none does)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(estimate_for(mid), have, local_devices):
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"1.5 GiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while abs(n) >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def check_batch_fits(
    config: ModelConfig,
    have: Available,
    *,
    model: str,
    seq_len: int,
    per_device_batch: int,
    eval_rows: int,
    n_devices: int,
    local_devices: int,
    prefetch: int,
    fsdp: int = 1,
) -> MemoryEstimate:
    """The estimate for these flags; a ValueError naming the largest --per-device-batch-size that fits
    when it exceeds ``have``. ``eval_rows`` is --eval-rows (rounded up to whole global batches)."""

    def estimate_for(batch: int, rows: int = eval_rows) -> MemoryEstimate:
        probe_rows = -(-rows // (batch * n_devices)) * batch  # per device, in whole global batches
        return estimate(
            config, seq_len=seq_len, per_device_batch=batch, eval_rows_per_device=probe_rows, prefetch=prefetch,
            model=model, fsdp=fsdp, local_devices=local_devices,
        )

    need = estimate_for(per_device_batch)
    if fits(need, have, local_devices):
        return need
    message = f"--per-device-batch-size {per_device_batch} {shortfall(need, have, local_devices)}"
    best = largest_fitting(estimate_for, have, local_devices, per_device_batch - 1)
    if best:
        raise ValueError(f"{message}; the largest --per-device-batch-size that fits is {best}")
    if eval_rows and fits(estimate_for(1, 0), have, local_devices):
        raise ValueError(f"{message}; even --per-device-batch-size 1 does not fit with --eval-rows {eval_rows}: lower --eval-rows")
    raise ValueError(
        f"{message}; even --per-device-batch-size 1 does not fit: lower --seq-len, --vocab-size or the --arch.* sizes"
    )
