"""Write a synthetic dataset: ``python -m experiments.generate_data --out DIR --n-students 1000``.

Writes student_activity_train.csv, student_activity_valid.csv, student_info.csv and
school_info.csv (the reference schema), then prints the counts and the heuristic hit rates.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments.cli import parse_flags, run_cli, setup_logging


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
    prog = "python -m experiments.generate_data"
    cfg = parse_flags(Config, default=None, args=sys.argv[1:] if argv is None else list(argv), prog=prog)
    run_cli(lambda: run(cfg), cfg.debug)


def check_flags(cfg: Config) -> None:
    """Rejects flag values that cannot work, before anything is written."""
    if cfg.n_students < 1:
        raise ValueError(f"--n-students {cfg.n_students} must be at least 1")
    if cfg.n_titles < 4:
        raise ValueError(f"--n-titles {cfg.n_titles} must be at least 4 (one title per grade band)")
    if cfg.weeks < 2:
        raise ValueError(f"--weeks {cfg.weeks} must be at least 2 (training weeks, then --valid-weeks)")
    if not 1 <= cfg.valid_weeks < cfg.weeks:
        raise ValueError(f"--valid-weeks {cfg.valid_weeks} must be between 1 and --weeks - 1 = {cfg.weeks - 1}")
    if cfg.seed < 0:
        raise ValueError(f"--seed {cfg.seed} must be 0 or above")
    for flag in ("classroom_effect", "read_prob", "weekend_read_prob", "reread_prob"):
        value = getattr(cfg, flag)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be a probability in [0, 1]")
    try:
        dt.date.fromisoformat(cfg.start)
    except ValueError:
        raise ValueError(f"--start {cfg.start!r} is not a date; write it as YYYY-MM-DD") from None


def run(cfg: Config) -> dict[str, Path]:
    from studyrec.data.generate import generate, heuristic_hits, write

    check_flags(cfg)

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
