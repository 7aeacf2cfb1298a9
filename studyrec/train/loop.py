"""The training job: data, model, sharded steps, evaluation, checkpoints and the final outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

from studyrec.data import dataset
from studyrec.data.interactions import Interactions, make_chunks
from studyrec.data.packing import ClassroomPacker, Sample
from studyrec.data.pipeline import local_rows, prefetching, training_batches
from studyrec.data.vocab import Vocabulary
from studyrec.errors import TrainingError
from studyrec.evaluate import model_eval
from studyrec.evaluate.metrics import write_tables
from studyrec.models import ModelConfig, build, model_class
from studyrec.models.config import ConfigError
from studyrec import rundir, sharding
from studyrec.train import distributed, memory
from studyrec.train.best import BestParameters
from studyrec.checkpoint import Checkpoints
from studyrec.config import (
    TrainConfig,
    check_n_recommendations,
    check_output_dir,
    check_vocab_size,
    resolve_wandb,
)
from studyrec.train.lock import RunDirectoryLock
from studyrec.sharding import make_mesh, place_batch, shard_params
from studyrec.train.step import eval_sums, make_optimizer, make_train_step, schedule, summarise
from studyrec.train.tracking import Tracker

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
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)} must be at least 1")
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"--epochs {cfg.epochs} must be a finite number above 0")
    check_vocab_size(cfg.vocab_size)
    if cfg.eval_rows < 0:
        raise ValueError(f"--eval-rows {cfg.eval_rows} is negative; give a row count, or 0 to skip the periodic evaluation")
    if not 0 <= cfg.seed < 2**62:
        raise ValueError(f"--seed {cfg.seed} must be between 0 and 2**62 - 1")
    check_n_recommendations(tuple(cfg.n_recommendations))


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
        cfg.arch.model_config(4, cfg.grade_levels, cfg.seq_len, jax.default_backend(), model=cfg.model)
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
    """``cfg`` with ``steps`` set from ``epochs`` (when given), and a warm-up cut to a tenth of the
    run when ``epochs`` set the steps or a cosine decay would otherwise have no room."""
    steps, warmup = cfg.steps, cfg.warmup_steps
    if cfg.epochs is not None:
        steps = max(2, math.ceil(cfg.epochs * interactions / (global_batch * cfg.seq_len)))
    if cfg.epochs is not None or (cfg.lr_decay == "cosine" and warmup >= steps):
        warmup = min(warmup, max(1, steps // 10))
    return dataclasses.replace(cfg, steps=steps, warmup_steps=warmup)


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


def _packer(
    data: Interactions, cfg: TrainConfig, vocab: Vocabulary, origin: int, align: str = "start", chunk_size: int | None = None
) -> ClassroomPacker:
    chunks = make_chunks(data, chunk_size or cfg.chunk_size, align)
    return ClassroomPacker(
        data, chunks, cfg.seq_len, vocab.sep, origin, aligned=cfg.sampler == "aligned", context_size=cfg.classmate_chunk_size
    )


def _write_config(run_dir: Path, cfg: TrainConfig, model_config: ModelConfig, extra: dict, resumed_at: int | None) -> None:
    record = {"config": dataclasses.asdict(cfg), "model": cfg.model, "model_config": dataclasses.asdict(model_config), **extra}
    rundir.write_config(run_dir, record, resumed_at)


class _StopRequest:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit at the end of the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) a training job and writes its run directory; returns the directory.

    On return JAX's in-memory compilation caches are cleared: each job's executables hold about two
    thousand memory maps, and a few dozen jobs in one process (a sweep) would reach the kernel's
    vm.max_map_count and abort inside XLA. The persistent cache makes recompiling quick.
    """
    distributed.initialize(cfg.dist)
    try:
        # An error on one process must not leave the others waiting; the run dir's lock is held to the end.
        with distributed.leave_on_error(), contextlib.ExitStack() as held:
            return _train(cfg, held)
    finally:
        jax.clear_caches()


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> Path:
    is_main = jax.process_index() == 0
    # Every flag, input file and a resumed run's vocabulary is checked before the run dir is written.
    check_flags(cfg, jax.device_count())
    run_dir = Path(cfg.run_dir())
    check_run_dir(run_dir)
    cfg = dataclasses.replace(cfg, wandb=resolve_wandb(cfg.wandb, run_dir))  # config.json records what is used

    mesh = make_mesh(cfg.fsdp)
    n_devices = jax.device_count()
    global_batch = cfg.per_device_batch_size * n_devices
    peak_lr = cfg.learning_rate * (global_batch / 2048 if cfg.scale_lr else 1.0)

    # Data: validated frames, the vocabulary (reused on resume), encoded interactions.
    paths = dataset.DataPaths.resolve(cfg.train_data, cfg.valid_data, cfg.student_info, cfg.school_info)
    frames = dataset.Frames.load(paths)
    vocab_path = run_dir / "vocab.json"
    vocab = dataset.build_vocab(frames, cfg.vocab_size)
    if vocab_path.exists():
        saved = Vocabulary.load(vocab_path)
        if saved != vocab:
            raise ValueError(
                f"{vocab_path} holds {len(saved)} tokens, but --vocab-size {cfg.vocab_size} on these training files "
                f"gives {len(vocab)}{' with other titles' if len(saved) == len(vocab) else ''}; resume with the data "
                f"and flags the run was started with (see {run_dir / 'config.json'}), or choose a new --output-dir"
            )
    origin = dataset.time_origin(frames.train)
    train_data = dataset.encode(frames.train, vocab, frames, cfg.classroom_grouping)
    logger.info(dataset.describe("train", train_data))
    given, cfg = cfg, resolve_steps(cfg, train_data.num_interactions, global_batch)
    if (cfg.steps, cfg.warmup_steps) != (given.steps, given.warmup_steps):
        logger.info("training for %d steps with %d of warm-up (%s)", cfg.steps, cfg.warmup_steps,
                    f"{cfg.epochs:g} epochs" if cfg.epochs is not None else "the warm-up is cut to leave room for the cosine decay")
    train_packer = _packer(train_data, cfg, vocab, origin)
    valid_packer = None
    if frames.valid is not None:
        valid_data = dataset.encode(frames.valid, vocab, frames, cfg.classroom_grouping)
        logger.info(dataset.describe("valid", valid_data))
        valid_packer = _packer(valid_data, cfg, vocab, origin)

    # Model and optimizer, placed by the rule table.
    model_config = cfg.arch.model_config(vocab.logits_size, cfg.grade_levels, cfg.seq_len, jax.default_backend(), model=cfg.model)
    check_memory(cfg, model_config, n_devices)  # before a batch is packed or a file written
    model = build(cfg.model, model_config, key=jax.random.key(cfg.seed))
    optimizer = make_optimizer(
        model,
        peak_lr=peak_lr,
        warmup=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        decay_all=cfg.decay_all_params,
        lr_decay=cfg.lr_decay,
        steps=cfg.steps,
    )
    model = shard_params(model, mesh)
    opt_state = shard_params(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)

    pi, pc = jax.process_index(), jax.process_count()
    batches = training_batches(
        train_packer, seed=cfg.seed, global_batch=global_batch, num_steps=cfg.steps, process_index=pi, process_count=pc
    )
    iterator = prefetching(batches, buffer=cfg.prefetch)
    if is_main:  # every input is valid: from here on this job owns the run dir (others share it)
        held.enter_context(RunDirectoryLock(run_dir))
        prepare_run_dir(run_dir)
    checkpoints = Checkpoints(run_dir, keep=cfg.keep_checkpoints)
    # The newest intact checkpoint (a damaged one is set aside); its model kind and sizes must match.
    expect = {"model": cfg.model, "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint}
    restored = checkpoints.restore_latest(model, opt_state, iterator, expect=expect)
    start = 0
    if restored is not None:
        start, model, opt_state, _ = restored
        logger.info("resumed from step %d", start)

    extra = {"time_origin": origin, "vocab_size": len(vocab), "global_batch": global_batch, "peak_lr": peak_lr,
             "devices": n_devices, "processes": pc, "platform": jax.default_backend(),
             "vocab_fingerprint": vocab.fingerprint}
    if is_main:
        vocab.save(vocab_path)
        _write_config(run_dir, cfg, model_config, extra, start or None)
    tracker = Tracker(run_dir, {**dataclasses.asdict(cfg), **extra}, cfg.wandb, resume_step=start, enabled=is_main)
    best = BestParameters(run_dir, resume_step=start) if cfg.select_best and valid_packer is not None else None

    # Fixed rows scored every eval_every steps, packed once.
    def fixed(packer: ClassroomPacker | None) -> list[Sample]:
        """--eval-rows rounded up to whole global batches, packed once and scored a batch at a time."""
        if packer is None or cfg.eval_rows <= 0:
            return []
        batches = range(math.ceil(cfg.eval_rows / global_batch))
        far = 10**12  # from the training rows
        return [place_batch(packer.random_rows(cfg.seed + 1, local_rows(b, global_batch, pi, pc) + far), mesh) for b in batches]

    probes = {"train_": fixed(train_packer), "valid_": fixed(valid_packer)}
    focus = cfg.classmate_chunk_size is not None  # then the probes score what evaluation scores: each row's student

    def evaluate() -> dict:
        inference = eqx.nn.inference_mode(model)
        results = {}
        for prefix, batches in probes.items():
            if batches:
                sums = [eval_sums(inference, batch, vocab.oov, focus) for batch in batches]
                results.update(summarise(jax.tree.map(lambda *parts: sum(parts), *sums), prefix))
        return results

    step_fn = make_train_step(optimizer, vocab.oov)
    learning_rate = schedule(peak_lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps)
    dropout_key = jax.random.key(cfg.seed + 2)
    tokens_per_step = global_batch * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, disable=not is_main, desc=f"train {cfg.model}", dynamic_ncols=True)
    wait, tick, last_logged = 0.0, time.perf_counter(), start
    meta = {"model": cfg.model, "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint}

    def save(step: int, force: bool = False) -> None:
        checkpoints.save(step, model, opt_state, meta, iterator, force=force)

    with _StopRequest() as stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            local = next(iterator)
            wait += time.perf_counter() - t0
            model, opt_state, sums = step_fn(model, opt_state, place_batch(local, mesh), jax.random.fold_in(dropout_key, step))
            done = step + 1
            bar.update(1)
            last = done == cfg.steps
            if done % cfg.log_every == 0 or last or done % cfg.save_every == 0:
                metrics = summarise(sums, "train/")
                if not math.isfinite(metrics["train/loss"]):
                    checkpoints.wait()  # an earlier save still in flight completes; this state is never saved
                    good = checkpoints.latest_step()
                    kept = f"the last good checkpoint (step {good}) is kept" if good else "no checkpoint was written"
                    raise TrainingError(
                        f"the training loss became {metrics['train/loss']} at step {done}; {kept}. "
                        "Lower --learning-rate or set --grad-clip, then rerun (it resumes from that checkpoint)."
                    )
                elapsed = time.perf_counter() - tick
                steps_done = done - last_logged
                metrics.update({
                    "train/grad_norm": float(sums["grad_norm"]),
                    "train/learning_rate": float(learning_rate(step)),
                    "perf/steps_per_s": steps_done / elapsed,
                    "perf/tokens_per_s": steps_done * tokens_per_step / elapsed,
                    "perf/host_wait_fraction": wait / elapsed,
                })
                tick, wait, last_logged = time.perf_counter(), 0.0, done
                if done % cfg.eval_every == 0 or last:
                    metrics.update({f"eval/{k}": v for k, v in evaluate().items()})
                    if best is not None and "eval/valid_accuracy" in metrics:
                        best.offer(done, model, metrics["eval/valid_accuracy"])
                tracker.log(done, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", steps_s=f"{metrics['perf/steps_per_s']:.2f}",
                                tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
            if done % cfg.save_every == 0 or last:
                save(done)
            checkpoints.poll()  # commits a finished save at once, so a kill loses at most --save-every steps
            # Every process must stop after the same step (the save is collective), so they agree every 10 steps.
            asked = stop.signal is not None
            if pc > 1:
                asked = (done % 10 == 0 or last) and sharding.any_process(asked)
            if asked:
                save(done, force=True)
                checkpoints.wait()
                bar.close()
                logger.warning("stopped by signal %s after step %d; rerun the same command to resume",
                               stop.signal or "(on another process)", done)
                raise KeyboardInterrupt
    bar.close()
    checkpoints.wait()

    if valid_packer is not None:
        if best is not None:
            logger.info("final evaluation with the parameters of step %d (best validation accuracy %.4f)", best.step, best.score)
            model = best.restore(model)
            best.close()
        final_evaluation(cfg, model, frames, vocab, origin, mesh, global_batch, tracker, run_dir, is_main)
    tracker.finish()
    checkpoints.close()
    return run_dir


def final_evaluation(cfg, model, frames, vocab, origin, mesh, global_batch, tracker, run_dir, is_main) -> None:
    """Scores every validation interaction; writes per_student.csv, aggregate.csv, recommendations.json."""
    if cfg.eval_context == "history":
        joined, scored = dataset.with_history(frames)
        data = dataset.encode(joined, vocab, frames, cfg.classroom_grouping, scored=scored)
        # Chunks one shorter, each after the student's previous read (context only): the same row
        # lengths as in training, and no scored read is cut off from the one before it.
        lead = cfg.classmate_chunk_size is None and cfg.chunk_size > 1
        packer = _packer(data, cfg, vocab, origin, align="end", chunk_size=cfg.chunk_size - lead)
        chunk_has_scored = np.add.reduceat(data.scored, packer.chunks.start) > 0
        layout = packer.eval_layout(chunk_has_scored, lead=lead)
    else:
        data = dataset.encode(frames.valid, vocab, frames, cfg.classroom_grouping)
        packer = _packer(data, cfg, vocab, origin)
        layout = packer.eval_layout()
    k = max(cfg.n_recommendations)
    topk = model_eval.predict_topk(
        eqx.nn.inference_mode(model), layout, k=k, num_titles=vocab.num_titles, mesh=mesh,
        global_batch=global_batch, progress=is_main,
    )
    if not is_main:
        return
    per_student, aggregate = model_eval.tables(model_eval.score(data, topk, tuple(cfg.n_recommendations)))
    write_tables(run_dir, per_student, aggregate)
    model_eval.write_recommendations(run_dir / "recommendations.json", data, topk, vocab)
    tracker.table("aggregate", aggregate)
    summary = {
        f"final/{row.Evaluation_Type}/hits@{row.N_Recommendations}": row.Hits_at_N for row in aggregate.itertuples()
    }
    tracker.summary(summary)
    logger.info("final evaluation:\n%s", aggregate.to_string(index=False))
