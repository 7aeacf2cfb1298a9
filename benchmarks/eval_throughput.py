"""Evaluation and recommendation throughput (students/s) on generated students.

    python -m benchmarks.eval_throughput                       # 100k students, the tiny default model
    python -m benchmarks.eval_throughput --students 20000 --preset cpu-small

Evaluation is what ``experiments.train`` runs at the end (valid-only context): encode the
validation split, pack it with the model's classroom memory, ``eval_layout()``, ``model_eval.predict_topk`` (Grain-prefetched batches, top-k
on the device) and ``model_eval.score`` + ``tables``. Recommendation is ``Run.recommend`` (one
query row per student, as of just after the training split) when ``studyrec.recommend`` has it; it is
skipped otherwise. The model is freshly initialised (throughput does not depend on the weights).
``train_tokens_per_s`` is a training step of the same model timed in the same run, so
``eval_vs_train_tokens`` says whether evaluation keeps pace with training (>= 1). The digests of
the top-k, the metrics table and the recommendations tell whether two versions give the same results
(same seed, same model).
"""

from __future__ import annotations

import dataclasses

import argparse
import hashlib
import statistics
import time

import numpy as np

from benchmarks.common import Stopwatch, emit, log, peak_rss_mb, train_steps


def digest(data: bytes) -> str:
    """A short SHA-256 of ``data``: equal digests, equal results."""
    return hashlib.sha256(data).hexdigest()[:16]


def main(argv: list[str] | None = None) -> dict:
    from studyrec.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--students", type=int, default=100_000)
    p.add_argument("--preset", default="default", choices=["default", "cpu-small", "paper"],
                   help="model sizes (default: the tiny default preset)")
    p.add_argument("--model", default="study", choices=tuple(MODELS))
    p.add_argument("--batch", type=int, default=0,
                   help="evaluation rows per device batch (default: the preset's per-device batch, as experiments.train)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--no-recommend", action="store_true")
    p.add_argument("--recommend-students", type=int, default=0, help="students to recommend for (default: all)")
    p.add_argument("--recommend-batch", type=int, default=None, help="Run.recommend rows per batch (default: its own choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import equinox as eqx
    import jax
    import pandas as pd

    from studyrec.data import ClassroomPacker, Interactions, Vocabulary, make_chunks
    from studyrec.data.generate import GenerateConfig, generate
    from studyrec.evaluate import model_eval
    from studyrec.data.memory import ClassroomMemory
    from studyrec.models import build, memory_options
    from studyrec.config import PRESETS
    from studyrec.sharding import make_mesh, place_batch, shard_params
    from studyrec.train.step import make_optimizer, make_train_step

    cfg = PRESETS[args.preset]
    log(f"generating {args.students:,} students ...")
    gen = generate(GenerateConfig(n_students=args.students, seed=args.seed, n_titles=2400))

    def framed(df: pd.DataFrame) -> pd.DataFrame:
        out = df[["StudentID", "SHLF_NUM"]].copy()
        out["timestamp"] = pd.to_datetime(df["Date"]).to_numpy().astype("datetime64[s]").astype(np.int64)
        return out

    train, valid = framed(gen.train), framed(gen.valid)
    vocab = Vocabulary.build(train["SHLF_NUM"], max_size=cfg.data.vocab_size)
    origin = int(train["timestamp"].min())
    origin -= origin % 86400
    config = dataclasses.replace(cfg, model=args.model).model_config(vocab.logits_size, jax.default_backend())
    mesh = make_mesh()
    model = shard_params(build(args.model, config, key=jax.random.key(args.seed)), mesh)
    inference = eqx.nn.inference_mode(model)
    global_batch = (args.batch or cfg.per_device_batch_size) * jax.device_count()

    # --- evaluation: the final pass of experiments.train (valid-only context) ----------------------
    t0 = time.perf_counter()
    data = Interactions.from_frame(valid, vocab, gen.student_info, gen.school_info, cfg.data.classroom_grouping)
    memory = ClassroomMemory.optional(data, origin, memory_options(args.model, cfg.arch))  # as experiments.train packs it
    packer = ClassroomPacker(data, make_chunks(data, cfg.chunk_size), cfg.seq_len, vocab.sep, origin, memory=memory)
    layout = packer.eval_layout()
    t1 = time.perf_counter()
    # Compile on one batch first, so the timed pass is steady state (compile time reported apart).
    warm, _ = layout.batch(0, global_batch)
    jax.block_until_ready(model_eval.top_titles_everywhere(inference, place_batch(warm, mesh), args.k, vocab.num_titles))
    t2 = time.perf_counter()
    log(f"  layout {t1 - t0:.1f}s ({layout.num_rows:,} rows for {data.num_interactions:,} interactions); compile {t2 - t1:.1f}s")
    topk = model_eval.predict_topk(
        inference, layout, k=args.k, num_titles=vocab.num_titles, mesh=mesh, global_batch=global_batch
    )
    t3 = time.perf_counter()
    per_student, aggregate = model_eval.tables(model_eval.score(data, topk, (1, 3, 5, 10, 20)))
    t4 = time.perf_counter()
    eval_students = int(data.num_students)
    eval_tokens = layout.num_batches(global_batch) * global_batch * cfg.seq_len
    eval_s = t4 - t0 - (t2 - t1)
    log(f"  predict {t3 - t2:.1f}s, score {t4 - t3:.1f}s: {eval_students / eval_s:,.0f} students/s")

    # --- a training step of the same model, for comparison -----------------------------------------
    optimizer = make_optimizer(model, peak_lr=1e-3, warmup=10, weight_decay=0.1, grad_clip=None, decay_all=False)
    opt_state = shard_params(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
    step = make_train_step(optimizer, vocab.oov)
    train_batch = place_batch(packer.random_rows(0, np.arange(global_batch, dtype=np.int64)), mesh)
    # Donated buffers: train a copy, so the inference model keeps its arrays.
    m, o = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model), opt_state
    *_, times = train_steps(step, m, o, train_batch, [jax.random.key(i) for i in range(4)])
    train_tokens_per_s = global_batch * cfg.seq_len / statistics.median(times[1:])

    record = {
        "preset": args.preset,
        "model": args.model,
        "dtype": config.dtype,
        "num_layers": config.num_layers,
        "d_model": config.d_model,
        "vocab_size": config.vocab_size,
        "seq_len": cfg.seq_len,
        "chunk_size": cfg.chunk_size,
        "batch": global_batch,
        "k": args.k,
        "generated_students": args.students,
        "eval_students": eval_students,
        "eval_interactions": int(data.num_interactions),
        "eval_rows": int(layout.num_rows),
        "eval_students_per_s": eval_students / eval_s,
        "eval_interactions_per_s": data.num_interactions / eval_s,
        "eval_tokens_per_s": eval_tokens / (t3 - t2),
        "eval_seconds": {"layout": t1 - t0, "compile": t2 - t1, "predict": t3 - t2, "score": t4 - t3},
        "train_tokens_per_s": train_tokens_per_s,
        "eval_vs_train_tokens": eval_tokens / (t3 - t2) / train_tokens_per_s,
        "memory_size": 0 if memory is None else memory.size,
        # The same seed gives the same model: equal digests mean the same titles, in the same order.
        "topk_sha256": digest(np.ascontiguousarray(topk).tobytes()),
        "aggregate_sha256": digest(aggregate.to_csv(index=False).encode()),
    }

    # --- recommendation through Run.recommend, when it exists --------------------------------------
    try:
        from studyrec.recommend import Run
    except ImportError as e:
        Run = None
        record["recommend"] = f"skipped: studyrec.recommend.Run is not available ({e})"
    if Run is not None and not hasattr(Run, "recommend"):
        record["recommend"] = "skipped: Run has no recommend()"
        Run = None
    if Run is not None and not args.no_recommend:
        import tempfile
        from pathlib import Path

        try:
            run = Run(
                path=Path(tempfile.gettempdir()), model=inference, vocab=vocab,
                config=dataclasses.replace(cfg, model=args.model), model_config=config,
                model_name=args.model, time_origin=origin, step=0,
            )
        except TypeError as e:  # Run's fields changed: say so instead of guessing
            record["recommend"] = f"skipped: cannot build a Run from a fresh model ({e})"
            log(f"  recommend {record['recommend']}")
            args.no_recommend = True
    if Run is not None and not args.no_recommend:
        students = None
        if args.recommend_students:
            students = np.unique(train["StudentID"].to_numpy())[: args.recommend_students]
        everyone = np.unique(train["StudentID"].to_numpy())
        # Run.recommend picks its own batch (64 rows on CPU, else a memory budget of at most 512): a warm-up call on
        # 512 students compiles that shape, then the timed pass reuses it.
        run.recommend(train, gen.student_info, k=args.k, students=everyone[:512], progress=False, batch_size=args.recommend_batch)
        with Stopwatch() as watch:
            recs = run.recommend(
                train, gen.student_info, k=args.k, students=students, progress=False, batch_size=args.recommend_batch
            )
        rec_s = watch.seconds
        n_rec = int(recs["StudentID"].nunique())
        record.update({
            "recommend_students": n_rec, "recommend_batch": args.recommend_batch or "auto",
            "recommend_s": rec_s, "recommend_students_per_s": n_rec / rec_s,
            "recommend_sha256": digest(recs[["StudentID", "rank", "title"]].to_csv(index=False).encode()),
        })
        log(f"  recommend: {n_rec:,} students in {rec_s:.1f}s")
    record["peak_rss_mb"] = peak_rss_mb()
    return emit("eval_throughput", record)


if __name__ == "__main__":
    from experiments.cli import restart_with_huge_pages

    restart_with_huge_pages()  # as experiments.train, whose final evaluation this measures, runs
    main()
