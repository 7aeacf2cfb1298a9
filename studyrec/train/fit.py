"""A training job from its compiled step on: the run directory (lock, restore, records), the loop (the
step, then :mod:`~studyrec.train.hooks`) and the final evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

from studyrec import rundir, sharding
from studyrec.checkpoint import Checkpoints
from studyrec.config import TrainConfig
from studyrec.data import dataset
from studyrec.data.packing import ClassroomPacker, Sample, local_rows
from studyrec.data.pipeline import prefetching, training_batches
from studyrec.evaluate import model_eval
from studyrec.evaluate.metrics import write_tables
from studyrec.models import ModelConfig
from studyrec.sharding import place_batch
from studyrec.train import hooks
from studyrec.train.best import BestParameters
from studyrec.train.checks import prepare_run_dir
from studyrec.train.job import Job, TrainingData, make_packer
from studyrec.train.lock import RunDirectoryLock
from studyrec.train.step import schedule
from studyrec.train.tracking import Tracker

logger = logging.getLogger("studyrec.train")


def run(job: Job, data: TrainingData, model, step_fn, opt_state, model_config: ModelConfig,
        held: contextlib.ExitStack) -> Path:
    """Trains from the newest checkpoint (or from the start) with the compiled ``step_fn``, then scores
    the validation data; ``held`` keeps the run directory's lock to the end of the job."""
    iterator = prefetching(_batches(job, data.train_packer), buffer=job.cfg.prefetch)
    facts = _run_facts(job, data)
    checkpoints, start, model, opt_state = _open_run(job, data, model, opt_state, model_config, facts, iterator, held)
    tracker = Tracker(job.run_dir, {**dataclasses.asdict(job.cfg), **facts}, job.cfg.wandb,
                      resume_step=start, enabled=job.is_main)
    model = _loop(job, data, model, step_fn, opt_state, iterator, checkpoints, tracker, start)
    if data.valid_packer is not None:
        final_evaluation(job, data, model, tracker)
    tracker.finish()
    checkpoints.close()
    return job.run_dir


def _write_config(run_dir: Path, cfg: TrainConfig, model_config: ModelConfig, extra: dict, resumed_at: int | None) -> None:
    record = {
        "config": dataclasses.asdict(cfg), "model": cfg.model, "model_names": rundir.MODEL_NAMES,
        "model_config": dataclasses.asdict(model_config), **extra,
    }
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


def _batches(job: Job, packer: ClassroomPacker):
    """This process's slices of the training batches (Grain, checkpointable)."""
    return training_batches(
        packer, seed=job.cfg.seed, global_batch=job.global_batch, num_steps=job.cfg.steps,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def _open_run(
    job: Job, data: TrainingData, model, opt_state, model_config: ModelConfig, facts: dict, iterator,
    held: contextlib.ExitStack,
):
    """Takes the run directory (every input is valid by now), restores its newest intact checkpoint and
    records the config and ``facts``: ``(checkpoints, start step, model, opt_state)``."""
    cfg, vocab = job.cfg, data.vocab
    if job.is_main:  # from here on this job owns the run dir (other processes share it)
        held.enter_context(RunDirectoryLock(job.run_dir))
        prepare_run_dir(job.run_dir)
    checkpoints = Checkpoints(job.run_dir, keep=cfg.keep_checkpoints)
    # The newest intact checkpoint (a damaged one is set aside); its model kind and sizes must match.
    expect = rundir.checkpoint_meta(cfg.model, vocab)
    restored = checkpoints.restore_latest(model, opt_state, iterator, expect=expect, upgrade=rundir.upgrade_meta)
    start = 0
    if restored is not None:
        start, model, opt_state, _ = restored
        logger.info("resumed from step %d", start)
    if job.is_main:
        rundir.save_vocab(job.run_dir, vocab)
        _write_config(job.run_dir, cfg, model_config, facts, start or None)
    return checkpoints, start, model, opt_state


def _run_facts(job: Job, data: TrainingData) -> dict:
    """What config.json, the tracker and the checkpoints record besides the flags."""
    return {"time_origin": data.origin, "vocab_size": len(data.vocab), "global_batch": job.global_batch,
            "peak_lr": job.peak_lr, "devices": jax.device_count(), "processes": jax.process_count(),
            "platform": jax.default_backend(), "vocab_fingerprint": data.vocab.fingerprint}


def _probe_parts(job: Job) -> int:
    """Parts of each global batch of probe rows, scored at once: ``scoring_workers()`` where the
    parts divide over the devices, else 1. Scoring them so takes no more memory than one global
    batch at a time (and 8.5% less time on a 2-core CPU)."""
    parts = sharding.scoring_workers()
    return 1 if job.global_batch % (parts * jax.device_count()) else parts


def _probes(job: Job, packer: ClassroomPacker | None) -> list[Sample]:
    """--eval-rows rounded up to whole global batches, packed once, each in ``_probe_parts`` batches."""
    cfg = job.cfg
    if packer is None or cfg.eval_rows <= 0:
        return []
    pi, pc = jax.process_index(), jax.process_count()
    parts = _probe_parts(job)
    rows, far = job.global_batch // parts, 10**12  # far: from the training rows
    return [
        place_batch(packer.random_rows(cfg.seed + 1, local_rows(b, rows, pi, pc) + far), job.mesh)
        for b in range(math.ceil(cfg.eval_rows / job.global_batch) * parts)
    ]


def _loop(job: Job, data: TrainingData, model, step_fn, opt_state, iterator, checkpoints: Checkpoints, tracker: Tracker,
         start: int):
    """The training loop from ``start``: the compiled step, then each hook; returns the model to evaluate
    (the best parameters by validation accuracy, with ``--select-best``)."""
    cfg, vocab = job.cfg, data.vocab
    best = BestParameters(job.run_dir, resume_step=start) if cfg.select_best and data.valid_packer is not None else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not job.is_main, desc=f"train {cfg.model}", dynamic_ncols=True)
    meta = rundir.checkpoint_meta(cfg.model, vocab)
    evaluation = hooks.Evaluation(
        {"train_": _probes(job, data.train_packer), "valid_": _probes(job, data.valid_packer)}, every=cfg.eval_every,
        at_once=_probe_parts(job),
        oov=vocab.oov, first_only=cfg.classmate_chunk_size is not None, best=best,  # focus rows: score their student
    )
    measure = hooks.TrainMetrics(
        log_every=cfg.log_every, eval_every=cfg.eval_every, save_every=cfg.save_every, checkpoints=checkpoints, start=start,
        learning_rate=schedule(job.peak_lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps),
        tokens_per_step=job.global_batch * cfg.seq_len,
    )
    saving = hooks.Saving(checkpoints, every=cfg.save_every, meta=meta, iterator=iterator)
    every_step: list[hooks.Hook] = [measure, evaluation, hooks.Logging(tracker, bar), saving]

    dropout_key = jax.random.key(cfg.seed + 2)
    with _StopRequest() as stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            local = next(iterator)
            measure.waited(time.perf_counter() - t0)
            model, opt_state, sums = step_fn(model, opt_state, place_batch(local, job.mesh), jax.random.fold_in(dropout_key, step))
            report = hooks.StepReport(step + 1, step + 1 == cfg.steps, model, opt_state, sums)
            for hook in every_step:
                hook(report)
            # Every process must stop after the same step (the save is collective), so they agree every 10 steps.
            asked = stop.signal is not None
            if jax.process_count() > 1:
                asked = (report.done % 10 == 0 or report.last) and sharding.any_process(asked)
            if asked:
                saving.save(report, force=True)
                checkpoints.wait()
                bar.close()
                logger.warning("stopped by signal %s after step %d; rerun the same command to resume",
                               stop.signal or "(on another process)", report.done)
                raise KeyboardInterrupt
    bar.close()
    checkpoints.wait()
    if best is not None:
        logger.info("final evaluation with the parameters of step %d (best validation accuracy %.4f)", best.step, best.score)
        model = best.restore(model)
        best.close()
    return model


def final_evaluation(job: Job, data: TrainingData, model, tracker: Tracker) -> None:
    """Scores every validation interaction; writes per_student.csv, aggregate.csv, recommendations.json."""
    cfg, frames, vocab, origin, run_dir = job.cfg, data.frames, data.vocab, data.origin, job.run_dir
    if cfg.data.eval_context == "history":
        joined, scored = dataset.with_history(frames)
        scoring = dataset.encode(joined, vocab, frames, cfg.data.classroom_grouping, scored=scored)
        # Chunks one shorter, each after the student's previous read (context only): the same row
        # lengths as in training, and no scored read is cut off from the one before it.
        lead = cfg.classmate_chunk_size is None and cfg.chunk_size > 1
        packer = make_packer(scoring, cfg, vocab, origin, align="end", chunk_size=cfg.chunk_size - lead)
        chunk_has_scored = np.add.reduceat(scoring.scored, packer.chunks.start) > 0
        layout = packer.eval_layout(chunk_has_scored, lead=lead)
    else:
        scoring = dataset.encode(frames.valid, vocab, frames, cfg.data.classroom_grouping)
        packer = make_packer(scoring, cfg, vocab, origin)
        layout = packer.eval_layout()
    k = max(cfg.data.n_recommendations)
    topk = model_eval.predict_topk(
        eqx.nn.inference_mode(model), layout, k=k, num_titles=vocab.num_titles, mesh=job.mesh,
        global_batch=job.global_batch, progress=job.is_main,
    )
    if not job.is_main:
        return
    per_student, aggregate = model_eval.tables(model_eval.score(scoring, topk, tuple(cfg.data.n_recommendations)))
    write_tables(run_dir, per_student, aggregate)
    model_eval.write_recommendations(run_dir / "recommendations.json", scoring, topk, vocab)
    tracker.table("aggregate", aggregate)
    summary = {
        f"final/{row.Evaluation_Type}/hits@{row.N_Recommendations}": row.Hits_at_N for row in aggregate.itertuples()
    }
    tracker.summary(summary)
    logger.info("final evaluation:\n%s", aggregate.to_string(index=False))
