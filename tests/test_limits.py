"""Limits: memory a training job needs, impossible flag values, and catalogues smaller than a list.

A batch that cannot fit is refused before anything is packed or written, with the largest one that
fits; the memory estimate is held against XLA's own figure for the compiled step. Every flag is
checked before the first file is written. A catalogue of fewer titles than --n-recommendations
trains, evaluates and recommends end to end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from experiments import baselines as baselines_cli
from experiments import generate_data
from experiments import recommend as recommend_cli
from experiments.train import main as train_main
from experiments.train import parse
from studyrec.data.packing import Sample
from studyrec.evaluate.metrics import target_ranks
from studyrec.evaluate.topk import top_titles
from studyrec.models import ModelConfig, build
from studyrec.train import memory
from studyrec.train.checks import check_flags
from studyrec.train.step import make_optimizer, make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch.num-layers", "1", "--arch.d-model", "16", "--arch.qkv-dim", "16", "--arch.num-heads", "2",
        "--arch.mlp-dim", "32", "--wandb.mode", "disabled"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def error_line(err: str) -> str:
    """The only ``error:`` line of ``err``; fails on a traceback or more than one error."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- the memory estimate -------------------------------------------------------------------------------

SMALL = dict(vocab_size=1003, num_layers=2, d_model=32, qkv_dim=32, num_heads=4, mlp_dim=64)
# (model, config, seq_len, batch): vocabulary-, attention- and two-stream-dominated steps.
CONFIGS = [
    pytest.param("individual", dict(SMALL, vocab_size=50, num_layers=1), 16, 2, id="tiny-individual"),
    pytest.param("study-reference", dict(SMALL, copy_head=True, tie_embeddings=True, gap_embedding=True, own_bias=3.0), 65, 8,
                 id="study-copy-head"),
    pytest.param("study", dict(SMALL, vocab_size=103, recency_bias=True, own_bias=1.0), 128, 2,
                 id="lagfree-long-rows"),
    pytest.param("study", dict(SMALL, copy_head=True, copy_order_bias=True, copy_seen_bias=True, tie_embeddings=True,
                               memory_size=32), 65, 8, id="study-memory"),
]


def xla_train_step_bytes(model_name: str, config: ModelConfig, seq_len: int, batch: int) -> int:
    """XLA's own figure for the compiled training step: arguments + outputs + temporaries."""
    model = build(model_name, config, key=jax.random.key(0))
    optimizer = make_optimizer(model, peak_lr=1e-3, warmup=1, weight_decay=0.1, grad_clip=1.0, decay_all=False,
                               lr_decay="cosine", steps=10)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    rows = jnp.ones((batch, seq_len), jnp.int32)
    memory = jnp.zeros((batch, seq_len, config.memory_size), jnp.int32) if config.memory_size else None
    sample = Sample(rows, rows, rows, rows, jnp.zeros(batch, jnp.int32), memory, memory, memory)
    lowered = make_train_step(optimizer, oov=3).lower(model, opt_state, sample, jax.random.key(1))
    analysis = lowered.compile().compiled.memory_analysis()
    return analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes


@pytest.mark.parametrize("model_name, fields, seq_len, batch", CONFIGS)
def test_estimate_covers_xla_figure_for_the_train_step(model_name, fields, seq_len, batch):
    config = ModelConfig(**fields)
    need = memory.estimate(config, seq_len=seq_len, per_device_batch=batch, eval_rows_per_device=0, prefetch=1,
                           model=model_name)
    xla = xla_train_step_bytes(model_name, config, seq_len, batch)
    assert xla <= need.state + need.train_step < 4 * xla, (need, xla)


@pytest.mark.parametrize("fields", [SMALL, dict(SMALL, copy_head=True, own_bias=1.0, recency_bias=True,
                                                 gap_embedding=True, num_grade_levels=12, tie_embeddings=True),
                                    dict(SMALL, copy_head=True, copy_order_bias=True, copy_seen_bias=True, memory_size=16)])
def test_parameter_count_matches_the_built_model(fields):
    config = ModelConfig(**fields)
    name = "study" if config.memory_size else "study-reference"
    leaves = jax.tree.leaves(eqx.filter(build(name, config, key=jax.random.key(0)), eqx.is_inexact_array))
    assert memory.parameter_count(config) == sum(leaf.size for leaf in leaves)


def fit_check(batch: int, have: memory.Available):
    return memory.check_batch_fits(ModelConfig(**SMALL), have, model="study-reference", seq_len=65, per_device_batch=batch,
                                   eval_rows=64, n_devices=2, local_devices=2, prefetch=4)


def exactly_enough_for(batch: int) -> memory.Available:
    need = memory.estimate(ModelConfig(**SMALL), seq_len=65, per_device_batch=batch,
                           eval_rows_per_device=-(-64 // (batch * 2)) * batch, prefetch=4, model="study-reference", local_devices=2)
    return memory.Available(None, need.device * 2 + need.host, "test")


def test_a_batch_at_the_limit_is_accepted_and_one_above_refused_with_the_largest_that_fits():
    have = exactly_enough_for(100)
    fit_check(100, have)
    fit_check(99, have)
    with pytest.raises(ValueError) as refused:
        fit_check(101, have)
    message = str(refused.value)
    assert "--per-device-batch-size 101 needs about" in message
    assert "the largest --per-device-batch-size that fits is 100" in message
    assert "is available (test, shared by 2 CPU devices)" in message


def test_a_device_limit_is_checked_per_device():
    need = fit_check(50, memory.Available(None, 1 << 60, "test"))
    fit_check(50, memory.Available(need.device, need.host, "GPU memory limit"))
    with pytest.raises(ValueError, match=r"per device .* but .* is available \(GPU memory limit\); the largest"):
        fit_check(50, memory.Available(need.device - 1, need.host, "GPU memory limit"))


def test_eval_rows_that_cannot_fit_ask_for_fewer_eval_rows():
    have = exactly_enough_for(4)
    with pytest.raises(ValueError, match="even --per-device-batch-size 1 does not fit with --eval-rows 10000000: lower --eval-rows"):
        memory.check_batch_fits(ModelConfig(**SMALL), have, model="study-reference", seq_len=65, per_device_batch=4,
                                eval_rows=10_000_000, n_devices=2, local_devices=2, prefetch=4)


def test_host_memory_is_read_from_meminfo():
    have = memory.available(jax.devices()[0])
    assert have.device is None and 0 < have.host <= memory.host_available()


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = cli("experiments.train", "--steps", "2", "--per-device-batch-size", "1000000000", "--output-dir", str(out),
                 "--wandb.mode", "disabled")
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "--per-device-batch-size 1000000000 needs about" in line and "is available" in line
    largest = int(re.search(r"the largest --per-device-batch-size that fits is (\d+)$", line).group(1))
    assert 1 <= largest < 1_000_000_000
    assert not out.exists()


# --- flags checked before anything is written ----------------------------------------------------------

BAD_TRAIN_FLAGS = [
    (["--learning-rate", "nan"], "--learning-rate nan must be a finite number above 0"),
    (["--learning-rate", "inf"], "--learning-rate inf"),
    (["--learning-rate", "0"], "--learning-rate 0.0 must be"),
    (["--learning-rate", "-0.1"], "--learning-rate -0.1"),
    (["--warmup-steps", "-5"], "--warmup-steps -5 is negative"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"),
    (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--grad-clip", "0"], "--grad-clip 0.0 must be a finite number above 0, or None"),
    (["--grad-clip", "-1"], "--grad-clip -1.0"),
    (["--grad-clip", "nan"], "--grad-clip nan"),
    (["--n-recommendations", "0"], "--n-recommendations 0: list lengths must be positive integers"),
    (["--n-recommendations", "5", "-1"], "--n-recommendations 5 -1"),
    (["--prefetch", "0"], "--prefetch 0 must be at least 1"),
    (["--eval-rows", "-1"], "--eval-rows -1 is negative"),
    (["--epochs", "inf"], "--epochs inf must be a finite number above 0"),
    (["--epochs", "nan"], "--epochs nan must be a finite number"),
    (["--seed", "-1"], "--seed -1 must be between 0 and"),
    (["--student-chunk-size", "-5"], "--student-chunk-size -5 must be at least 1"),
    (["--output-dir", "runs/{name}"], "--output-dir 'runs/{name}' has a placeholder other than {model}"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--arch.num-layers", "0"], "--arch.num-layers 0: num_layers=0 must be a whole number of at least 1"),
    (["--arch.d-model", "0"], "--arch.d-model 0"),
    (["--arch.d-model", "15", "--arch.qkv-dim", "15", "--arch.num-heads", "1"], "--arch.d-model 15: d_model=15 must be even"),
    (["--arch.qkv-dim", "-4"], "--arch.qkv-dim -4"),
    (["--arch.num-heads", "0"], "--arch.num-heads 0"),
    (["--arch.mlp-dim", "0"], "--arch.mlp-dim 0"),
    (["--arch.dropout", "1"], "--arch.dropout 1.0: dropout=1.0 must be in [0, 1)"),
    (["--arch.dropout", "-0.1"], "--arch.dropout -0.1"),
    (["--arch.attention-dropout", "nan"], "--arch.attention-dropout nan"),
    (["--arch.copy-bias-gain", "nan"], "--arch.copy-bias-gain nan: copy_bias_gain=nan must be a finite number above 0"),
    (["--arch.copy-bias-gain", "0"], "--arch.copy-bias-gain 0.0"),
    (["--arch.own-bias", "inf"], "--arch.own-bias inf"),
    (["--grade-levels", "0"], "--grade-levels 0: num_grade_levels=0 must be at least 1"),
]


@pytest.mark.parametrize("flags, fragment", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_impossible_training_flags_are_named(flags, fragment):
    cfg = parse([*TINY, *flags])
    with pytest.raises(ValueError) as rejected:
        check_flags(cfg, 8)
    assert fragment in str(rejected.value)
    assert "\n" not in str(rejected.value)


def test_the_model_config_checks_itself_for_library_users():
    with pytest.raises(ValueError, match="num_layers=0"):
        ModelConfig(vocab_size=10, num_layers=0)
    with pytest.raises(ValueError, match=r"dropout=1.5 must be in \[0, 1\)"):
        ModelConfig(vocab_size=10, dropout=1.5)
    with pytest.raises(ValueError, match="copy_bias_gain=inf"):
        ModelConfig(vocab_size=10, copy_bias_gain=float("inf"))


@pytest.mark.parametrize("flags, fragment", [
    (["--arch.num-layers", "0"], "--arch.num-layers 0"),
    (["--learning-rate", "nan"], "--learning-rate nan"),
    (["--n-recommendations", "0"], "--n-recommendations 0"),
])
def test_impossible_flags_exit_2_before_the_run_directory_exists(tmp_path, flags, fragment):
    out = tmp_path / "run"
    result = cli("experiments.train", "--steps", "2", "--output-dir", str(out), *TINY, *flags)
    assert result.returncode == 2, result.stderr
    assert fragment in error_line(result.stderr)
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--n-recommendations", "0"], "--n-recommendations 0"),
    (["--vocab-size", "-3"], "--vocab-size -3 is negative"),
    (["--output-dir", "runs/{model}"], "--output-dir 'runs/{model}' has a placeholder other than {baseline}"),
])
def test_impossible_baseline_flags_are_named(flags, fragment):
    cfg = baselines_cli._parse(["--baseline", "popularity", *flags])
    with pytest.raises(ValueError, match=re.escape(fragment)):
        baselines_cli.check_flags(cfg)


@pytest.mark.parametrize("flags, fragment", [
    (["--n-students", "0"], "--n-students 0"),
    (["--n-titles", "2"], "--n-titles 2 must be at least 4"),
    (["--weeks", "1"], "--weeks 1"),
    (["--valid-weeks", "20"], "--valid-weeks 20 must be between 1 and --weeks - 1 = 19"),
    (["--read-prob", "1.5"], "--read-prob 1.5 must be a probability"),
    (["--weekend-read-prob", "-0.1"], "--weekend-read-prob -0.1"),
    (["--seed", "-2"], "--seed -2"),
    (["--start", "2023-13-01"], "--start '2023-13-01' is not a date"),
])
def test_impossible_generate_flags_exit_2_and_write_nothing(tmp_path, capsys, flags, fragment):
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_info:
        generate_data.main(["--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--step", "-1"], "--step -1 is negative"),
])
def test_impossible_recommend_flags_exit_2_and_write_nothing(tmp_path, capsys, flags, fragment):
    out = tmp_path / "recs.csv"
    with pytest.raises(SystemExit) as exit_info:
        recommend_cli.main(["--run", str(tmp_path / "run"), "--activity", "activity.csv", "--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert not out.exists()


# --- a catalogue smaller than the lists ----------------------------------------------------------------

STUDENTS = "StudentID,OrgnID,GRADE_LVL_NBR\n" + "".join(f"{s},1000,3\n" for s in range(101, 107))


@pytest.fixture(scope="module")
def two_titles(tmp_path_factory) -> dict[str, Path]:
    """Activity over a catalogue of two titles, A and B, each student alternating between them."""
    root = tmp_path_factory.mktemp("two_titles")
    days = {"train": ("01", range(1, 9)), "valid": ("02", range(1, 4))}
    paths = {}
    for split, (month, span) in days.items():
        rows = [f"{s},{'AB'[(d + s) % 2]},2023-{month}-{d:02d},100" for s in range(101, 107) for d in span]
        paths[split] = root / f"{split}.csv"
        paths[split].write_text("StudentID,SHLF_NUM,Date,Seconds Read\n" + "\n".join(rows) + "\n")
    paths["students"] = root / "students.csv"
    paths["students"].write_text(STUDENTS)
    return paths


def data_flags(paths: dict[str, Path]) -> list[str]:
    return ["--train-data", str(paths["train"]), "--valid-data", str(paths["valid"]),
            "--student-info", str(paths["students"])]


def assert_every_n_scored_on_the_whole_catalogue(run: Path) -> None:
    aggregate = pd.read_csv(run / "aggregate.csv")
    for subset, table in aggregate.groupby("Evaluation_Type"):
        assert sorted(table["N_Recommendations"]) == [1, 3, 5, 10, 20], subset
        hits = table.set_index("N_Recommendations")["Hits_at_N"]
        # Both titles are in every list of two: past n = 2 every read is a hit.
        assert (hits.loc[[3, 5, 10, 20]] == 1.0).all(), table
        assert hits.loc[1] <= 1.0


@pytest.fixture(scope="module")
def two_title_run(two_titles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_title_run") / "run"
    train_main(["--output-dir", str(out), "--steps", "2", "--per-device-batch-size", "1", "--eval-rows", "8",
                *TINY, *data_flags(two_titles)])
    return out


def test_a_two_title_catalogue_trains_and_evaluates_every_n(two_title_run):
    assert_every_n_scored_on_the_whole_catalogue(two_title_run)
    recommendations = pd.read_json(two_title_run / "recommendations.json", typ="series")
    lists = [ranking for rankings in recommendations for ranking in rankings]
    assert lists and all(sorted(ranking) == ["A", "B"] for ranking in lists)


def test_recommend_more_titles_than_the_catalogue_returns_them_all(two_title_run, two_titles, tmp_path):
    out = tmp_path / "recs.csv"
    recommend_cli.main(["--run", str(two_title_run), "--activity", str(two_titles["valid"]),
                        "--student-info", str(two_titles["students"]), "--k", "50", "--out", str(out)])
    recs = pd.read_csv(out)
    assert all(sorted(titles) == ["A", "B"] for _, titles in recs.groupby("StudentID")["title"])
    assert recs["StudentID"].nunique() == 6


@pytest.mark.parametrize("baseline", ["popularity", "knn", "own_last", "classmates_recent"])
def test_baselines_on_a_two_title_catalogue_score_every_n(two_titles, tmp_path, baseline):
    out = tmp_path / baseline
    baselines_cli.main(["--baseline", baseline, "--output-dir", str(out), *data_flags(two_titles)])
    assert_every_n_scored_on_the_whole_catalogue(out)
    recommendations = pd.read_json(out / "recommendations.json", typ="series")
    assert all(sorted(ranking) == ["A", "B"] for rankings in recommendations for ranking in rankings)


def test_device_top_k_over_fewer_allowed_titles_than_k():
    num_titles, k = 2, 5
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, num_titles + 3)), jnp.float32)
    targets = jnp.asarray([1, 2, num_titles + 2])  # two titles, then OOV (disallowed)
    ids, scores = top_titles(logits, k, num_titles)
    ids, ranks = np.asarray(ids), target_ranks(np.asarray(ids), np.asarray(targets))
    assert ids.shape == (3, k)
    assert (np.sort(ids[:, :2], axis=1) == [1, 2]).all() and (ids[:, 2:] == 0).all()
    assert np.isfinite(np.asarray(scores)[:, :2]).all() and np.isneginf(np.asarray(scores)[:, 2:]).all()
    assert ranks[2] == k and (ranks[:2] < 2).all()


def test_training_jobs_in_one_process_do_not_accumulate_memory_maps(tmp_path):
    """A sweep of trainings in one process: each job's executables are freed when it returns.

    Without that, every job kept about two thousand memory maps and a few dozen jobs reached the
    kernel's vm.max_map_count, where XLA aborts the process.
    """
    from studyrec.config import DataConfig, TrainConfig, WandbConfig
    from studyrec.train.loop import train

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    counts = []
    for job in range(2):
        train(TrainConfig(output_dir=str(tmp_path / f"job{job}"), steps=2, eval_every=2, save_every=2, eval_rows=8,
                          per_device_batch_size=1, data=DataConfig(n_recommendations=(1,)), wandb=WandbConfig(mode="disabled")))
        counts.append(maps())
    assert counts[1] - counts[0] < 300, counts  # about 2,000 when a job's executables stay
