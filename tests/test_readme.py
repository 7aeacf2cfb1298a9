"""The README is the front door: two quick-start commands, and short. Its Python runs in test_docs.py."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_is_two_commands():
    text = README.read_text()
    start = text.index("## Quick start")
    quick = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert [b.strip() for b in blocks] == ['pip install -e ".[dev]" && python -m experiments.train --model study', "pytest"]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200, "the README is the front door: move details to docs/"
