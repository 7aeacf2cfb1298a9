"""Corruption matrix: every file of a run directory damaged, for inference (load_run) and for resume.

One tiny trained run (``test_run.tiny_run_dir``: checkpoints at steps 2 and 4) is copied per case.
Each file of the newest checkpoint is truncated, has one byte flipped, or is deleted; the list of
files is read from the checkpoint itself, so files a new Orbax adds are covered without an edit
here. ``load_run`` must fall back to step 2 with step 2's exact parameters (never moving a file) or
refuse with one clear error; a resumed training run must fall back (setting the damaged step aside)
or refuse cleanly before touching anything. The full resume matrix is ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_run import tiny_run_dir

from experiments import recommend as recommend_cli
from studyrec.data.generate import sample_data_paths
from studyrec.data.io import load_activity
from studyrec.data.vocab import Vocabulary
from studyrec.config import DataConfig
from studyrec.recommend import load_run
from studyrec.checkpoint import CHECKSUMS, CheckpointMismatch, Checkpoints, _file_digests
from studyrec.train.step import make_optimizer

NEWEST, PREVIOUS = 4, 2


# --- the run and its damage ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine() -> Path:
    return tiny_run_dir()


@pytest.fixture(scope="module")
def saved_params(pristine) -> dict[int, list[np.ndarray]]:
    return {step: params(load_run(pristine, step=step).model) for step in (PREVIOUS, NEWEST)}


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A private copy of the run, to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def params(model) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def checkpoint_files(run: Path, step: int = NEWEST) -> list[str]:
    """Every file of the checkpoint, relative to its step directory (checksums.json included)."""
    step_dir = run / "checkpoints" / str(step)
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip(path: Path) -> None:
    """One byte inverted in the middle: the size stays, only the content tells."""
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


DAMAGES = {"truncate": truncate, "flip": flip, "delete": delete}


def listing(run: Path) -> list[str]:
    """Every path under the run directory: load_run must leave it as it was."""
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))


def largest_params_file(run: Path, step: int = NEWEST) -> str:
    step_dir = run / "checkpoints" / str(step)
    largest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return largest.relative_to(step_dir).as_posix()


def swap_two_titles(vocab_file: Path) -> None:
    data = json.loads(vocab_file.read_text())
    first, second = [title for title, index in data["vocab"].items() if index in ("1", "2")]
    data["vocab"][first], data["vocab"][second] = data["vocab"][second], data["vocab"][first]
    vocab_file.write_text(json.dumps(data, indent=2))


def craft_oov(vocab_file: Path) -> None:
    data = json.loads(vocab_file.read_text())
    data["oov"] = "1000000000000"
    vocab_file.write_text(json.dumps(data, indent=2))


def garble(path: Path) -> None:
    path.write_bytes(b'{"oov": "7", "vocab": {\xff\x00')


def scaled(model, scale: float):
    return jax.tree.map(lambda a: a * scale if eqx.is_inexact_array(a) else a, model)


def reseal(step_dir: Path) -> None:
    """Writes checksums.json anew, as if the files had been saved so."""
    (step_dir / CHECKSUMS).write_text(json.dumps(_file_digests(step_dir)))


def save_weights(run: Path, step: int, scale: float) -> None:
    """A committed checkpoint at ``step`` holding the newest parameters times ``scale`` (nan: all NaN)."""
    loaded = load_run(run, step=NEWEST)
    cfg = loaded.config
    optimizer = make_optimizer(
        loaded.model, peak_lr=cfg.learning_rate, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, decay_all=cfg.decay_all_params, lr_decay=cfg.lr_decay, steps=cfg.steps,
    )
    damaged = scaled(loaded.model, scale)
    opt_state = optimizer.init(eqx.filter(damaged, eqx.is_inexact_array))
    checkpoints = Checkpoints(run, async_save=False)
    checkpoints.save(step, damaged, opt_state, checkpoints.read_meta(NEWEST))
    checkpoints.close()
    step_dir = run / "checkpoints" / str(step)
    shutil.copytree(run / "checkpoints" / str(NEWEST) / "data", step_dir / "data")  # the data position of step 4
    reseal(step_dir)


# --- committing and the vocabulary layout -------------------------------------------------------------


def test_poll_commits_a_finished_save_without_waiting_for_the_next(tmp_path):
    tree = {"w": jnp.arange(4096.0).reshape(64, 64)}
    checkpoints = Checkpoints(tmp_path)  # asynchronous, as in training
    checkpoints.save(1, tree, tree, {"model": "study"})
    deadline = time.monotonic() + 60
    while not checkpoints.is_committed(1) and time.monotonic() < deadline:
        checkpoints.poll()  # never blocks: returns at once while the save is being written
        time.sleep(0.01)
    assert checkpoints.is_committed(1)  # sealed without another save, wait() or close()
    checkpoints.verify(1)
    checkpoints.close()


@pytest.mark.parametrize(
    "vocab, oov, problem",
    [
        ({"a": 2, "b": 2, "<SEP>": 3}, 4, "index 2 is used by 2 titles"),
        ({"a": 1, "b": 4, "<SEP>": 3}, 5, "oov is 5, but with 2 titles it must be 4"),
        ({"a": 1, "b": 5, "<SEP>": 3}, 4, "title index 5 is outside 1..2"),
        ({"a": 1, "b": 2, "<SEP>": 4}, 5, "<SEP> has index 4, but with 2 titles it must be 3"),
        ({"a": 1, "b": 2, "<SEP>": 3}, "4.0", "the index of 'oov' is '4.0', not a non-negative integer"),
        ({"a": 1, "b": [2], "<SEP>": 3}, 4, "the index of 'b' is [2], not an integer"),
    ],
)
def test_vocabulary_files_must_have_the_dense_reference_layout(tmp_path, vocab, oov, problem):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"oov": oov, "vocab": vocab}))
    with pytest.raises(ValueError) as info:
        Vocabulary.load(path)
    assert str(info.value).startswith(f"{path}: not a valid vocab.json") and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_the_fingerprint_tells_vocabularies_apart():
    vocab = Vocabulary.build(["a", "b", "b"])
    assert vocab.fingerprint == Vocabulary.from_json(vocab.to_json()).fingerprint
    assert vocab.fingerprint != Vocabulary.build(["b", "a", "a"]).fingerprint  # same size, titles swapped


# --- load_run ------------------------------------------------------------------------------------


def load_outcome(run: Path, want: list[np.ndarray]) -> str | None:
    """None when load_run gave ``want`` and moved nothing; otherwise what went wrong."""
    before = listing(run)
    try:
        loaded = load_run(run)
        problem = None if same(params(loaded.model), want) else f"loaded step {loaded.step} with other parameters"
    except (ValueError, FileNotFoundError) as e:
        problem = f"refused although step {PREVIOUS} is intact: {e}"
    except Exception as e:  # noqa: BLE001 - reported with the file that caused it
        problem = f"crashed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if listing(run) != before:
        problem = f"{problem or 'fine'}, but moved files"
    return problem


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_run_falls_back_past_any_damaged_file_of_the_newest_checkpoint(run, saved_params, damage):
    failures = []
    for name in checkpoint_files(run):
        path = run / "checkpoints" / str(NEWEST) / name
        original = path.read_bytes()
        DAMAGES[damage](path)
        changed = not path.exists() or path.read_bytes() != original
        problem = load_outcome(run, saved_params[PREVIOUS if changed else NEWEST])
        path.write_bytes(original)
        if problem:
            failures.append(f"{name} ({damage}): {problem}")
    assert not failures, "\n".join(failures)


def test_load_run_skips_an_uncommitted_checkpoint_whose_arrays_are_damaged(run, saved_params, caplog):
    step_dir = run / "checkpoints" / str(NEWEST)
    (step_dir / CHECKSUMS).unlink()  # a run killed before it sealed its newest save
    flip(step_dir / largest_params_file(run))
    before = listing(run)
    with caplog.at_level(logging.WARNING, "studyrec.recommend"):
        loaded = load_run(run)
    assert loaded.step == PREVIOUS and same(params(loaded.model), saved_params[PREVIOUS])
    assert f"checkpoint {step_dir} is not committed" in caplog.text
    assert listing(run) == before


@pytest.mark.parametrize("scale", [np.nan, np.inf])
def test_load_run_refuses_non_finite_parameters_even_when_committed(run, saved_params, caplog, scale):
    save_weights(run, 6, scale)
    with caplog.at_level(logging.WARNING, "studyrec.recommend"):
        loaded = load_run(run)
    assert loaded.step == NEWEST and same(params(loaded.model), saved_params[NEWEST])
    assert "non-finite" in caplog.text
    with pytest.raises(ValueError, match=r"no intact checkpoint among steps \[6\] \(step 6 is damaged .*non-finite"):
        load_run(run, step=6)


def test_when_no_checkpoint_is_usable_one_line_names_each_step_and_its_problem(run):
    (run / "checkpoints" / str(NEWEST) / CHECKSUMS).unlink()
    truncate(run / "checkpoints" / str(PREVIOUS) / largest_params_file(run, PREVIOUS))
    before = listing(run)
    with pytest.raises(ValueError) as info:
        load_run(run)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1200, message
    assert f"step {NEWEST} is not committed" in message and f"step {PREVIOUS} is damaged" in message
    assert "refusing to use random weights" in message
    assert listing(run) == before


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (garble, ValueError, ["vocab.json: not a valid vocab.json"]),
        (craft_oov, ValueError, ["vocab.json: not a valid vocab.json", "oov is 1000000000000", "must be"]),
        (swap_two_titles, ValueError, ["vocab.json does not hold the titles", "config.json"]),
        (delete, FileNotFoundError, ["no vocab.json"]),
    ],
    ids=["garbled", "crafted-oov", "swapped-titles", "deleted"],
)
def test_load_run_refuses_a_damaged_vocabulary_in_one_line(run, edit, error, words):
    edit(run / "vocab.json")
    with pytest.raises(error) as info:
        load_run(run)
    message = str(info.value)
    assert "\n" not in message and str(run) in message
    for word in words:
        assert word in message, message


def test_load_run_compares_the_vocabulary_with_the_checkpoint_too(run):
    swap_two_titles(run / "vocab.json")
    record = json.loads((run / "config.json").read_text())
    del record["vocab_fingerprint"]  # only the checkpoint remembers the titles
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"vocab.json does not hold the titles that {run}/checkpoints/{NEWEST} was"):
        load_run(run)


def test_runs_saved_before_fingerprints_load_with_a_warning(run, saved_params, caplog):
    record = json.loads((run / "config.json").read_text())
    del record["vocab_fingerprint"]
    (run / "config.json").write_text(json.dumps(record))
    for step in (PREVIOUS, NEWEST):
        step_dir = run / "checkpoints" / str(step)
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        del meta["vocab_fingerprint"]
        (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
        reseal(step_dir)
    with caplog.at_level(logging.WARNING, "studyrec.recommend"):
        loaded = load_run(run)
    assert loaded.step == NEWEST and same(params(loaded.model), saved_params[NEWEST])
    assert "cannot be verified" in caplog.text


def test_a_garbled_config_is_refused_in_one_line(run):
    garble(run / "config.json")
    with pytest.raises(ValueError, match="config.json: not valid JSON") as info:
        load_run(run)
    assert "\n" not in str(info.value)


# --- recommendations -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [np.nan, 1e38], ids=["nan", "huge"])
def test_recommend_refuses_damaged_weights_instead_of_returning_nothing(pristine, scale):
    run = load_run(pristine)
    damaged = dataclasses.replace(run, model=scaled(run.model, scale))
    activity = load_activity(sample_data_paths()["train"])
    with pytest.raises(ValueError, match=r"gives no valid score to \d+ of \d+ students .* damaged"):
        damaged.recommend(activity, k=3, batch_size=64)


def test_recommend_cli_exits_2_with_one_error_line_when_every_checkpoint_is_damaged(run, tmp_path, capsys):
    save_weights(run, 6, np.nan)
    for step in (PREVIOUS, NEWEST):
        shutil.rmtree(run / "checkpoints" / str(step))
    out = tmp_path / "recs.csv"
    paths = sample_data_paths()
    with pytest.raises(SystemExit) as info:
        recommend_cli.main(["--run", str(run), "--activity", str(paths["train"]), "--out", str(out), "--k", "3"])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0] and "non-finite" in errors[0], errors
    assert not out.exists() and not list(tmp_path.glob(".recs.csv*"))


# --- resume --------------------------------------------------------------------------------------


def resume(pristine: Path, run: Path) -> Path:
    """Training rerun into ``run`` with the pristine run's settings (no validation data: quicker)."""
    from studyrec.train.loop import train

    paths = sample_data_paths()
    cfg = dataclasses.replace(
        load_run(pristine).config, output_dir=str(run), eval_rows=0,
        data=DataConfig(train_data=(str(paths["train"]),), student_info=str(paths["student_info"]),
                        school_info=str(paths["school_info"])),
    )
    return train(cfg)


def resume_problem(pristine: Path, run: Path, caplog, want: list[np.ndarray], step: int = PREVIOUS) -> str | None:
    """None when a rerun resumed from ``step``, set the newer checkpoint aside and ended with ``want``."""
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, "studyrec.train"):
            resume(pristine, run)
    except Exception as e:  # noqa: BLE001 - reported with the damage that caused it
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    aside = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit())
    if f"resumed from step {step}" not in caplog.text or not aside:
        return f"not set aside (checkpoints: {sorted(p.name for p in (run / 'checkpoints').iterdir())})"
    loaded = load_run(run)
    if loaded.step != NEWEST or not same(params(loaded.model), want):
        return f"ended at step {loaded.step} with other parameters than the uninterrupted run"
    return None


def test_resume_sets_a_damaged_newest_checkpoint_aside_and_retrains_identically(pristine, saved_params, run, caplog):
    flip(run / "checkpoints" / str(NEWEST) / largest_params_file(run))
    assert resume_problem(pristine, run, caplog, saved_params[NEWEST]) is None
    assert (run / "checkpoints" / f"corrupt-{NEWEST}").is_dir()


def test_resume_sets_an_uncommitted_checkpoint_aside(pristine, saved_params, run, caplog):
    (run / "checkpoints" / str(NEWEST) / CHECKSUMS).unlink()
    assert resume_problem(pristine, run, caplog, saved_params[NEWEST]) is None
    assert (run / "checkpoints" / f"uncommitted-{NEWEST}").is_dir()
    assert "was never committed" in caplog.text


def test_resume_sets_a_checkpoint_with_non_finite_numbers_aside(pristine, saved_params, run, caplog):
    save_weights(run, 6, np.nan)
    assert resume_problem(pristine, run, caplog, saved_params[NEWEST], step=NEWEST) is None
    assert (run / "checkpoints" / "corrupt-6").is_dir() and "non-finite" in caplog.text


def test_resume_rewrites_a_garbled_config(pristine, run, caplog):
    garble(run / "config.json")
    with caplog.at_level(logging.INFO, "studyrec.train"):
        resume(pristine, run)
    assert "config.json is unreadable" in caplog.text and f"resumed from step {NEWEST}" in caplog.text
    assert json.loads((run / "config.json").read_text())["resumes"][-1]["step"] == NEWEST


@pytest.mark.parametrize(
    "edit, words",
    [(garble, ["not a valid vocab.json"]), (craft_oov, ["oov is 1000000000000"]), (swap_two_titles, ["other titles"])],
    ids=["garbled", "crafted-oov", "swapped-titles"],
)
def test_resume_refuses_a_damaged_vocabulary_before_touching_anything(pristine, run, edit, words):
    edit(run / "vocab.json")
    before = listing(run)
    with pytest.raises(ValueError) as info:
        resume(pristine, run)
    assert "vocab.json" in str(info.value) and "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)
    assert listing(run) == before


def test_resume_refuses_checkpoints_of_other_titles(pristine, run, tmp_path):
    """Without vocab.json the vocabulary is rebuilt from data; the checkpoint's fingerprint tells it is another."""
    (run / "vocab.json").unlink()
    paths = sample_data_paths()
    text = paths["train"].read_text()
    title = Vocabulary.load(pristine / "vocab.json").decode(1)
    (tmp_path / "train.csv").write_text(text.replace(f",{title},", ",a title never seen,"))
    assert (tmp_path / "train.csv").read_text() != text
    from studyrec.train.loop import train

    cfg = dataclasses.replace(
        load_run(pristine).config, output_dir=str(run), eval_rows=0,
        data=DataConfig(train_data=(str(tmp_path / "train.csv"),), student_info=str(paths["student_info"]),
                        school_info=str(paths["school_info"])),
    )
    before = [p for p in listing(run) if p.startswith("checkpoints")]
    with pytest.raises(CheckpointMismatch, match="vocab_fingerprint"):
        train(cfg)
    assert [p for p in listing(run) if p.startswith("checkpoints")] == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_matrix_sets_any_damaged_file_aside_and_retrains_identically(
    pristine, saved_params, tmp_path, caplog, damage
):
    """Every file of the newest checkpoint: the rerun sets it aside, goes on from step 2 and ends as the run did."""
    jax.clear_caches()
    failures = []
    for i, name in enumerate(checkpoint_files(pristine)):
        run = Path(shutil.copytree(pristine, tmp_path / f"run{i}"))
        DAMAGES[damage](run / "checkpoints" / str(NEWEST) / name)
        problem = resume_problem(pristine, run, caplog, saved_params[NEWEST])
        if problem:
            failures.append(f"{name} ({damage}): {problem}")
        shutil.rmtree(run)
    jax.clear_caches()  # each train() keeps ~700 memory maps of executables: ~90 runs hit vm.max_map_count
    assert not failures, "\n".join(failures)
