"""Grain datasets of classroom packs: deterministic, sharded by JAX process, checkpointable.

Global batch ``g`` holds rows ``g*G .. g*G+G-1`` (``G`` = global batch size); process ``p`` of
``P`` builds its contiguous slice of ``G/P`` rows, which is what
``jax.make_array_from_process_local_data`` expects. So the global batch does not depend on how
many processes share the work.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from studyrec.data.packing import ClassroomPacker, EvalLayout, Sample, local_rows


def training_batches(
    packer: ClassroomPacker,
    *,
    seed: int,
    global_batch: int,
    num_steps: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batch ``step`` of training rows drawn with replacement: a pure function of ``(seed, step)``."""
    return grain.MapDataset.range(num_steps).map(
        lambda step: packer.random_rows(seed, local_rows(step, global_batch, process_index, process_count))
    )


def prefetching(dataset: grain.MapDataset, *, threads: int | None = None, buffer: int = 8) -> grain.DatasetIterator:
    """An iterator that packs ahead on background threads (default: one per core, at most 16).

    The order does not depend on the thread count; ``get_state``/``set_state`` resume it.
    """
    threads = threads or min(os.cpu_count() or 1, 16)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)))


def eval_batches(
    layout: EvalLayout, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """The exhaustive pass in global batches; each process builds its slice of every batch.

    Items are ``(sample, source)``: ``source[b, t]`` is the interaction at that token (-1: none).
    """
    local = global_batch // process_count
    if local * process_count != global_batch:
        raise ValueError(f"global batch {global_batch} does not divide over {process_count} processes")

    def batch(index: int) -> tuple[Sample, np.ndarray]:
        return layout.batch(index * process_count + process_index, local)

    return grain.MapDataset.range(layout.num_batches(global_batch)).map(batch)
