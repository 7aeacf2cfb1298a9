"""Held-out quality: Individual and STUDY against the heuristic baselines, on the same metric code.

    python -m benchmarks.quality                      # generated 1k and 15k students (+ MovieLens if it can be had)
    python -m benchmarks.quality --sizes 15000 --no-movielens

Each model and baseline writes a run directory under ``--out``; the script prints one table of
hits@{1,5,20} on ``all`` and ``non_history`` (validation weeks, scored with the training history as
context), with the models' train and validation accuracy on fixed batches; then the differences
the targets are about (Individual against own-last, STUDY against the classmates heuristic and
against Individual, the reference's STUDY against the lagged heuristic) with 95% paired-bootstrap
intervals over students; and a JSON line. Models train as ``cpu-small`` ships: no tuning flags.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import tyro

from benchmarks.common import Stopwatch, json_line, log
from experiments.cli import EXIT_BAD_INPUT
from studyrec.data.atomic import write_text_atomic
from studyrec.evaluate.compare import paired_difference
from studyrec.config import DEFAULT_EPOCHS
from studyrec.models import MODELS

# (b, a) pairs whose difference b - a the targets are about; a missing run is skipped.
COMPARISONS = (
    ("individual", "own_last"),
    ("study", "classmates_recent"),
    ("study", "individual"),
    ("study-reference", "classmates_recent_lagged"),
    ("individual", "knn"),
    ("study", "knn"),
)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    out: str = "results/quality"
    """Where data and run directories go."""
    sizes: tuple[int, ...] = (1000, 15000)
    """Generated datasets, by number of students."""
    movielens: bool = True
    """Also MovieLens-100k (skipped when it cannot be downloaded)."""
    models: tuple[str, ...] = tuple(MODELS)
    """Models to train (names in studyrec.models.MODELS; default: all of them)."""
    baselines: tuple[str, ...] = (
        "popularity", "popularity_by_grade", "knn", "classmates_recent", "classmates_recent_lagged", "own_last",
    )
    """Heuristics scored through the same metric code."""
    epochs: float | None = None
    """Passes over each dataset's training interactions per model (None: the preset's, DEFAULT_EPOCHS); the best checkpoint by validation accuracy is kept."""
    chunk_sizes: tuple[tuple[str, int], ...] = ()
    """Chunk length per model on the generated classrooms, as MODEL SIZE pairs (default: each model's default_chunk_size)."""
    movielens_chunk_sizes: tuple[tuple[str, int], ...] = ()
    """Chunk length per model on MovieLens (default: each model's default_chunk_size)."""
    eval_every: int | None = None
    """Steps between the validation accuracies that pick the best checkpoint (None: the preset's, ten per run)."""
    seed: int = 0
    """Data and training seed."""
    train_flags: tuple[str, ...] = ()
    """Extra flags for every training run, e.g. --train-flags=--arch.tie-embeddings."""


def data_sets(cfg: QualityConfig, root: Path) -> dict[str, Path]:
    sets = {}
    for n in cfg.sizes:
        path = root / f"generated-{n}"
        if not (path / "student_info.csv").exists():
            run([sys.executable, "-m", "experiments.generate_data", "--out", str(path), "--n-students", str(n), "--seed", str(cfg.seed)])
        sets[f"generated-{n}"] = path
    if cfg.movielens:
        path = root / "movielens-100k"
        if not (path / "student_info.csv").exists():
            try:
                run([sys.executable, "-m", "experiments.datasets", "movielens", "--out", str(path)])
            except subprocess.CalledProcessError:
                log("MovieLens-100k could not be had; skipping it")
                return sets
        sets["movielens-100k"] = path
    return sets


def run(command: list[str]) -> float:
    with Stopwatch() as watch:
        subprocess.run(command, check=True)
    return watch.seconds


def data_flags(path: Path) -> list[str]:
    return [
        "--train-data", str(path / "student_activity_train.csv"),
        "--valid-data", str(path / "student_activity_valid.csv"),
        "--student-info", str(path / "student_info.csv"),
        "--school-info", str(path / "school_info.csv"),
        "--eval-context", "history",
    ]


def optional(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def recorded_chunk(run_dir: Path) -> int:
    """The chunk size a run used, from its config.json."""
    return json.loads((run_dir / "config.json").read_text())["config"]["student_chunk_size"]


def row(dataset: str, name: str, run_dir: Path, seconds: float, chunk: int | None = None) -> dict:
    aggregate = pd.read_csv(run_dir / "aggregate.csv").set_index(["Evaluation_Type", "N_Recommendations"])["Hits_at_N"]
    result = {"data": dataset, "model": name, "chunk": "" if chunk is None else chunk, "seconds": round(seconds, 1)}
    for subset in ("all", "non_history"):
        for n in (1, 5, 20):
            result[f"{subset} h@{n}"] = round(float(aggregate[(subset, n)]), 4)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if "eval/valid_accuracy" in line]
        if evals:  # the selected (best) checkpoint's accuracies, and the last step's: memorisation shows in the gap
            best = max(evals, key=lambda e: e["eval/valid_accuracy"])
            result["best step"] = best["step"]
            result["train acc"] = round(best["eval/train_accuracy"], 4)
            result["valid acc"] = round(best["eval/valid_accuracy"], 4)
            result["last train/valid acc"] = f"{evals[-1]['eval/train_accuracy']:.3f}/{evals[-1]['eval/valid_accuracy']:.3f}"
    return result


def main(cfg: QualityConfig) -> pd.DataFrame:
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        print(f"error: --models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for flag, sizes in (("--chunk-sizes", cfg.chunk_sizes), ("--movielens-chunk-sizes", cfg.movielens_chunk_sizes)):
        unknown = [m for m, _ in sizes if m not in MODELS]
        if unknown:
            print(f"error: {flag} names unknown models {', '.join(unknown)} (give MODEL SIZE pairs)", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
    root = Path(cfg.out)
    rows = []
    for dataset, path in data_sets(cfg, root / "data").items():
        for name in cfg.baselines:
            run_dir = root / dataset / f"baseline-{name}"
            if not (run_dir / "aggregate.csv").exists():
                seconds = run([sys.executable, "-m", "experiments.baselines", "--baseline", name, "--output-dir", str(run_dir), *data_flags(path)])
            else:
                seconds = float("nan")
            rows.append(row(dataset, name, run_dir, seconds))
        chunk_sizes = dict(cfg.movielens_chunk_sizes if dataset == "movielens-100k" else cfg.chunk_sizes)
        for model in cfg.models:
            run_dir = root / dataset / model
            chunk = chunk_sizes.get(model)
            seconds = run([
                sys.executable, "-m", "experiments.train", "cpu-small", "--model", model,
                "--output-dir", str(run_dir), "--seed", str(cfg.seed), "--wandb.mode", "disabled",
                *optional("--epochs", cfg.epochs), *optional("--student-chunk-size", chunk),
                *optional("--eval-every", cfg.eval_every), *data_flags(path), *cfg.train_flags,
            ])
            rows.append(row(dataset, model, run_dir, seconds, recorded_chunk(run_dir)))
    table = pd.DataFrame(rows)
    differences = pd.DataFrame([d for dataset in dict.fromkeys(r["data"] for r in rows) for d in compare(root / dataset, dataset)])
    markdown = "\n\n".join(_markdown(t) for t in (table, differences) if not t.empty)
    print(markdown)
    write_text_atomic(root / "quality.md", markdown + "\n")
    json_line({
        "benchmark": "quality", "epochs": cfg.epochs or DEFAULT_EPOCHS, "preset": "cpu-small", "rows": rows,
        "differences": differences.to_dict("records"),
    })
    return table


def compare(data_dir: Path, dataset: str) -> list[dict]:
    """``COMPARISONS`` on one dataset: b - a in hits@{1,5,20} on all interactions, with 95% intervals."""
    runs = {p.name.removeprefix("baseline-"): p / "per_student.csv" for p in data_dir.iterdir() if (p / "per_student.csv").exists()}
    out = []
    for b, a in COMPARISONS:
        if a in runs and b in runs:
            tables = pd.read_csv(runs[a]), pd.read_csv(runs[b])
            out.append({"data": dataset, "difference (all)": f"{b} - {a}"} | {
                f"h@{n}": str(paired_difference(*tables, n=n)) for n in (1, 5, 20)
            })
    return out


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main(tyro.cli(QualityConfig, prog="python -m benchmarks.quality"))
