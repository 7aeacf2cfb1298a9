"""Renders the results tables of the docs and the README from the files ``benchmarks.record`` writes.

    python docs/tables.py            # rewrites every table between its markers
    python docs/tables.py --check    # lists the tables that differ from their files, exits 1 if any

A table sits in a Markdown file between two markers, the first naming a results file in
docs/results/ and a view::

    <!-- table: quality-1000 headline -->
    ...
    <!-- /table -->

The first table of each results file on a page ends with the date, commit and machine of the
measurement, so no number in the docs is typed by hand or left without its date.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"(<!-- table: (\S+) (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)

LABELS = {
    "popularity": "popularity",
    "popularity_by_grade": "popularity by grade",
    "knn": "item KNN",
    "own_last": "own last title",
    "classmates_recent_lagged": "classmates, last 2 days, lagged",
    "classmates_recent": "classmates, last 2 days",
    "individual": "Individual",
    "study-reference": "`study-reference`",
    "study": "**`study`**",
}
HEADLINE = ("own_last", "classmates_recent", "knn", "individual", "study-reference", "study")


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def label(row: dict) -> str:
    text = LABELS.get(row["model"], f"`{row['model']}`")
    return f"{text} (chunks of {row['chunk']})" if row.get("chunk") not in ("", None) else text


def ordered(rows: list[dict], names=tuple(LABELS)) -> list[dict]:
    return sorted((r for r in rows if r["model"] in names), key=lambda r: list(LABELS).index(r["model"]))


def cell(x) -> str:
    return "" if x is None or x != x else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(header: list[str], rows: list[list], text_columns: int = 1) -> str:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]) + "\n"


def provenance(entry: dict, name: str) -> str:
    dirty = " (with uncommitted changes)" if entry["dirty"] else ""
    return (
        f"\nMeasured {entry['date'][:10]} at commit `{entry['commit'][:7]}`{dirty} on {entry['machine']}: "
        f"`{entry['command']}` (recorded in `docs/results/{name}.json`).\n"
    )


def datasets(entry: dict) -> list[str]:
    return list(dict.fromkeys(r["data"] for r in entry["result"]["rows"]))


def headline(entry: dict) -> str:
    """hits@1/5/20 over all validation reads and over novel titles, for the headline rows."""
    rows = [r for r in entry["result"]["rows"] if r["data"] == datasets(entry)[0]]
    header = ["", "hits@1", "hits@5", "hits@20", "novel hits@1", "novel hits@5", "novel hits@20"]
    keys = ["all h@1", "all h@5", "all h@20", "non_history h@1", "non_history h@5", "non_history h@20"]
    return markdown(header, [[label(r), *(r[k] for k in keys)] for r in ordered(rows, HEADLINE)])


def per_dataset(entry: dict, table) -> str:
    """``table(rows of one data set)`` for each data set, titled when there are several."""
    names = datasets(entry)
    return "\n".join((f"**{data}**\n\n" if len(names) > 1 else "")
                     + table(ordered([r for r in entry["result"]["rows"] if r["data"] == data])) for data in names)


def models(entry: dict) -> str:
    """hits@1/5/20 of every model and baseline, over all reads and over novel titles."""
    header = ["", "all h@1", "all h@5", "all h@20", "novel h@1", "novel h@5", "novel h@20"]
    keys = ["all h@1", "all h@5", "all h@20", "non_history h@1", "non_history h@5", "non_history h@20"]
    return per_dataset(entry, lambda rows: markdown(header, [[label(r), *(r[k] for k in keys)] for r in rows]))


def accuracy(entry: dict) -> str:
    """The trained models' token accuracies at the selected evaluation and at the last: memorisation shows as a gap."""
    header = ["", "selected step", "train acc", "valid acc", "last step: train acc", "valid acc"]

    def table(rows):
        trained = [r for r in rows if "best step" in r]
        last = [r["last train/valid acc"].split("/") for r in trained]
        return markdown(header, [[label(r), r["best step"], r["train acc"], r["valid acc"], float(t), float(v)]
                                 for r, (t, v) in zip(trained, last)])

    return per_dataset(entry, table)


def differences(entry: dict) -> str:
    """The paired differences the benchmark prints, with their 95% intervals over students."""
    several = len(datasets(entry)) > 1
    header = ["data"] * several + ["difference (all reads)", "hits@1", "hits@5", "hits@20"]
    rows = [[r["data"]] * several + [r["difference (all)"].replace(" - ", " − "), r["h@1"], r["h@5"], r["h@20"]]
            for r in entry["result"]["differences"]]
    return markdown(header, rows, text_columns=1 + several)


def interval(text: str) -> tuple[float, float]:
    """The bounds of ``"+0.0084 [+0.0028, +0.0141]"``."""
    low, high = re.search(r"\[(\S+), (\S+)\]", text).groups()
    return float(low), float(high)


def verdicts(entry: dict) -> str:
    """One line per difference b − a: at which n its 95% interval lies above 0, below 0, or spans 0."""
    lines = []
    for r in entry["result"]["differences"]:
        b, a = r["difference (all)"].split(" - ")
        where: dict[str, list[str]] = {}
        for n in (1, 5, 20):
            low, high = interval(r[f"h@{n}"])
            where.setdefault("above" if low > 0 else "below" if high < 0 else "level", []).append(f"hits@{n}")
        said = "; ".join(f"{side} at {', '.join(ns)}" for side, ns in where.items())
        plain = lambda name: LABELS.get(name, name).replace("**", "")  # noqa: E731
        lines.append(f"- {plain(b)} against {plain(a)}: {said}\n")
    return "".join(lines)


VIEWS = {"headline": headline, "models": models, "accuracy": accuracy, "differences": differences, "verdicts": verdicts}


def render(text: str) -> str:
    """``text`` with every marked table rendered anew from its results file; the first table of each
    file on a page says when, where and how it was measured."""
    said = set()

    def table(match: re.Match) -> str:
        start, name, view, _, end = match.groups()
        entry = load(name)
        where = "" if name in said else provenance(entry, name)
        said.add(name)
        return start + VIEWS[view](entry) + where + end

    return MARKED.sub(table, text)


def stale() -> list[Path]:
    """The pages whose tables differ from their results files."""
    return [page for page in PAGES if render(page.read_text()) != page.read_text()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        pages = stale()
        for page in pages:
            print(f"{page.relative_to(ROOT)}: a table differs from its results file; run python docs/tables.py")
        return 1 if pages else 0
    for page in PAGES:
        text = page.read_text()
        if render(text) != text:
            page.write_text(render(text))
            print(f"rewrote the tables of {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
