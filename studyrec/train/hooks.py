"""What the training loop does besides stepping, one hook per concern, each at its own cadence.

The loop calls every hook after every step with a :class:`StepReport`; a hook acts when its
cadence says so, and may add metrics to the report for the hooks after it (logging comes last).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import equinox as eqx
import jax

from studyrec.checkpoint import Checkpoints
from studyrec.data.packing import Sample
from studyrec.errors import TrainingError
from studyrec.sharding import in_order
from studyrec.train.best import BestParameters
from studyrec.train.step import eval_sums, summarise
from studyrec.train.tracking import Tracker

logger = logging.getLogger("studyrec.train")


@dataclasses.dataclass
class StepReport:
    """One finished step: ``done`` steps so far, the new model and optimizer state, the step's metric sums."""

    done: int
    last: bool
    model: eqx.Module
    opt_state: object
    sums: dict
    metrics: dict = dataclasses.field(default_factory=dict)
    """What the hooks measured at this step; the logging hook writes it."""

    def at(self, every: int) -> bool:
        """Whether a hook of this cadence acts now (every ``every`` steps, and at the last)."""
        return self.done % every == 0 or self.last


Hook = Callable[[StepReport], None]


class TrainMetrics:
    """Loss and accuracy of the steps since the last report, the learning rate and the pace, every
    ``log_every`` steps; also at every evaluation (which reports with them) and every save (a diverged
    run stops before a non-finite state is saved)."""

    def __init__(
        self, *, log_every: int, eval_every: int, save_every: int, learning_rate, tokens_per_step: int,
        checkpoints: Checkpoints, start: int,
    ):
        self.cadences = (log_every, eval_every, save_every)
        self.learning_rate, self.tokens_per_step, self.checkpoints = learning_rate, tokens_per_step, checkpoints
        self.tick, self.wait, self.last_logged = time.perf_counter(), 0.0, start

    def waited(self, seconds: float) -> None:
        """Time the loop spent waiting for the host's next batch."""
        self.wait += seconds

    def __call__(self, report: StepReport) -> None:
        if not any(report.at(every) for every in self.cadences):
            return
        metrics = summarise(report.sums, "train/")
        if not math.isfinite(metrics["train/loss"]):
            self.checkpoints.wait()  # an earlier save still in flight completes; this state is never saved
            good = self.checkpoints.latest_step()
            kept = f"the last good checkpoint (step {good}) is kept" if good else "no checkpoint was written"
            raise TrainingError(
                f"the training loss became {metrics['train/loss']} at step {report.done}; {kept}. "
                "Lower --learning-rate or set --grad-clip, then rerun (it resumes from that checkpoint)."
            )
        elapsed = time.perf_counter() - self.tick
        steps_done = report.done - self.last_logged
        metrics.update({
            "train/grad_norm": float(report.sums["grad_norm"]),
            "train/learning_rate": float(self.learning_rate(report.done - 1)),
            "perf/steps_per_s": steps_done / elapsed,
            "perf/tokens_per_s": steps_done * self.tokens_per_step / elapsed,
            "perf/host_wait_fraction": self.wait / elapsed,
        })
        self.tick, self.wait, self.last_logged = time.perf_counter(), 0.0, report.done
        report.metrics.update(metrics)


class Evaluation:
    """Loss and accuracy of the inference-mode model on fixed train and validation batches every
    ``every`` steps, ``at_once`` batches at a time, and the best parameters by validation accuracy (``best``)."""

    def __init__(
        self, probes: dict[str, list[Sample]], *, every: int, oov: int, first_only: bool, best: BestParameters | None,
        at_once: int = 1,
    ):
        self.probes, self.every, self.oov, self.first_only, self.best = probes, every, oov, first_only, best
        self.at_once = at_once

    def scores(self, model) -> dict:
        inference = eqx.nn.inference_mode(model)
        results = {}
        for prefix, batches in self.probes.items():
            if batches:
                scored = lambda batch: jax.block_until_ready(eval_sums(inference, batch, self.oov, self.first_only))  # noqa: E731
                sums = list(in_order(scored, batches, workers=self.at_once))
                results.update(summarise(jax.tree.map(lambda *parts: sum(parts), *sums), prefix))
        return results

    def __call__(self, report: StepReport) -> None:
        if not report.at(self.every):
            return
        report.metrics.update({f"eval/{k}": v for k, v in self.scores(report.model).items()})
        if self.best is not None and "eval/valid_accuracy" in report.metrics:
            self.best.offer(report.done, report.model, report.metrics["eval/valid_accuracy"])


class Logging:
    """Writes the report's metrics (``metrics.jsonl`` and W&B) and shows them on the progress bar."""

    def __init__(self, tracker: Tracker, bar):
        self.tracker, self.bar = tracker, bar

    def __call__(self, report: StepReport) -> None:
        self.bar.update(1)
        if not report.metrics:
            return
        self.tracker.log(report.done, report.metrics)
        self.bar.set_postfix(loss=f"{report.metrics['train/loss']:.3f}", steps_s=f"{report.metrics['perf/steps_per_s']:.2f}",
                             tok_s=f"{report.metrics['perf/tokens_per_s']:.0f}")


class Saving:
    """A checkpoint every ``every`` steps and at the last, committed as soon as its write ends."""

    def __init__(self, checkpoints: Checkpoints, *, every: int, meta: dict, iterator):
        self.checkpoints, self.every, self.meta, self.iterator = checkpoints, every, meta, iterator

    def save(self, report: StepReport, force: bool = False) -> None:
        self.checkpoints.save(report.done, report.model, report.opt_state, self.meta, self.iterator, force=force)

    def __call__(self, report: StepReport) -> None:
        if report.at(self.every):
            self.save(report)
        self.checkpoints.poll()  # commits a finished save at once, so a kill loses at most --save-every steps
