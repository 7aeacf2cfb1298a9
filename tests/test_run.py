"""load_run: a trained run comes back with its parameters; missing or mismatched files are clear errors.

``tiny_run_dir()`` trains one tiny STUDY run per test session (``test_recommend.py`` shares it).
"""

import dataclasses
import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

import studyrec
from studyrec import rundir
from studyrec.data.vocab import Vocabulary
from studyrec.models import MODELS, ModelConfig, Study, build, register
from studyrec.recommend import Run, load_run
from studyrec.checkpoint import Checkpoints
from studyrec.config import DEFAULT_ARCH, TrainConfig, WandbConfig


@functools.cache
def tiny_run_dir() -> Path:
    """A 4-step STUDY run on the bundled sample, checkpoints at steps 2 and 4 (once per session)."""
    from studyrec.train.loop import train

    root = Path(tempfile.mkdtemp(prefix="studyrec-tiny-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    cfg = TrainConfig(
        arch=dataclasses.replace(DEFAULT_ARCH, num_layers=1, d_model=16, qkv_dim=16, num_heads=2, mlp_dim=32),
        steps=4, eval_every=2, save_every=2, log_every=2, eval_rows=32, per_device_batch_size=2,
        wandb=WandbConfig(mode="disabled"), output_dir=str(root / "study"),
    )
    return Path(train(cfg))


@pytest.fixture(scope="module")
def run_dir() -> Path:
    return tiny_run_dir()


@pytest.fixture
def copy(run_dir, tmp_path):
    """A private copy of the run, for tests that damage it."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def _edit_config(path: Path, edit) -> None:
    record = json.loads((path / "config.json").read_text())
    edit(record)
    (path / "config.json").write_text(json.dumps(record))


def test_load_run_restores_the_latest_checkpoint(run_dir):
    run = load_run(run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    assert isinstance(run, Run) and isinstance(run.model, Study)
    assert run.step == 4 and run.model_name == "study" and run.path == run_dir
    assert run.model.decoder.embed_dropout.inference  # inference mode: no dropout
    assert run.vocab == Vocabulary.load(run_dir / "vocab.json")
    assert run.model_config == ModelConfig(**record["model_config"])
    assert isinstance(run.config, TrainConfig) and run.config.arch.d_model == 16 and run.config.steps == 4
    assert run.config.data.n_recommendations == (1, 3, 5, 10, 20)  # JSON lists come back as tuples
    assert run.time_origin == record["time_origin"]

    # The parameters are the checkpoint's, not a fresh initialisation.
    checkpoints = Checkpoints(run_dir, async_save=False)
    saved, _, _ = checkpoints.restore(4, build("study", run.model_config, key=jax.random.key(1)))
    checkpoints.close()
    fresh = build("study", run.model_config, key=jax.random.key(0))
    for got, want, init in zip(_params(run.model), _params(saved), _params(fresh)):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(got, init) for got, init in zip(_params(run.model), _params(fresh)))


def test_load_run_at_a_given_step(run_dir):
    early, late = load_run(run_dir, step=2), load_run(run_dir)
    assert early.step == 2
    assert any(not np.array_equal(a, b) for a, b in zip(_params(early.model), _params(late.model)))
    with pytest.raises(FileNotFoundError, match=r"no step 3; available: \[2, 4\]"):
        load_run(run_dir, step=3)


def test_import_studyrec_is_light_and_reexports_load_run():
    code = "import sys, studyrec; assert 'wandb' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert studyrec.load_run is load_run


def test_unknown_config_keys_are_tolerated(copy, caplog):
    def edit(record):
        record["config"]["from_the_future"] = 1
        record["config"]["arch"]["new_width"] = 3
        record["model_config"]["new_knob"] = True
        record["extra_top_level"] = "ok"

    _edit_config(copy, edit)
    run = load_run(copy)
    assert run.config.arch.d_model == 16 and run.step == 4
    assert "from_the_future" in caplog.text and "new_width" in caplog.text and "new_knob" in caplog.text


def test_runs_saved_before_the_copy_gain_load_with_unscaled_copy_biases(copy):
    assert load_run(copy).model.decoder.copy.gain == ModelConfig.copy_bias_gain == 10.0
    _edit_config(copy, lambda record: record["model_config"].pop("copy_bias_gain"))
    assert load_run(copy).model.decoder.copy.gain == 1.0


@pytest.mark.parametrize(
    "remove, error, message",
    [
        ("config.json", FileNotFoundError, "no config.json"),
        ("vocab.json", FileNotFoundError, "no vocab.json"),
        ("checkpoints", FileNotFoundError, "no checkpoints/ directory; refusing to use random weights"),
        ("checkpoints/*", FileNotFoundError, "no complete checkpoint; refusing to use random weights"),
    ],
)
def test_missing_files_are_named(copy, remove, error, message):
    if remove.endswith("/*"):
        for child in (copy / remove[:-2]).iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif (copy / remove).is_dir():
        shutil.rmtree(copy / remove)
    else:
        (copy / remove).unlink()
    with pytest.raises(error, match=message) as info:
        load_run(copy)
    assert str(copy) in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_run(tmp_path / "nothing")


def test_vocabulary_of_another_run_is_refused(copy):
    vocab = Vocabulary.load(copy / "vocab.json")
    titles = [vocab.decode(i) for i in range(1, vocab.num_titles)]  # one title fewer
    Vocabulary.build(titles).save(copy / "vocab.json")
    with pytest.raises(ValueError, match=r"vocab.json has \d+ titles .* model_config.vocab_size=\d+"):
        load_run(copy)


@pytest.mark.parametrize(
    "model, message", [("transformer-xl", "unknown model 'transformer-xl'"), ("baseline:knn", "no model to load")]
)
def test_unknown_model_names(copy, model, message):
    _edit_config(copy, lambda record: record.update(model=model))
    with pytest.raises(ValueError, match=message):
        load_run(copy)


def test_checkpoint_that_does_not_fit_the_config(copy):
    def edit(record):
        record["model_config"]["mlp_dim"] = 48

    _edit_config(copy, edit)
    with pytest.raises(ValueError, match="checkpoint 4 does not fit the 'study' model"):
        load_run(copy)


def test_model_kind_must_match_the_checkpoint(copy):
    register("study-twin")(type("StudyTwin", (Study,), {}))  # the same parameters under another name
    try:
        _edit_config(copy, lambda record: record.update(model="study-twin"))
        with pytest.raises(ValueError, match="saved by a 'study' run"):
            load_run(copy)
    finally:
        MODELS.pop("study-twin")


def test_damaged_latest_checkpoint_falls_back_without_moving_files(copy, caplog):
    step_dir = copy / "checkpoints" / "4"
    assert (step_dir / "checksums.json").exists()
    victim = next(p for p in sorted((step_dir / "params").rglob("*")) if p.is_file() and p.stat().st_size > 0)
    victim.write_bytes(b"\0" + victim.read_bytes()[1:] if victim.read_bytes()[:1] != b"\0" else b"\1" + victim.read_bytes()[1:])
    run = load_run(copy)
    assert run.step == 2
    assert "damaged" in caplog.text and step_dir.exists()
    with pytest.raises(ValueError, match=r"no intact checkpoint among steps \[4\]"):
        load_run(copy, step=4)


def test_runs_saved_under_the_first_model_names_load_as_what_they_were(tmp_path):
    """Before ``model_names`` 2, ``study`` was the reference's lagged STUDY and ``study-lagfree`` the paper's."""
    from studyrec.train.loop import train

    cfg = TrainConfig(
        model="study-reference",
        arch=dataclasses.replace(DEFAULT_ARCH, num_layers=1, d_model=16, qkv_dim=16, num_heads=2, mlp_dim=32),
        steps=2, eval_every=2, save_every=2, log_every=2, eval_rows=32, per_device_batch_size=2,
        wandb=WandbConfig(mode="disabled"), output_dir=str(tmp_path / "old"),
    )
    run_dir = Path(train(cfg))

    def first_names(record):
        del record["model_names"]
        record["model"] = record["config"]["model"] = "study"

    _edit_config(run_dir, first_names)
    run = load_run(run_dir)
    assert run.model_name == run.config.model == "study-reference" and type(run.model).__name__ == "StudyReference"
    assert rundir.model_name("study-lagfree") == "study" and rundir.model_name("study", 2) == "study"
    assert rundir.upgrade_meta({"model": "study"})["model"] == "study-reference"
    assert rundir.upgrade_meta({"model": "study", "model_names": 2})["model"] == "study"
