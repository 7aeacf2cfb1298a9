"""Draws the documentation's pictures into docs/img/ from the library and from real runs.

    python docs/figures.py                       # all three
    python docs/figures.py masks                 # needs nothing but the bundled sample data
    python docs/figures.py hits training --runs results/quality/generated-1000

``masks``: what each model's attention mask lets a prediction see, over one real training row packed
from the bundled sample by the library's own packer. ``hits`` and ``training``: hits@n per model and
baseline, and the training curves, from the run directories ``benchmarks.quality`` writes (the
same run as docs/results/quality-1000.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"
MODELS = {"individual": "Individual", "study-reference": "study-reference (the reference's STUDY)", "study": "study (the paper's STUDY)"}
BASELINES = {
    "own_last": "own last title",
    "classmates_recent": "classmates, last 2 days",
    "classmates_recent_lagged": "classmates, last 2 days, lagged",
    "knn": "item KNN",
    "popularity_by_grade": "popularity by grade",
    "popularity": "popularity",
}
SUBSETS = {"all": "all interactions", "non_history": "novel titles (never read before)"}
HIDDEN, OWN, CLASSMATE = 0, 1, 2
COLOURS = ListedColormap(["#ffffff", "#3b6ea8", "#e08a3c"])


# --- masks ---------------------------------------------------------------------------------------


def sample_row(seq_len: int = 22, chunk: int = 5, seed: int = 0):
    """One training row of the bundled sample, packed as training packs it: the first with four students."""
    from studyrec.data import ClassroomPacker, Interactions, Vocabulary, make_chunks
    from studyrec.data.dataset import time_origin
    from studyrec.data.generate import sample_data_paths
    from studyrec.data.io import load_activity, load_student_info

    paths = sample_data_paths()
    activity = load_activity(paths["train"])
    vocab = Vocabulary.build(activity["SHLF_NUM"])
    data = Interactions.from_frame(activity, vocab, load_student_info(paths["student_info"]))
    packer = ClassroomPacker(data, make_chunks(data, chunk), seq_len, vocab.sep, time_origin(activity))
    for row in range(1000):
        sample = packer.random_rows(seed, np.array([row]))
        if sample.segments.max() >= 4 and (sample.segments[0] > 0).sum() >= seq_len - 4:
            return vocab, type(sample)(*(None if a is None else np.asarray(a)[0] for a in sample))
    raise RuntimeError("no row with four students in the sample")


def attention(name: str, vocab, sample) -> np.ndarray:
    """The model's own mask over the row, ``[query, key]``; for a two-stream model its query stream."""
    import jax

    from studyrec.models import ModelConfig, build

    config = ModelConfig(vocab_size=vocab.logits_size, num_layers=1, d_model=8, qkv_dim=8, num_heads=1, mlp_dim=8)
    model = build(name, config, key=jax.random.key(0))
    mask = np.asarray(model.mask(sample))
    return mask[-len(sample.titles):], type(model).keys_carry_previous_title


def titles_seen(mask: np.ndarray, carry_previous: bool, segments: np.ndarray) -> np.ndarray:
    """``[query, j]``: the prediction at query may use the title read at j. A key that carries the
    previous title (the input shift) holds title k-1 of its own student, and no title at a student's start."""
    if not carry_previous:
        return mask
    seen = np.zeros_like(mask)
    follows = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    seen[:, :-1] = mask[:, 1:] & follows[None, :]
    return seen


def coloured(visible: np.ndarray, segments: np.ndarray) -> np.ndarray:
    same = segments[:, None] == segments[None, :]
    return np.where(visible, np.where(same, OWN, CLASSMATE), HIDDEN)


def draw_masks(out: Path) -> Path:
    vocab, sample = sample_row()
    segments, times = sample.segments, sample.timestamps
    letters = " ABCDEFGHIJ"
    day = lambda t: f"d{int(t) // 86400}"  # noqa: E731
    ticks = [f"{letters[s]}{i}  {day(t)}" if s else ("SEP" if title == vocab.sep else "pad")
             for i, (s, t, title) in enumerate(zip(segments, times, sample.titles))]
    fig = plt.figure(figsize=(13, 9.6), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)
    halves = fig.subfigures(2, 1, hspace=0.06)
    fig.suptitle("Attention mask: which keys each prediction attends to", fontsize=14)
    halves[1].suptitle("What that lets it see: which reads each prediction may use", fontsize=14)
    axes = [half.subplots(1, 3) for half in halves]
    for column, name in enumerate(MODELS):
        mask, carry = attention(name, vocab, sample)
        real = (segments > 0)[:, None] & (segments > 0)[None, :]
        panels = [(mask & real, "key position k"), (titles_seen(mask & real, carry, segments), "title read at position j")]
        for row, (matrix, xlabel) in enumerate(panels):
            ax = axes[row][column]
            ax.imshow(coloured(matrix, segments), cmap=COLOURS, vmin=0, vmax=2)
            ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6, family="monospace")
            ax.set_yticks(range(len(ticks)), ticks, fontsize=6, family="monospace")
            ax.set_xticks(np.arange(len(ticks) + 1) - 0.5, minor=True)
            ax.set_yticks(np.arange(len(ticks) + 1) - 0.5, minor=True)
            ax.grid(which="minor", color="#dddddd", linewidth=0.5)
            ax.tick_params(which="minor", length=0)
            ax.set_xlabel(xlabel)
            ax.set_title(name if name != "individual" else "Individual", fontsize=13, family="monospace" if name != "individual" else None)
            if column == 0:
                ax.set_ylabel("prediction at position q")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS(i)) for i in (OWN, CLASSMATE)]
    fig.legend(handles, ["the student's own", "a classmate's"], loc="outside lower center", ncol=2, frameon=False, fontsize=12)
    return save(fig, out / "masks.png")


# --- runs ----------------------------------------------------------------------------------------


def draw_hits(runs: Path, out: Path) -> Path:
    from experiments.report import read_run

    fig, axes = plt.subplots(1, len(SUBSETS), figsize=(12, 4.6), sharey=True)
    lines = [(name, label, True) for name, label in MODELS.items()]
    lines += [(f"baseline-{name}", label, False) for name, label in BASELINES.items()]
    for ax, (subset, title) in zip(axes, SUBSETS.items()):
        for index, (directory, label, model) in enumerate(lines):
            if not (runs / directory / "aggregate.csv").exists():
                continue
            aggregate = read_run(runs / directory).aggregate
            part = aggregate[aggregate["Evaluation_Type"] == subset].sort_values("N_Recommendations")
            style = dict(linewidth=2.4, marker="o") if model else dict(linewidth=1.2, linestyle="--", marker=".")
            ax.plot(part["N_Recommendations"], part["Hits_at_N"], label=label, color=f"C{index}", **style)
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 5, 10, 20], ["1", "3", "5", "10", "20"])
        ax.set_title(title)
        ax.set_xlabel("n (recommendations)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("hits@n")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return save(fig, out / "hits.png")


def draw_training(runs: Path, out: Path) -> Path:
    """Loss and accuracy at each evaluation, on fixed training (dashed) and validation (solid) batches."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, (name, label) in enumerate(MODELS.items()):
        path = runs / name / "metrics.jsonl"
        if not path.exists():
            continue
        evals = [r for r in map(json.loads, path.read_text().splitlines()) if "eval/valid_accuracy" in r]
        steps, colour = [r["step"] for r in evals], f"C{index}"
        for ax, metric in zip(axes, ("loss", "accuracy")):
            ax.plot(steps, [r[f"eval/train_{metric}"] for r in evals], color=colour, linestyle="--", marker=".")
            ax.plot(steps, [r[f"eval/valid_{metric}"] for r in evals], color=colour, marker="o", label=label)
        best = max(evals, key=lambda r: r["eval/valid_accuracy"])
        axes[1].scatter([best["step"]], [best["eval/valid_accuracy"]], s=160, facecolors="none", edgecolors=colour, linewidths=1.5)
    for ax, what in zip(axes, ("cross-entropy", "next-title accuracy")):
        ax.set_title(f"{what}: training batches (dashed), validation (solid)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[1].set_title("accuracy: training batches (dashed), validation (solid); ○ selected", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "training.png")


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python docs/figures.py", description=__doc__.split("\n")[0])
    parser.add_argument("figures", nargs="*", choices=["masks", "hits", "training"], default=["masks", "hits", "training"])
    parser.add_argument("--runs", type=Path, default=Path("results/quality/generated-1000"),
                        help="a benchmarks.quality data set directory: one run directory per model and baseline")
    parser.add_argument("--out", type=Path, default=IMG)
    args = parser.parse_args(argv)
    if {"hits", "training"} & set(args.figures) and not args.runs.is_dir():
        parser.error(f"{args.runs} not found: run `python -m benchmarks.quality --sizes 1000 --no-movielens` first")
    for figure in args.figures:
        if figure == "masks":
            draw_masks(args.out)
        elif figure == "hits":
            draw_hits(args.runs, args.out)
        else:
            draw_training(args.runs, args.out)


if __name__ == "__main__":
    main()
