"""Runs one benchmark and keeps its JSON line as a dated results file, which the docs render.

    python -m benchmarks.record docs/results/quality-1000.json quality --sizes 1000 --no-movielens

Runs ``python -m benchmarks.<name> <flags>`` (its other output goes to stderr), takes the last
JSON line it prints and writes, atomically, ``{"benchmark", "command", "date", "commit",
"dirty", "machine", "result"}``: when, on which commit (and whether the tree had uncommitted
changes) and on what the numbers were measured. ``docs/tables.py`` renders the results pages
from these files, so no number is copied by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import cpu_model
from studyrec.data.atomic import write_text_atomic


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def provenance() -> dict:
    """The date, commit and machine of a measurement made now, in this checkout."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
    }


def record(out: Path, name: str, flags: list[str]) -> dict:
    """Runs ``benchmarks.<name>`` with ``flags`` and writes its JSON line with its provenance to ``out``."""
    started = provenance()
    command = [sys.executable, "-m", f"benchmarks.{name}", *flags]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")), file=sys.stderr)
    if not lines:
        raise SystemExit(f"error: benchmarks.{name} printed no JSON line")
    entry = {"benchmark": name, "command": f"python -m benchmarks.{name} {' '.join(flags)}".strip(), **started}
    entry["result"] = json.loads(lines[-1])
    write_text_atomic(out, json.dumps(entry, indent=1) + "\n")
    return entry


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0].startswith("-"):
        raise SystemExit("usage: python -m benchmarks.record OUT.json BENCHMARK [FLAGS...]")
    entry = record(Path(args[0]), args[1], args[2:])
    print(f"wrote {args[0]} ({entry['benchmark']} at {entry['commit'][:7]}, {entry['date']})")


if __name__ == "__main__":
    main()
