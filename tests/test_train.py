import dataclasses
import json

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest

from experiments.train import parse
from studyrec.data import dataset
from studyrec.data.generate import sample_data_paths
from studyrec.data.interactions import make_chunks
from studyrec.data.memory import ClassroomMemory
from studyrec.data.packing import ClassroomPacker
from studyrec.data.vocab import UNDEF
from studyrec.models import build, memory_options
from studyrec.checkpoint import Checkpoints
from studyrec.models import STUDY_OWN_BIAS
from studyrec.config import DEFAULT_ARCH, DEFAULT_EPOCHS, PRESETS, DataConfig, TrainConfig, WandbConfig
from studyrec.train.checks import check_flags, resolve_steps
from studyrec.train.loop import train
from studyrec.sharding import make_mesh, place_batch, shard_params
from studyrec.train.step import make_optimizer, make_train_step, schedule

TINY_ARCH = dataclasses.replace(DEFAULT_ARCH, num_layers=1, d_model=16, qkv_dim=16, num_heads=2, mlp_dim=32)


def tiny(tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig(
        arch=TINY_ARCH, steps=6, per_device_batch_size=2, learning_rate=3e-3, scale_lr=False, warmup_steps=2,
        eval_every=3, save_every=3, log_every=1, eval_rows=16, data=DataConfig(n_recommendations=(1, 5)),
        wandb=WandbConfig(mode="disabled"), output_dir=str(tmp_path),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads_and_builds(name):
    cfg = parse([name])
    assert cfg.preset == name
    model_config = cfg.model_config(2003, "cpu")
    assert model_config.d_model == cfg.arch.d_model
    shapes = jax.eval_shape(lambda: build(cfg.model, model_config, key=jax.random.key(0)))
    assert shapes.decoder.embedding.shape == (2003, cfg.arch.d_model)


def test_presets_match_their_definitions():
    small = parse(["cpu-small"])
    assert (small.arch.num_layers, small.arch.d_model, small.arch.qkv_dim, small.arch.mlp_dim, small.arch.num_heads) == (2, 128, 128, 512, 8)
    assert (small.seq_len, small.chunk_size, small.per_device_batch_size) == (65, 32, 32)  # study's chunk
    assert (small.steps, small.epochs) == (None, DEFAULT_EPOCHS)  # passes over the data, not a step count
    assert parse(["cpu-small", "--model", "study-reference"]).chunk_size == 8
    assert parse(["cpu-small", "--student-chunk-size", "65"]).chunk_size == 65
    paper = parse(["paper", "--steps", "10"])
    assert (paper.arch.num_layers, paper.arch.d_model, paper.per_device_batch_size, paper.learning_rate) == (6, 256, 2048, 0.0016)
    assert paper.steps == 10 and paper.chunk_size == 65  # explicit flags win over the preset
    assert parse(["--steps", "10", "--model", "individual"]).preset == "default"  # no subcommand: the default preset
    assert parse(["cpu-small", "--train-data", "a.csv", "b.csv", "--vocab-size", "7"]).data == DataConfig(
        train_data=("a.csv", "b.csv"), vocab_size=7
    )  # the data flags keep their plain names


def test_own_bias_defaults_to_study_only():
    config = lambda arch, model: TrainConfig(arch=arch, model=model).model_config(50, "cpu")  # noqa: E731
    assert [config(DEFAULT_ARCH, m).own_bias for m in ("study-reference", "individual", "study")] == [STUDY_OWN_BIAS, None, None]
    chosen = parse(["--model", "study", "--arch.own-bias", "1.5"])
    assert config(chosen.arch, chosen.model).own_bias == 1.5
    off = parse(["--model", "study-reference", "--arch.own-bias", "None"])
    assert config(off.arch, off.model).own_bias is None


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_evaluations_keep_their_own_cadence(tmp_path):
    """--eval-every need not be a multiple of --log-every: every evaluation happens, with the train metrics."""
    run = train(tiny(tmp_path, steps=6, log_every=4, eval_every=3, save_every=6))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "eval/valid_accuracy" in m] == [3, 6]
    assert [m["step"] for m in metrics] == [3, 4, 6]
    assert all("train/loss" in m for m in metrics)


def test_end_to_end_on_a_data_by_fsdp_mesh_lowers_the_loss(tmp_path):
    assert jax.device_count() == 8
    run = train(tiny(tmp_path, steps=60, fsdp=2, log_every=5, eval_every=30, save_every=30, learning_rate=1e-2))
    metrics = read_metrics(run)
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 0.3
    for name in ("config.json", "vocab.json", "aggregate.csv", "per_student.csv", "recommendations.json"):
        assert (run / name).exists(), name
    aggregate = pd.read_csv(run / "aggregate.csv")
    assert set(aggregate["Evaluation_Type"]) == {"all", "non_continuation", "non_history"}
    assert sorted(set(aggregate["N_Recommendations"])) == [1, 5]
    assert Checkpoints(run).steps() == [30, 60]


def test_focus_rows_train_and_score_every_validation_interaction(tmp_path):
    history = DataConfig(eval_context="history", n_recommendations=(1, 5))
    run = train(tiny(tmp_path, student_chunk_size=8, classmate_chunk_size=4, data=history, steps=4, eval_every=2))
    recommendations = json.loads((run / "recommendations.json").read_text())
    valid = pd.read_csv(sample_data_paths()["valid"])
    assert sum(len(v) for v in recommendations.values()) == len(valid)
    assert all(len(titles) == 5 and UNDEF not in titles for v in recommendations.values() for titles in v)  # all scored
    assert any("eval/valid_accuracy" in m for m in read_metrics(run))


def final_params(run_dir, cfg):
    run_dir = str(run_dir)
    config = json.loads((tmp := __import__("pathlib").Path(run_dir)).joinpath("config.json").read_text())
    from studyrec.models import ModelConfig

    model = build(cfg.model, ModelConfig(**config["model_config"]), key=jax.random.key(99))
    checkpoints = Checkpoints(tmp)
    restored, _, _ = checkpoints.restore(checkpoints.latest_step(), model)
    checkpoints.close()
    return jax.tree.leaves(eqx.filter(restored, eqx.is_array))


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(tiny(tmp_path / "straight"))
    stopped = tiny(tmp_path / "resumed")
    train(dataclasses.replace(stopped, steps=3))
    resumed = train(stopped)
    for a, b in zip(final_params(straight, stopped), final_params(resumed, stopped)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pd.testing.assert_frame_equal(pd.read_csv(straight / "aggregate.csv"), pd.read_csv(resumed / "aggregate.csv"))
    config = json.loads((resumed / "config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [3]
    losses = lambda run: [m["train/loss"] for m in read_metrics(run)]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_one_device_and_eight_devices_agree(tmp_path):
    cfg = tiny(tmp_path)
    frames = dataset.Frames.load(dataset.DataPaths.resolve((), (), None, None))
    vocab = dataset.build_vocab(frames, cfg.data.vocab_size)
    data = dataset.encode(frames.train, vocab, frames, cfg.data.classroom_grouping)
    model_config = cfg.model_config(vocab.logits_size, "cpu")
    origin = dataset.time_origin(frames.train)
    memory = ClassroomMemory.of(data, origin, **memory_options(cfg.model, model_config))  # the default study reads one
    packer = ClassroomPacker(data, make_chunks(data, cfg.chunk_size), cfg.seq_len, vocab.sep, origin, memory=memory)
    losses = {}
    for n in (1, 8):
        mesh = make_mesh(1, jax.devices()[:n])
        model = build(cfg.model, model_config, key=jax.random.key(0))
        opt = make_optimizer(model, peak_lr=1e-2, warmup=1, weight_decay=0.1, grad_clip=1.0, decay_all=False)
        model = shard_params(model, mesh)
        state = shard_params(opt.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
        step = make_train_step(opt, vocab.oov)
        losses[n] = []
        for i in range(3):
            batch = place_batch(packer.random_rows(0, np.arange(16 * i, 16 * i + 16)), mesh)
            model, state, sums = step(model, state, batch, jax.random.key(i))
            losses[n].append(float(sums["loss_sum"] / sums["weight"]))
    np.testing.assert_allclose(losses[1], losses[8], rtol=1e-5)
    assert losses[1][2] != losses[1][0]


def test_learning_rate_schedules():
    rsqrt = schedule(1e-3, warmup=10)
    cosine = schedule(1e-3, warmup=10, decay="cosine", steps=110)
    for lr in (rsqrt, cosine):
        assert float(lr(0)) == 0.0
        assert float(lr(5)) == pytest.approx(5e-4)
        assert float(lr(10)) == pytest.approx(1e-3, rel=1e-3)
    assert float(rsqrt(40)) == pytest.approx(5e-4, rel=1e-3)
    assert float(cosine(60)) == pytest.approx(5e-4, rel=1e-4)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-9)
    assert float(cosine(200)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="number of steps"):
        schedule(1e-3, warmup=10, decay="cosine")


def test_epochs_set_the_steps_and_cap_the_warm_up(tmp_path):
    cfg = tiny(tmp_path, epochs=2.5, seq_len=10, warmup_steps=50, steps=None, eval_every=None)
    resolved = resolve_steps(cfg, interactions=1000, global_batch=4)  # a pass is 1000 / 40 = 25 steps
    assert (resolved.steps, resolved.warmup_steps, resolved.eval_every) == (63, 6, 7)  # ten evaluations
    assert resolve_steps(tiny(tmp_path, eval_every=None), 1000, 4).eval_every == 1  # 6 steps: at least one apart
    assert resolve_steps(tiny(tmp_path), 1000, 4) == tiny(tmp_path)
    short = resolve_steps(tiny(tmp_path, lr_decay="cosine", steps=40, warmup_steps=100), 1000, 4)
    assert (short.steps, short.warmup_steps) == (40, 4)  # the cosine decay keeps 90% of the run
    long = tiny(tmp_path, lr_decay="cosine", steps=400, warmup_steps=100)
    assert resolve_steps(long, 1000, 4) == long
    with pytest.raises(ValueError, match="--epochs"):
        check_flags(tiny(tmp_path, epochs=0.0), 1)


COMPILE_FIRST = """
import sys
from studyrec.train import job, loop
from experiments.train import parse

class Compiling(Exception):
    pass

def record(*args):
    print(sorted(m for m in ("grain", "orbax.checkpoint", "studyrec.evaluate", "studyrec.train.fit", "wandb") if m in sys.modules))
    raise Compiling

job.compiled_step = record
try:
    loop.train(parse(["--steps", "2", "--output-dir", sys.argv[1], "--wandb.mode", "disabled"]))
except Compiling:
    pass
from studyrec.train import fit  # what the run loads once the step is compiled
print(sorted(m for m in ("grain", "orbax.checkpoint", "studyrec.evaluate") if m in sys.modules))
"""


def test_the_train_step_compiles_before_grain_orbax_and_the_evaluation_load(tmp_path):
    """The compiler's transient memory stacks on the process as it is then: about 50 MB smaller without them."""
    from test_environment import python

    done = python(COMPILE_FIRST, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    at_compile, after = done.stdout.strip().splitlines()[-2:]
    assert at_compile == "[]"
    assert after == "['grain', 'orbax.checkpoint', 'studyrec.evaluate']"  # the check can see them


def test_a_bad_scoring_workers_variable_stops_the_job_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDYREC_SCORING_WORKERS", "none")
    with pytest.raises(ValueError, match="STUDYREC_SCORING_WORKERS='none'"):
        train(parse(["--steps", "2", "--output-dir", str(tmp_path / "run"), "--wandb.mode", "disabled"]))
    assert not (tmp_path / "run").exists()
