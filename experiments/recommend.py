"""Next-book recommendations from a trained run: ``python -m experiments.recommend --run DIR ...``.

Writes one row per (student, rank): ``StudentID, rank, title, score`` (plus ``explanation`` with
``--explain``) as CSV or JSON, chosen by the extension of ``--out``. ``score`` is the natural log
of the model's probability that the title is the student's next read. JSON is a list of records
in the same order as the CSV rows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from experiments import cli
from experiments.cli import run_cli, setup_logging

FORMATS = (".csv", ".json")


@dataclasses.dataclass(frozen=True)
class RecommendConfig:
    """Recommend the next books for every student of an activity file, from a trained run."""

    run: Path
    """Run directory written by experiments.train (config.json, vocab.json, checkpoints/)."""
    activity: tuple[Path, ...]
    """Activity CSV/Parquet files (StudentID, SHLF_NUM, Date): the reading history to start from."""
    out: Path
    """Output file: .csv or .json (the extension picks the format); written atomically."""
    student_info: Path | None = None
    """student_info CSV (StudentID, OrgnID, GRADE_LVL_NBR): who is whose classmate. Without it STUDY sees no classmates."""
    school_info: Path | None = None
    """school_info CSV (OrgnID, Parent_Building_ID), needed by runs grouped by district."""
    k: int = 20
    """Titles per student."""
    as_of: str | None = None
    """Recommend as of this date or ISO datetime (UTC); rows at or after it are ignored. Default: after the last row."""
    exclude_read: bool = False
    """Leave out titles the student already read."""
    explain: bool = False
    """Add an explanation column saying which classmates' reads the model looked at (STUDY runs only)."""
    all_info_students: bool = False
    """Also recommend for students of --student-info without activity before --as-of (from their classmates alone)."""
    step: int | None = None
    """Checkpoint step to load (default: the latest intact one)."""
    batch_size: int | None = None
    """Rows per batch (default: from a memory budget)."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


def _parse(argv: list[str]) -> RecommendConfig:
    prog = "python -m experiments.recommend"
    return cli.parse_flags(RecommendConfig, default=None, args=argv, prog=prog)


def render(frame, suffix: str) -> str:
    """The recommendations as CSV or JSON text."""
    if suffix == ".csv":
        return frame.to_csv(index=False)
    records = frame.to_dict(orient="records")
    for record in records:
        record["StudentID"], record["rank"] = int(record["StudentID"]), int(record["rank"])
        record["score"] = float(record["score"])
    return json.dumps(records, indent=1) + "\n"


def recommend(cfg: RecommendConfig) -> None:
    suffix = cfg.out.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {cfg.out}: the extension must be .csv or .json (it picks the format)")
    if cfg.k < 1:
        raise ValueError(f"--k must be at least 1, got {cfg.k}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} must be at least 1 (or omit it to size batches from memory)")
    if cfg.step is not None and cfg.step < 0:
        raise ValueError(f"--step {cfg.step} is negative; give a checkpoint step of the run (or omit it for the latest)")
    if not cfg.activity:
        raise ValueError("--activity needs at least one file")

    import numpy as np

    from studyrec.data.atomic import write_text_atomic
    from studyrec.data.io import check_students, load_activity, load_school_info, load_student_info
    from studyrec.recommend import load_run

    run = load_run(cfg.run, step=cfg.step)
    activity = load_activity(*cfg.activity)
    info = load_student_info(cfg.student_info) if cfg.student_info else None
    schools = load_school_info(cfg.school_info) if cfg.school_info else None
    if info is not None:
        check_students(activity, info, activity_path=cfg.activity[0], info_path=cfg.student_info)
    students = None
    if cfg.all_info_students:
        if info is None:
            raise ValueError("--all-info-students needs --student-info")
        students = np.union1d(activity["StudentID"].to_numpy(), info["StudentID"].to_numpy())
    frame = run.recommend(
        activity, info, k=cfg.k, as_of=cfg.as_of, exclude_read=cfg.exclude_read, school_info=schools,
        explain=cfg.explain, students=students, batch_size=cfg.batch_size, progress=None,
    )
    write_text_atomic(cfg.out, render(frame, suffix))
    print(
        f"wrote {len(frame)} recommendations for {frame['StudentID'].nunique()} students to {cfg.out} "
        f"(run {run.path}, step {run.step}, as of {frame.attrs['as_of']}; score = log-probability)"
    )


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = _parse(sys.argv[1:] if argv is None else list(argv))
    run_cli(lambda: recommend(cfg), cfg.debug)


if __name__ == "__main__":
    main()
