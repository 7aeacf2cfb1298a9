"""The documentation cannot silently rot: the site builds strictly, every Python block of the README and
the docs runs (or says why it cannot), the results tables match the files the benchmark wrote, and the
picture script still draws."""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_run import tiny_run_dir

from studyrec.config import DEFAULT_ARCH, TrainConfig, WandbConfig
from studyrec.data.generate import sample_data_paths

ROOT = Path(__file__).resolve().parents[1]
# Child processes import this checkout's studyrec, as the tests do.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not-run: (.+?) -->\n)?```python\n(.*?)```", re.S)

# Runs each page's blocks in order in one namespace per page, as a reader would paste them; prints
# {page: {"ok", "out", "error"}} as its last line. Blocks are padded so tracebacks give page lines.
RUNNER = r"""
import contextlib, io, json, sys, traceback
results = {}
for page, blocks in json.load(sys.stdin).items():
    namespace, out = {"__name__": "__main__"}, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for line, code in blocks:
                exec(compile("\n" * line + code, page, "exec"), namespace)
        results[page] = {"ok": True, "out": out.getvalue()}
    except BaseException:
        results[page] = {"ok": False, "out": out.getvalue(), "error": traceback.format_exc()}
print(json.dumps(results))
"""


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line where the code starts, code, reason it is not run or None)`` of each Python block."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(2)), m.group(2), m.group(1)) for m in BLOCK.finditer(text)]


def runnable(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code, reason in blocks(page) if reason is None]


RUN_PAGES = [page for page in PAGES if runnable(page)]


def test_every_page_has_python_that_runs_or_says_why_not():
    markers = sum(page.read_text().count("<!-- not-run") for page in PAGES)
    reasons = [reason for page in PAGES for _, _, reason in blocks(page) if reason is not None]
    assert markers == len(reasons), "a <!-- not-run: reason --> marker must stand right above a ```python block"
    assert all(len(reason.split()) >= 3 for reason in reasons), f"say why a block is not run: {reasons}"
    assert RUN_PAGES, "no page has a runnable Python block"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """The working directory the examples assume: runs/study, runs/individual (tiny runs) and data/."""
    from studyrec.train.loop import train

    root = tmp_path_factory.mktemp("docs")
    (root / "runs").mkdir()
    (root / "runs" / "study").symlink_to(tiny_run_dir())
    train(TrainConfig(  # tiny_run_dir's sizes, as Individual
        model="individual",
        arch=dataclasses.replace(DEFAULT_ARCH, num_layers=1, d_model=16, qkv_dim=16, num_heads=2, mlp_dim=32),
        steps=4, eval_every=2, save_every=2, log_every=2, eval_rows=32, per_device_batch_size=2,
        wandb=WandbConfig(mode="disabled"), output_dir=str(root / "runs" / "individual"),
    ))
    paths = sample_data_paths()
    (root / "data").mkdir()
    shutil.copy(paths["train"], root / "data" / "activity.csv")
    shutil.copy(paths["student_info"], root / "data" / "student_info.csv")
    return root


@pytest.fixture(scope="module")
def outcomes(sandbox) -> dict:
    """Every runnable block of every page, run in one fresh Python process in the sandbox."""
    pages = {str(page.relative_to(ROOT)): runnable(page) for page in RUN_PAGES}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(pages), cwd=sandbox, env={**ENV, "WANDB_MODE": "disabled"},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, outcomes):
    outcome = outcomes[str(page.relative_to(ROOT))]
    assert outcome["ok"], outcome["error"]


def test_examples_print_what_they_promise(outcomes):
    assert "title_" in outcomes["docs/models.md"]["out"]  # the hand-composed sample's top titles
    assert "StudentID" in outcomes["README.md"]["out"]  # the recommendations frame


def test_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs the docs extra: pip install -e '.[dev,docs]'")
        pytest.skip("pip install -e '.[docs]' to build the site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "models" / "index.html").exists()


def _docs_module(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_tables_match_their_files():
    tables = _docs_module("tables")
    assert not tables.stale(), "a results table differs from its file: run python docs/tables.py"
    assert any(tables.MARKED.search(page.read_text()) for page in PAGES)


def test_results_files_say_when_where_and_how():
    files = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert files
    for path in files:
        entry = json.loads(path.read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), path
        assert re.match(r"\d{4}-\d{2}-\d{2}T", entry["date"]) and entry["machine"], path
        assert entry["command"].startswith("python -m benchmarks.") and entry["result"], path


def test_readme_links_and_pictures_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]


def test_the_mask_picture_still_draws(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "figures.py"), "masks", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "masks.png").stat().st_size > 10_000
