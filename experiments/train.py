"""Train a recommender: ``python -m experiments.train --model study``.

Every flag has a default. A preset, given first as a subcommand, changes the defaults and flags
given after it still win: ``python -m experiments.train cpu-small --model study --steps 500``.
Rerun the same command on the same --output-dir to resume.
"""

from __future__ import annotations

import sys

import tyro

from experiments.cli import EXIT_BAD_INPUT, parse_flags, restart_with_huge_pages, run_cli, setup_logging

if __name__ == "__main__":
    restart_with_huge_pages()  # before JAX is imported: the command restarts, and would import it twice

from studyrec.config import PRESETS, TrainConfig  # noqa: E402

PRESET_HELP = {
    "default": "small and quick: the bundled data on a laptop CPU in a couple of minutes",
    "cpu-small": "the side-by-side comparison with the reference on a 2-core CPU (2 layers, width 128)",
    "paper": "the reference README's paper-scale run (6 layers, width 256, batch 2048 per device, 224k steps)",
}
Presets = tyro.extras.subcommand_type_from_defaults(PRESETS, PRESET_HELP)
"""One subcommand per preset; without one, ``default``. Flags may come before or after it."""


def parse(argv: list[str]) -> TrainConfig:
    if any(arg == "--preset" or arg.startswith("--preset=") for arg in argv):  # the flag of earlier versions
        print("error: presets are subcommands now: python -m experiments.train cpu-small [flags]", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return parse_flags(
        Presets, default=PRESETS["default"], args=argv, prog="python -m experiments.train",
        markers=(tyro.conf.CascadeSubcommandArgs,), hint=f"presets, given first: {', '.join(PRESETS)}",
    )


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse(sys.argv[1:] if argv is None else argv)
    from studyrec.train.loop import train

    run_cli(lambda: print(f"run directory: {train(cfg)}"), cfg.debug)


if __name__ == "__main__":
    main()
