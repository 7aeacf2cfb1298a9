"""The README's hand-composed example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_compose_by_hand_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("### Compose a sample by hand and score it") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "title_" in printed


def test_quick_start_is_two_commands():
    text = README.read_text()
    quick = text[text.index("## Quick start") : text.index("## Usage")]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert [b.strip() for b in blocks] == ['pip install -e ".[dev]" && python -m experiments.train --model study', "pytest"]
