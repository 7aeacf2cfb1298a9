"""Write a synthetic dataset: ``python -m experiments.generate_data --out DIR --n-students 1000``.

Writes student_activity_train.csv, student_activity_valid.csv, student_info.csv and
school_info.csv (the reference schema), then prints the counts and the heuristic hit rates.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from experiments.cli import parse_flags, run_cli, setup_logging
from studyrec.data.generate import GenerateConfig, generate, heuristic_hits, write


@dataclass(frozen=True)
class Config:
    out: Path
    """Output directory (created if missing)."""
    generate: Annotated[GenerateConfig, tyro.conf.arg(name="")] = GenerateConfig()
    """The generator's settings, one flag each without a prefix (``--n-students``); fields marked ``LibraryOnly`` get none."""
    check: bool = True
    """Also print the hits@1 of the classmates and own-last heuristics on the validation split."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    prog = "python -m experiments.generate_data"
    cfg = parse_flags(Config, default=None, args=sys.argv[1:] if argv is None else list(argv), prog=prog)
    run_cli(lambda: run(cfg), cfg.debug)


def flag(field: str) -> str:
    """The flag of a ``GenerateConfig`` field: ``n_students`` -> ``--n-students``."""
    return "--" + field.replace("_", "-")


def check_flags(cfg: Config) -> None:
    """Rejects flag values that cannot work, before anything is written (``GenerateConfig.validate``)."""
    cfg.generate.validate(name=flag)


def run(cfg: Config) -> dict[str, Path]:
    check_flags(cfg)

    data = generate(cfg.generate)
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
