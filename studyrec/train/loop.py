"""The training job: :mod:`~studyrec.train.job` up to the compiled step, then :mod:`~studyrec.train.fit`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

from studyrec.config import TrainConfig
from studyrec.train import distributed, job as job_


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
            job = job_.plan(cfg)
            data, job = job_.load_data(job)
            model, optimizer, opt_state, model_config = job_.init_state(job, data)
            step_fn = job_.compiled_step(job, data, model, optimizer, opt_state)
            from studyrec.train import fit  # Grain, Orbax and the evaluation: loaded after the compile (see job)

            return fit.run(job, data, model, step_fn, opt_state, model_config, held)
    finally:
        jax.clear_caches()
