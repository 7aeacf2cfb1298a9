"""Score a heuristic baseline like a trained model: ``python -m experiments.baselines --baseline knn``.

Writes a run directory (``config.json`` with ``"model": "baseline:<name>"``, ``vocab.json``,
``per_student.csv``, ``aggregate.csv``, ``recommendations.json``) through the metric code the
models use, so ``experiments.report`` can compare them side by side.

The evaluation context mirrors the models':

- ``valid-only`` (the reference's protocol): baselines are *fitted* on the training file
  (popularity, co-reading), but the only *context* of a scored interaction is the validation
  file: the student's and classmates' earlier validation rows. Training rows take part under
  identities that no scored student or classroom has, so they never count as anyone's history.
- ``history``: the student's and classmates' earlier training rows are context too.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from experiments import cli
from experiments.cli import run_cli, setup_logging
from studyrec.config import DataConfig, Flat

Baseline = Literal["popularity", "popularity_by_grade", "knn", "classmates_recent", "classmates_recent_lagged", "own_last"]


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Score a heuristic recommender on the validation data and write a run directory."""

    baseline: Baseline
    """popularity (overall), popularity_by_grade, knn (item co-reading), classmates_recent (last 2 days), classmates_recent_lagged (what the reference STUDY mask can see), or own_last."""
    data: Flat = DataConfig()
    """The data: the training files fit the baseline (and are context with --eval-context history), the validation files are scored."""
    output_dir: str = "runs/baseline_{baseline}"
    """Run directory to write ({baseline} is replaced by the name)."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""

    def run_dir(self) -> str:
        return self.output_dir.format(baseline=self.baseline)


def _parse(argv: list[str]) -> BaselineConfig:
    prog = "python -m experiments.baselines"
    return cli.parse_flags(BaselineConfig, default=None, args=argv, prog=prog)


def _frame(data, rows):
    """The baselines' frame (StudentID, title_id, timestamp, classroom, grade) of interactions ``rows``."""
    import pandas as pd

    owner = data.student_of[rows]
    return pd.DataFrame(
        {
            "StudentID": data.students[owner],
            "title_id": data.titles[rows],
            "timestamp": data.timestamps[rows],
            "classroom": data.classroom[owner],
            "grade": data.grade[owner],
        }
    )


def check_flags(cfg: BaselineConfig) -> None:
    """Rejects flag values that cannot work, before anything is read or written."""
    from studyrec.config import check_output_dir

    cfg.data.check()
    check_output_dir(cfg.output_dir, "baseline")


def score_baseline(cfg: BaselineConfig):
    """Runs the baseline; returns ``(data, topk, vocab, frames)`` (topk covers data's scored rows)."""
    import numpy as np

    from studyrec.data import dataset
    from studyrec.evaluate.baselines import recommend_baseline

    ns = tuple(cfg.data.n_recommendations)
    paths = dataset.DataPaths.resolve(cfg.data.train_data, cfg.data.valid_data, cfg.data.student_info, cfg.data.school_info)
    frames = dataset.Frames.load(paths)
    if frames.valid is None:
        raise ValueError("no validation data to score: give --valid-data")
    vocab = dataset.build_vocab(frames, cfg.data.vocab_size)
    k = min(max(ns), vocab.num_titles)  # a smaller catalogue: every title (hits@n past it are scored on all)
    if cfg.data.eval_context == "history":
        joined, scored = dataset.with_history(frames)
        data = dataset.encode(joined, vocab, frames, cfg.data.classroom_grouping, scored=scored)
        history = _frame(data, np.flatnonzero(~data.scored))
    else:
        data = dataset.encode(frames.valid, vocab, frames, cfg.data.classroom_grouping)
        train = dataset.encode(frames.train, vocab, frames, cfg.data.classroom_grouping)
        history = _frame(train, np.arange(train.num_interactions))
        # Fitting data only: identities no scored student or classroom has.
        history["StudentID"] = -1 - history["StudentID"]
        history["classroom"] = -1 - history["classroom"]
    rows = np.flatnonzero(data.scored)
    topk = np.zeros((data.num_interactions, k), np.int32)
    topk[rows] = recommend_baseline(cfg.baseline, history, _frame(data, rows), vocab.num_titles, k)
    return data, topk, vocab, frames


def run_baseline(cfg: BaselineConfig):
    from pathlib import Path

    from studyrec.data import dataset
    from studyrec import rundir
    from studyrec.evaluate import model_eval
    from studyrec.evaluate.metrics import write_tables
    from studyrec.train.lock import RunDirectoryLock

    check_flags(cfg)
    out = Path(cfg.run_dir())
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {out} is a file; give a directory")
    data, topk, vocab, frames = score_baseline(cfg)
    stats = model_eval.score(data, topk, tuple(cfg.data.n_recommendations))
    per_student, aggregate = model_eval.tables(stats)
    with RunDirectoryLock(out):  # creates the directory; refused while another job writes it
        rundir.save_vocab(out, vocab)
        record = {
            "config": dataclasses.asdict(cfg),
            "model": f"baseline:{cfg.baseline}",
            "time_origin": dataset.time_origin(frames.train),
            "vocab_size": len(vocab),
            "eval_context": cfg.data.eval_context,
        }
        rundir.write_config(out, record)
        write_tables(out, per_student, aggregate)
        model_eval.write_recommendations(out / "recommendations.json", data, topk, vocab)
    print(aggregate.to_string(index=False))
    print(f"run directory: {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = _parse(sys.argv[1:] if argv is None else list(argv))
    run_cli(lambda: run_baseline(cfg), cfg.debug)


if __name__ == "__main__":
    main()
