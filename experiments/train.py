"""Train STUDY or Individual: ``python -m experiments.train --model study``.

Every flag has a default; ``--preset cpu-small`` or ``--preset paper`` changes the defaults, and
flags given explicitly still win. Rerun the same command on the same --output-dir to resume.
"""

from __future__ import annotations

import sys

from experiments.cli import EXIT_BAD_INPUT, parse_flags, preset_from_argv, run_cli, setup_logging
from studyrec.config import PRESETS, TrainConfig


def parse(argv: list[str]) -> TrainConfig:
    preset = preset_from_argv(argv)
    if preset not in PRESETS:
        print(f"error: unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return parse_flags(TrainConfig, default=PRESETS[preset], args=argv, prog="python -m experiments.train")


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse(sys.argv[1:] if argv is None else argv)
    from studyrec.train.loop import train

    run_cli(lambda: print(f"run directory: {train(cfg)}"), cfg.debug)


if __name__ == "__main__":
    main()
