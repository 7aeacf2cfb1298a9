"""Write a synthetic dataset: ``python -m experiments.generate_data --out DIR --n-students 1000``.

Writes student_activity_train.csv, student_activity_valid.csv, student_info.csv and
school_info.csv (the reference schema), then prints the counts and the heuristic hit rates.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from experiments.cli import run_cli, setup_logging


@dataclass(frozen=True)
class Config:
    out: Path
    """Output directory (created if missing)."""
    n_students: int = 1000
    """Number of students."""
    seed: int = 0
    """Random seed; the same seed gives the same files."""
    classroom_effect: float = 0.7
    """Probability that a reading is one of the class's recent assignments."""
    n_titles: int = 1000
    """Catalogue size, split evenly over the grade bands 1-3, 4-6, 7-9 and 10-12."""
    weeks: int = 20
    """Length of the term in weeks."""
    valid_weeks: int = 4
    """The last weeks of the term, written to the validation file."""
    read_prob: float = 0.3
    """Probability that a student reads on a school day."""
    weekend_read_prob: float = 0.1
    """Probability that a student reads on a Saturday or Sunday."""
    reread_prob: float = 0.2
    """Probability that a reading outside the class list re-reads the student's last title."""
    start: str = "2023-01-09"
    """First day of the term (YYYY-MM-DD)."""
    check: bool = True
    """Also print the hits@1 of the classmates and own-last heuristics on the validation split."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = tyro.cli(Config, args=sys.argv[1:] if argv is None else argv, prog="python -m experiments.generate_data")
    run_cli(lambda: run(cfg), cfg.debug)


def run(cfg: Config) -> dict[str, Path]:
    from studyrec.data.generate import generate, heuristic_hits, write

    data = generate(
        cfg.n_students,
        cfg.seed,
        cfg.classroom_effect,
        n_titles=cfg.n_titles,
        weeks=cfg.weeks,
        valid_weeks=cfg.valid_weeks,
        read_prob=cfg.read_prob,
        weekend_read_prob=cfg.weekend_read_prob,
        reread_prob=cfg.reread_prob,
        start=cfg.start,
    )
    paths = write(data, cfg.out)
    titles = len(set(data.train["SHLF_NUM"]) | set(data.valid["SHLF_NUM"]))
    districts = data.school_info["Parent_Building_ID"].nunique()
    for key in ("train", "valid"):
        split = getattr(data, key)
        print(f"wrote {paths[key]}: {len(split)} interactions ({split['Date'].min()} to {split['Date'].max()})")
    print(f"wrote {paths['student_info']}: {len(data.student_info)} students, {titles} distinct titles read")
    print(f"wrote {paths['school_info']}: {len(data.school_info)} schools in {districts} district(s)")
    if cfg.check:
        hits = heuristic_hits(data)
        print(
            f"valid hits@1: classmates' top title of the previous 2 days {hits['classmates']:.3f}, "
            f"own last title {hits['own_last']:.3f}"
        )
    return paths


if __name__ == "__main__":
    main()
