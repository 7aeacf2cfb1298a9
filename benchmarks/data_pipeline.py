"""Data pipeline throughput and memory: CSV -> frame -> vocabulary -> chunks -> packed rows.

    python -m benchmarks.data_pipeline                       # 1M generated interactions
    python -m benchmarks.data_pipeline --interactions 10000000

The data are generated with ``studyrec.data.generate`` and written as the reference CSVs in a
child process (so this process's peak RSS is the pipeline's, not the generator's), then timed stage
by stage:

- ``load``: ``io.load_activity`` on the train and valid CSVs (parse, validate, sort);
- ``vocab``: ``Vocabulary.build`` (top 2000 titles);
- ``chunk``: ``Interactions.from_frame`` (encode, classrooms) + ``make_chunks``;
- ``memory``: the classroom memory of the model (``--model``, default ``study``, whose rows carry
  each token's ``ClassroomMemory``, as ``experiments.train`` packs them; none for a model without);
- ``pack``: ``ClassroomPacker`` + ``random_rows`` in batches of 1024 (enough rows to hold every
  interaction about once);
- ``grain``: the same rows through ``pipeline.training_batches`` + ``prefetching`` (2 threads);
- ``eval``: ``eval_layout()`` and composing every batch of the exhaustive pass.

``interactions_per_s`` is interactions / (load + vocab + chunk); ``rows_per_s`` is the packing
rate of training rows. Memory: ``peak_rss_mb`` and ``rss_growth_mb`` (peak minus the RSS after
imports); ``rss_mb_per_m_interactions`` should stay flat as the data grow.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Stopwatch, current_rss_mb, emit, load_average, log, peak_rss_mb

PER_STUDENT = 34.0  # generated interactions per student (20 weeks, default read probabilities)


def write_data(out: Path, interactions: int, seed: int) -> dict:
    """Generates about ``interactions`` interactions and writes the CSVs, in a child process."""
    n_students = max(30, int(round(interactions / PER_STUDENT)))
    code = (
        "import sys, time, json\n"
        "from studyrec.data.generate import GenerateConfig, generate, write\n"
        "t = time.perf_counter()\n"
        f"d = generate(GenerateConfig(n_students={n_students}, seed={seed}, n_titles=2400))\n"
        "g = time.perf_counter() - t\n"
        f"write(d, {str(out)!r})\n"
        "print(json.dumps({'generate_s': g, 'write_s': time.perf_counter() - t - g, 'students': len(d.student_info)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--interactions", type=int, default=1_000_000, help="generated interactions (approximate)")
    p.add_argument("--seq-len", type=int, default=65)
    p.add_argument("--chunk", type=int, default=65, help="student_chunk_size (the paper preset: 65)")
    p.add_argument("--batch", type=int, default=1024, help="rows per packed batch")
    p.add_argument("--pack-rows", type=int, default=0, help="training rows to pack (default: ~interactions/60)")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-grain", action="store_true", help="skip the Grain prefetching stage")
    p.add_argument("--model", default="study", help="whose classroom memory the rows carry (default: study, the default model)")
    args = p.parse_args(argv)

    import pandas as pd  # noqa: F401  (imports counted in the baseline RSS)

    from studyrec.data import ClassroomPacker, Interactions, Vocabulary, make_chunks
    from studyrec.data.io import load_activity, load_school_info, load_student_info
    from studyrec.data.memory import ClassroomMemory
    from studyrec.data.pipeline import prefetching, training_batches
    from studyrec.config import DEFAULT_ARCH
    from studyrec.models import memory_options

    base_rss = current_rss_mb()
    stages: dict[str, float] = {}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="studyrec-bench-") as tmp:
        tmp = Path(tmp)
        log(f"generating ~{args.interactions:,} interactions into {tmp} ...")
        gen = write_data(tmp, args.interactions, args.seed)
        csv_mb = sum(f.stat().st_size for f in tmp.glob("*.csv")) / 2**20
        log(f"  generated in {gen['generate_s']:.1f}s, written in {gen['write_s']:.1f}s ({csv_mb:.0f} MiB of CSV)")

        load0 = load_average()
        with Stopwatch(stages, "load_s"):
            frame = load_activity(tmp / "student_activity_train.csv", tmp / "student_activity_valid.csv")
        info = load_student_info(tmp / "student_info.csv")
        schools = load_school_info(tmp / "school_info.csv")
        rss["after_load"] = current_rss_mb()
        n = len(frame)
        log(f"  load: {n:,} interactions in {stages['load_s']:.2f}s")

        with Stopwatch(stages, "vocab_s"):
            vocab = Vocabulary.build(frame["SHLF_NUM"], max_size=args.vocab_size)

        with Stopwatch(stages, "chunk_s"):
            data = Interactions.from_frame(frame, vocab, info, schools, "school_grade")
            chunks = make_chunks(data, args.chunk)
        rss["after_chunk"] = current_rss_mb()
        log(f"  vocab {stages['vocab_s']:.2f}s, interactions+chunks {stages['chunk_s']:.2f}s ({len(chunks):,} chunks)")

        origin = int(frame["timestamp"].min())
        origin -= origin % 86400
        del frame  # what a training job keeps is the encoded arrays
        B = args.batch
        rows = args.pack_rows or max(B, (n // 60) // B * B)
        nb = -(-rows // B)
        with Stopwatch(stages, "memory_s"):
            memory = ClassroomMemory.optional(data, origin, memory_options(args.model, DEFAULT_ARCH))
        rss["after_memory"] = current_rss_mb()
        with Stopwatch(stages, "packer_init_s"):
            packer = ClassroomPacker(data, chunks, args.seq_len, vocab.sep, origin, memory=memory)
        tokens = 0
        with Stopwatch(stages, "pack_s"):
            for b in range(nb):
                sample = packer.random_rows(args.seed, np.arange(b * B, (b + 1) * B, dtype=np.int64))
                tokens += int((sample.segments > 0).sum())
        rss["after_pack"] = current_rss_mb()
        log(f"  pack: {nb * B:,} rows in {stages['pack_s']:.2f}s ({tokens / (nb * B * args.seq_len):.0%} of tokens real)")

        if not args.no_grain:
            it = prefetching(training_batches(packer, seed=args.seed, global_batch=B, num_steps=nb))
            with Stopwatch(stages, "grain_s"):
                for _ in range(nb):
                    next(it)
            del it

        with Stopwatch(stages, "eval_layout_s"):
            layout = packer.eval_layout()
        covered = 0
        with Stopwatch(stages, "eval_compose_s"):
            for b in range(layout.num_batches(B)):
                _, source = layout.batch(b, B)
                covered += int((source >= 0).sum())
        assert covered == n, (covered, n)
        rss["after_eval"] = current_rss_mb()
        log(f"  eval: layout {stages['eval_layout_s']:.2f}s ({layout.num_rows:,} rows), compose {stages['eval_compose_s']:.2f}s")

    prep = stages["load_s"] + stages["vocab_s"] + stages["chunk_s"]
    peak = peak_rss_mb()
    record = {
        "interactions": n,
        "students": int(data.num_students),
        "classrooms": int(len(np.unique(data.classroom))),
        "chunks": len(chunks),
        "seq_len": args.seq_len,
        "chunk_size": args.chunk,
        "batch": B,
        "model": args.model,
        "memory_size": 0 if memory is None else memory.size,
        "csv_mib": round(csv_mb, 1),
        "interactions_per_s": n / prep,
        "rows_per_s": nb * B / stages["pack_s"],
        "load_interactions_per_s": n / stages["load_s"],
        "vocab_interactions_per_s": n / stages["vocab_s"],
        "chunk_interactions_per_s": n / stages["chunk_s"],
        "pack_tokens_per_s": tokens / stages["pack_s"],
        "grain_rows_per_s": nb * B / stages["grain_s"] if "grain_s" in stages else None,
        "eval_layout_interactions_per_s": n / stages["eval_layout_s"],
        "eval_rows": int(layout.num_rows),
        "eval_compose_rows_per_s": layout.num_batches(B) * B / stages["eval_compose_s"],
        "eval_interactions_per_s": n / (stages["eval_layout_s"] + stages["eval_compose_s"]),
        "packed_rows": nb * B,
        "real_token_fraction": tokens / (nb * B * args.seq_len),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "generate_s": round(gen["generate_s"], 2),
        "peak_rss_mb": peak,
        "base_rss_mb": base_rss,
        "rss_growth_mb": round(peak - base_rss, 1),
        "rss_mb_per_m_interactions": round((peak - base_rss) / (n / 1e6), 1),
        "rss_stages_mb": rss,
        "load_avg_1m_start": load0,
    }
    return emit("data_pipeline", record)


if __name__ == "__main__":
    main()
