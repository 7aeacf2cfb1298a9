"""Fetch public datasets in the reference schema: ``python -m experiments.datasets movielens --out DIR``.

The MovieLens licence forbids redistribution: keep the output out of git (``data/`` is ignored).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from experiments.cli import run_cli, setup_logging


@dataclass(frozen=True)
class MovieLens:
    """MovieLens-100k, taken from the RecBole 1.2.1 wheel (downloaded once with pip, then cached)."""

    out: Path = Path("data/ml-100k")
    """Output directory for the four CSVs (never commit it: the licence forbids redistribution)."""
    valid_weeks: int | None = None
    """The last weeks of the log used for validation; default: the fewest holding >= 10%."""
    cache: Path | None = None
    """Where to keep the downloaded wheel; default: $XDG_CACHE_HOME/studyrec or ~/.cache/studyrec."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


def movielens(cfg: MovieLens) -> None:
    from studyrec.data.generate import write
    from studyrec.data.movielens import movielens_100k

    data = movielens_100k(cfg.valid_weeks, cfg.cache)
    paths = write(data, cfg.out)
    n = len(data.train) + len(data.valid)
    print(f"wrote {paths['train']}: {len(data.train)} interactions")
    share = len(data.valid) / n
    print(f"wrote {paths['valid']}: {len(data.valid)} interactions ({share:.1%}, from {data.valid['Date'].min()})")
    print(f"wrote {paths['student_info']}: {len(data.student_info)} users")
    print(f"wrote {paths['school_info']}: {len(data.school_info)} zip-code regions")


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = tyro.extras.subcommand_cli_from_dict(
        {"movielens": MovieLens},
        args=sys.argv[1:] if argv is None else argv,
        prog="python -m experiments.datasets",
    )
    run_cli(lambda: movielens(cfg), cfg.debug)


if __name__ == "__main__":
    main()
