"""Scoring batches at once: ``studyrec.sharding.in_order`` and what uses it."""

from __future__ import annotations

import dataclasses
import threading
import time

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest

from studyrec import sharding
from studyrec.sharding import in_order


def test_in_order_keeps_the_order_and_runs_at_most_workers_at_once():
    lock, running, most = threading.Lock(), [0], [0]

    def slow(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (i % 3))  # later items finish first now and then
        with lock:
            running[0] -= 1
        return i * i

    assert list(in_order(slow, range(10), workers=2)) == [i * i for i in range(10)]
    assert most[0] == 2
    most[0] = 0
    assert list(in_order(slow, range(5), workers=1)) == [i * i for i in range(5)]
    assert most[0] == 1
    assert list(in_order(slow, [], workers=2)) == []


def test_in_order_raises_what_a_call_raises():
    def fails_at_3(i: int) -> int:
        if i == 3:
            raise ValueError("batch 3")
        return i

    got = []
    with pytest.raises(ValueError, match="batch 3"):
        for value in in_order(fails_at_3, range(6), workers=2):
            got.append(value)
    assert got == [0, 1, 2]


def test_two_workers_on_a_single_cpu_process_unless_set(monkeypatch):
    monkeypatch.delenv("STUDYREC_SCORING_WORKERS", raising=False)
    assert sharding.scoring_workers() == (2 if jax.default_backend() == "cpu" else 1)
    monkeypatch.setenv("STUDYREC_SCORING_WORKERS", "1")
    assert sharding.scoring_workers() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("STUDYREC_SCORING_WORKERS", bad)
        with pytest.raises(ValueError, match=f"STUDYREC_SCORING_WORKERS='{bad}'"):
            sharding.scoring_workers()


def test_evaluation_and_recommendation_are_the_same_scored_one_or_two_at_a_time(monkeypatch, tmp_path):
    from studyrec.config import PRESETS
    from studyrec.data import ClassroomPacker, Interactions, Vocabulary, make_chunks
    from studyrec.data.generate import GenerateConfig, generate
    from studyrec.data.memory import ClassroomMemory
    from studyrec.evaluate import model_eval
    from studyrec.models import build, memory_options
    from studyrec.recommend import Run

    cfg = PRESETS["default"]
    gen = generate(GenerateConfig(n_students=300, seed=1, n_titles=300))
    frame = gen.train[["StudentID", "SHLF_NUM"]].copy()
    frame["timestamp"] = pd.to_datetime(gen.train["Date"]).to_numpy().astype("datetime64[s]").astype(np.int64)
    vocab = Vocabulary.build(frame["SHLF_NUM"], max_size=cfg.data.vocab_size)
    origin = int(frame["timestamp"].min())
    config = cfg.model_config(vocab.logits_size, jax.default_backend())
    model = eqx.nn.inference_mode(build("study", config, key=jax.random.key(0)))
    data = Interactions.from_frame(frame, vocab, gen.student_info, gen.school_info, cfg.data.classroom_grouping)
    memory = ClassroomMemory.optional(data, origin, memory_options("study", cfg.arch))
    layout = ClassroomPacker(data, make_chunks(data, cfg.chunk_size), cfg.seq_len, vocab.sep, origin, memory=memory).eval_layout()
    run = Run(tmp_path, model, vocab, cfg, config, "study", origin, 0)

    def both():
        topk = model_eval.predict_topk(model, layout, k=5, num_titles=vocab.num_titles, mesh=sharding.make_mesh(), global_batch=8)
        return topk, run.recommend(frame, gen.student_info, k=5, batch_size=8, progress=False)

    for workers in (1, 2):
        monkeypatch.setattr(sharding, "scoring_workers", lambda w=workers: w)
        topk, recs = both()
        if workers == 1:
            want_topk, want_recs = topk, recs
    assert layout.num_batches(8) > 2 and (want_topk > 0).any()
    np.testing.assert_array_equal(topk, want_topk)
    pd.testing.assert_frame_equal(recs, want_recs)


def test_the_probe_evaluation_scores_the_same_rows_in_parts_at_once(monkeypatch, tmp_path):
    """With two batches scored at once, each global batch's probe rows go in two halves: the same
    rows, the same sums, and one global batch's rows in memory at a time."""
    from benchmarks.common import generated_packer
    from studyrec.config import PRESETS
    from studyrec.models import build, memory_options
    from studyrec.train import fit, hooks
    from studyrec.train.job import Job

    cfg = PRESETS["default"]
    packer, vocab = generated_packer(200, seq_len=cfg.seq_len, chunk=cfg.chunk_size, vocab_size=300,
                                     memory=memory_options("study", cfg.arch))
    model = build("study", cfg.model_config(vocab.logits_size, jax.default_backend()), key=jax.random.key(0))
    per_device = 2
    job = Job(dataclasses.replace(cfg, eval_rows=40), sharding.make_mesh(), per_device * jax.device_count(), 0.0, tmp_path, True)
    probes, scores = {}, {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(sharding, "scoring_workers", lambda w=workers: w)
        probes[workers] = fit._probes(job, packer)
        evaluation = hooks.Evaluation(
            {"valid_": probes[workers]}, every=1, oov=vocab.oov, first_only=False, best=None, at_once=fit._probe_parts(job)
        )
        scores[workers] = evaluation.scores(model)
    whole = -(-40 // job.global_batch)
    assert [len(probes[w]) for w in (1, 2, 3)] == [whole, 2 * whole, whole]  # 3 parts would not divide over the devices
    monkeypatch.setattr(sharding, "scoring_workers", lambda: 3)
    assert fit._probe_parts(job) == 1, "whole batches are scored one at a time"
    assert {int(b.titles.shape[0]) for b in probes[2]} == {job.global_batch // 2}
    rows = {w: np.concatenate([np.asarray(b.titles) for b in probes[w]]) for w in (1, 2)}
    np.testing.assert_array_equal(rows[2], rows[1])
    assert scores[1]["valid_loss"] > 0
    for name, value in scores[1].items():
        assert scores[2][name] == pytest.approx(value, rel=1e-6)
