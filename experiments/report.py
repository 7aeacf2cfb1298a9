"""Compare runs and baselines: ``python -m experiments.report runs/study runs/baseline_knn --out report``.

Reads each run directory's ``aggregate.csv`` (and ``config.json`` for its model name) and writes
``report.png`` (hits@n against n, one panel per evaluation subset, one line per run) and
``report.md`` (the same numbers as a Markdown table), atomically. A run logged to W&B (it has
``wandb_id.txt``) gets the table too, unless W&B is disabled; offline runs stay offline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import tyro

from experiments import cli
from experiments.cli import run_cli, setup_logging

logger = logging.getLogger("studyrec.report")

SUBSETS = ("all", "non_continuation", "non_history")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Draw hits@n curves of several runs and baselines side by side."""

    runs: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Run directories, each with aggregate.csv (trained models and experiments.baselines output)."""
    out: Path = Path("report")
    """Output directory for report.png and report.md."""
    metric: str = "Hits_at_N"
    """Column of aggregate.csv to draw (Hits_at_N or NDCG_at_N)."""
    wandb: bool = True
    """Log the table to the W&B run of each run directory that has wandb_id.txt (unless W&B is disabled)."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    path: Path
    label: str
    aggregate: object  # pd.DataFrame


def read_run(path: Path) -> RunResult:
    """A run's aggregate table and a label ``<dir name> (<model>)``."""
    import pandas as pd

    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run directory not found")
    table = path / "aggregate.csv"
    if not table.exists():
        raise FileNotFoundError(f"{path}: no aggregate.csv (the final evaluation writes it; did the run finish?)")
    aggregate = pd.read_csv(table)
    missing = {"Evaluation_Type", "N_Recommendations", "Hits_at_N"} - set(aggregate.columns)
    if missing:
        raise ValueError(f"{table}: missing columns {sorted(missing)}")
    model = None
    config = path / "config.json"
    if config.exists():
        try:
            model = json.loads(config.read_text()).get("model")
        except (ValueError, AttributeError):
            logger.warning("%s is not valid JSON; labelling the run by its directory", config)
    label = path.resolve().name + (f" ({model})" if model else "")
    return RunResult(path, label, aggregate)


def _unique_labels(results: list[RunResult]) -> list[RunResult]:
    seen: dict[str, int] = {}
    out = []
    for r in results:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        out.append(dataclasses.replace(r, label=r.label if n == 0 else f"{r.label} #{n + 1}"))
    return out


def table(results: list[RunResult], metric: str):
    """Rows: run x subset; columns: the metric at each n (plus MRR when every run has it)."""
    import pandas as pd

    frames = []
    for r in results:
        if metric not in r.aggregate.columns:
            raise ValueError(f"{r.path}/aggregate.csv has no {metric} column")
        wide = r.aggregate.pivot(index="Evaluation_Type", columns="N_Recommendations", values=metric)
        wide.columns = [f"{metric.split('_at_')[0].lower()}@{n}" for n in wide.columns]
        if "MRR" in r.aggregate.columns:
            wide["MRR"] = r.aggregate.groupby("Evaluation_Type")["MRR"].first()
        wide.insert(0, "run", r.label)
        frames.append(wide.reset_index(names="subset"))
    out = pd.concat(frames, ignore_index=True)
    order = {s: i for i, s in enumerate(SUBSETS)}
    out["_subset"] = out["subset"].map(lambda s: order.get(s, len(order)))
    out = out.sort_values(["_subset", "subset"], kind="stable").drop(columns="_subset")
    return out[["run", "subset", *[c for c in out.columns if c not in ("run", "subset")]]].reset_index(drop=True)


def markdown(frame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    columns = list(frame.columns)
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c in ("run", "subset") else "---:" for c in columns) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], metric: str) -> bytes:
    """PNG bytes: one panel per subset, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = [s for s in SUBSETS if any(s in set(r.aggregate["Evaluation_Type"]) for r in results)]
    subsets += sorted({s for r in results for s in r.aggregate["Evaluation_Type"]} - set(subsets))
    fig, axes = plt.subplots(1, len(subsets), figsize=(5 * len(subsets), 4), squeeze=False, sharey=True)
    for ax, subset in zip(axes[0], subsets):
        for r in results:
            part = r.aggregate[r.aggregate["Evaluation_Type"] == subset].sort_values("N_Recommendations")
            if len(part):
                ax.plot(part["N_Recommendations"], part[metric], marker="o", label=r.label)
        ax.set_xticks(sorted({int(n) for r in results for n in r.aggregate["N_Recommendations"]}))
        ax.set_title(subset)
        ax.set_xlabel("n")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(metric.replace("_at_N", "@n"))
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _wandb_mode(path: Path) -> str | None:
    """The W&B mode to reopen a run in, or None when it was not logged or W&B is disabled."""
    if not (path / "wandb_id.txt").exists() or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        mode = json.loads((path / "config.json").read_text())["config"]["wandb"]["mode"]
    except (OSError, ValueError, KeyError, TypeError):
        mode = "offline"
    return None if mode == "disabled" else mode


def log_to_wandb(results: list[RunResult], frame) -> int:
    """Logs the comparison table into each logged run; returns how many were updated."""
    updated = 0
    for r in results:
        mode = _wandb_mode(r.path)
        if mode is None:
            continue
        try:
            import wandb

            config = json.loads((r.path / "config.json").read_text()).get("config", {})
            run = wandb.init(
                project=config.get("wandb", {}).get("project", "studyrec"),
                id=(r.path / "wandb_id.txt").read_text().strip(),
                dir=str(r.path),
                mode=mode,
                resume="allow",
            )
            run.log({"report/comparison": wandb.Table(dataframe=frame)})
            run.finish()
            updated += 1
        except Exception as e:  # noqa: BLE001 - logging is optional; the files are the report
            logger.warning("could not log the report to W&B for %s: %s", r.path, e)
    return updated


def report(cfg: ReportConfig) -> Path:
    from studyrec.data.atomic import write_atomic, write_text_atomic

    if not cfg.runs:
        raise ValueError("give at least one run directory")
    results = _unique_labels([read_run(Path(p)) for p in cfg.runs])
    for r in results:
        if cfg.metric not in r.aggregate.columns:
            raise ValueError(f"{r.path}/aggregate.csv has no {cfg.metric} column")
    frame = table(results, cfg.metric)
    png = plot(results, cfg.metric)

    def write_png(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(png)

    cfg.out.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.out / "report.png", write_png)
    title = f"# {cfg.metric.replace('_at_N', '@n')} by run and subset\n\n"
    sources = "".join(f"- {r.label}: `{r.path}`\n" for r in results)
    write_text_atomic(cfg.out / "report.md", title + markdown(frame) + "\nRuns:\n\n" + sources)
    if cfg.wandb:
        log_to_wandb(results, frame)
    print(markdown(frame), end="")
    print(f"wrote {cfg.out / 'report.png'} and {cfg.out / 'report.md'}")
    return cfg.out


def _parse(argv: list[str]) -> ReportConfig:
    prog = "python -m experiments.report"
    return cli.parse_flags(ReportConfig, default=None, args=argv, prog=prog)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = _parse(sys.argv[1:] if argv is None else list(argv))
    run_cli(lambda: report(cfg), cfg.debug)


if __name__ == "__main__":
    main()
