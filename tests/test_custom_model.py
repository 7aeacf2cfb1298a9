"""A custom model, the documented way: subclass, register, train through the API and the CLI, load_run it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from studyrec.data.generate import sample_data_paths
from studyrec.models import MODELS, StudyReference, register

ROOT = Path(__file__).resolve().parents[1]

# A module of the user's: STUDY that sees classmates' reads of the last 30 days only.
MY_MODELS = '''
import jax.numpy as jnp

from studyrec.models import StudyReference, register
from studyrec.models.masks import own_past

DAYS = 30


@register("study-recent")
class StudyRecent(StudyReference):
    """STUDY whose queries see classmates' reads of the last 30 days only (and all of their own)."""

    def mask(self, sample):
        recent = (sample.timestamps[:, None] - sample.timestamps[None, :]) <= DAYS * 86_400
        return super().mask(sample) & (own_past(sample.segments) | recent)
'''

# The CLI, as the user runs it: their module registers the model, then experiments.train parses the flags.
MY_TRAIN = '''
import my_models  # noqa: F401  (registers study-recent)
from experiments.train import main

main()
'''

TINY = [
    "--steps", "5", "--per-device-batch-size", "2", "--eval-rows", "16", "--eval-every", "5", "--save-every", "5",
    "--arch.num-layers", "1", "--arch.d-model", "16", "--arch.qkv-dim", "16", "--arch.num-heads", "2",
    "--arch.mlp-dim", "32", "--wandb.mode", "disabled",
]


@pytest.fixture
def my_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(MY_MODELS))
    (tmp_path / "my_train.py").write_text(textwrap.dedent(MY_TRAIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    yield my_models
    MODELS.pop("study-recent", None)
    sys.modules.pop("my_models", None)


def test_a_registered_model_trains_through_the_api_and_the_cli_and_loads(my_models, tmp_path):
    from experiments.train import parse
    from studyrec.recommend import load_run
    from studyrec.train.loop import train

    assert MODELS["study-recent"] is my_models.StudyRecent
    api_run = train(parse(["--model", "study-recent", "--output-dir", str(tmp_path / "api"), *TINY]))
    loaded = load_run(api_run)
    assert type(loaded.model) is my_models.StudyRecent and loaded.step == 5
    assert loaded.reads_classmates and loaded.explainable  # declared by StudyReference, inherited
    paths = sample_data_paths()
    recs = loaded.recommend(paths["valid"], paths["student_info"], k=3)
    assert len(recs) and np.isfinite(recs["score"]).all()

    cli = subprocess.run(
        [sys.executable, str(tmp_path / "my_train.py"), "--model", "study-recent", "--output-dir", str(tmp_path / "cli"), *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert type(load_run(tmp_path / "cli").model) is my_models.StudyRecent


def test_registering_is_checked():
    with pytest.raises(ValueError, match="taken by"):
        register("study-reference")(type("Other", (StudyReference,), {}))
    with pytest.raises(TypeError):  # "not a studyrec.models.DecoderModel" (beartype says it first in tests)
        register("plain")(object)
    assert "plain" not in MODELS


def test_an_unregistered_name_is_refused_by_the_cli(capsys):
    from experiments.train import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", "study-recent", "--steps", "1", "--wandb.mode", "disabled", "--output-dir", "/nonexistent/x"])
    assert stop.value.code == 2
    assert "unknown model 'study-recent'" in capsys.readouterr().err
