"""Every check a training job makes before it reads data or writes a file: flags, model sizes,
memory and the run directory. Each failure is one ValueError (or OSError) naming the flag to change."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import jax

from studyrec.config import TrainConfig, check_output_dir
from studyrec.models import ModelConfig, model_class
from studyrec.models.config import ConfigError
from studyrec.train import memory

logger = logging.getLogger("studyrec.train")


def check_flags(cfg: TrainConfig, n_devices: int) -> None:
    """Rejects flag values that cannot work, before anything is read or written."""
    try:
        model_class(cfg.model)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    _check_counts(cfg)
    _check_optimizer(cfg)
    check_output_dir(cfg.output_dir, "model")
    if cfg.fsdp < 1 or n_devices % cfg.fsdp:
        divisors = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
        raise ValueError(f"--fsdp {cfg.fsdp} does not divide the {n_devices} devices; use one of {divisors}")
    if cfg.student_chunk_size is not None and cfg.student_chunk_size < 1:
        raise ValueError(f"--student-chunk-size {cfg.student_chunk_size} must be at least 1 (or omit it to use --seq-len)")
    if cfg.chunk_size > cfg.seq_len:
        raise ValueError(
            f"--student-chunk-size {cfg.chunk_size} is larger than --seq-len {cfg.seq_len}; "
            f"make it at most {cfg.seq_len} or raise --seq-len"
        )
    room = cfg.seq_len - cfg.chunk_size - 1
    if cfg.classmate_chunk_size is not None and not 1 <= cfg.classmate_chunk_size <= room:
        raise ValueError(
            f"--classmate-chunk-size {cfg.classmate_chunk_size} must be between 1 and --seq-len - "
            f"--student-chunk-size - 1 = {room}"
        )
    check_arch(cfg)


def _check_counts(cfg: TrainConfig) -> None:
    """Step counts, sizes and list flags: whole numbers in their ranges."""
    positive = (
        "steps", "seq_len", "per_device_batch_size", "eval_every", "save_every", "log_every", "keep_checkpoints", "prefetch",
    )
    for flag in positive:
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)} must be at least 1")
    if not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"--epochs {cfg.epochs} must be a finite number above 0")
    cfg.data.check()
    if cfg.eval_rows < 0:
        raise ValueError(f"--eval-rows {cfg.eval_rows} is negative; give a row count, or 0 to skip the periodic evaluation")
    if not 0 <= cfg.seed < 2**62:
        raise ValueError(f"--seed {cfg.seed} must be between 0 and 2**62 - 1")


def _check_optimizer(cfg: TrainConfig) -> None:
    """Learning rate, warm-up, weight decay and clipping: finite, and of the right sign."""
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ValueError(f"--learning-rate {cfg.learning_rate} must be a finite number above 0 (e.g. 0.001)")
    if cfg.warmup_steps < 0:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps} is negative; give 0 for no warm-up")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"--weight-decay {cfg.weight_decay} must be a finite number, 0 or above")
    if cfg.grad_clip is not None and not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise ValueError(f"--grad-clip {cfg.grad_clip} must be a finite number above 0, or None for no clipping")


# ``ModelConfig`` fields that do not come from an --arch.* flag of the same name.
_MODEL_FLAGS = {"num_grade_levels": "--grade-levels", "max_len": "--seq-len", "vocab_size": "--vocab-size"}


def check_arch(cfg: TrainConfig) -> None:
    """The model's own checks (``ModelConfig.validate``), reported with the flag to change."""
    try:
        cfg.model_config(4, jax.default_backend())
    except ConfigError as e:
        flag = _MODEL_FLAGS.get(e.field, f"--arch.{e.field.replace('_', '-')}")
        raise ValueError(f"{flag} {e.value}: {e.reason}") from None


def check_memory(cfg: TrainConfig, model_config: ModelConfig, n_devices: int) -> None:
    """Refuses a job whose step, evaluation or prefetched batches cannot fit in memory (see ``memory``)."""
    need = memory.check_batch_fits(
        model_config, memory.available(jax.local_devices()[0]), model=cfg.model, seq_len=cfg.seq_len,
        per_device_batch=cfg.per_device_batch_size, eval_rows=cfg.eval_rows, n_devices=n_devices,
        local_devices=jax.local_device_count(), prefetch=cfg.prefetch, fsdp=cfg.fsdp,
    )
    logger.info("memory: about %s per device (%s)", memory.format_bytes(need.device), need.describe())


def resolve_steps(cfg: TrainConfig, interactions: int, global_batch: int) -> TrainConfig:
    """``cfg`` with ``steps`` set from ``epochs`` (when ``steps`` is not given), a warm-up cut to a
    tenth of the run when ``epochs`` set the steps or a cosine decay would otherwise have no room,
    and ten evaluations a run when ``eval_every`` is not given."""
    steps, warmup = cfg.steps, cfg.warmup_steps
    from_epochs = steps is None
    if from_epochs:
        steps = max(2, math.ceil(cfg.epochs * interactions / (global_batch * cfg.seq_len)))
    if from_epochs or (cfg.lr_decay == "cosine" and warmup >= steps):
        warmup = min(warmup, max(1, steps // 10))
    eval_every = cfg.eval_every or max(1, math.ceil(steps / 10))
    return dataclasses.replace(cfg, steps=steps, warmup_steps=warmup, eval_every=eval_every)


def check_run_dir(path: Path) -> None:
    """Fails, creating nothing, when the run directory cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is a file; give a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is inside {existing}, which is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--output-dir {path}: {existing} is not writable; choose another directory")


def prepare_run_dir(path: Path) -> None:
    check_run_dir(path)
    probe = path / ".write_test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--output-dir {path} is not writable ({e.strerror}); choose another directory") from None
