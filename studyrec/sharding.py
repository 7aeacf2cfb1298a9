"""Device mesh, the logical-axis rule table, placing host batches on it, scoring them, gathering results back."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Logical axis -> mesh axes. Rows of a batch spread over every device; parameters over "fsdp".
RULES: dict[str, tuple[str, ...]] = {"batch": ("data", "fsdp"), "params": ("fsdp",)}


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ``data x fsdp`` mesh over ``devices`` (default: every device of every process; Auto axes, for Equinox)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"--fsdp {fsdp} does not divide the {n} devices")
    return jax.make_mesh(
        (n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"]))


def param_sharding(mesh: Mesh, leaf) -> NamedSharding:
    """Shards a parameter's largest evenly divisible axis over ``fsdp``; replicates the rest."""
    size = mesh.shape["fsdp"]
    if size == 1 or not hasattr(leaf, "shape") or leaf.ndim == 0:
        return NamedSharding(mesh, P())
    for axis in np.argsort(leaf.shape)[::-1]:
        if leaf.shape[axis] % size == 0 and leaf.shape[axis] >= size:
            spec = [None] * leaf.ndim
            spec[axis] = RULES["params"]
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def shard_params(tree, mesh: Mesh):
    """Places every array of ``tree`` (a model or optimizer state) by the rule table."""
    return jax.tree.map(lambda x: jax.device_put(x, param_sharding(mesh, x)) if eqx.is_array(x) else x, tree)


def place_batch(local, mesh: Mesh):
    """Assembles each process's slice of a batch (numpy, leading axis = rows) into global arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def gather(x) -> np.ndarray:
    """Every process's rows of a batch-sharded array (or local numpy slice), on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process; a collective, so every process must call it together."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def barrier(name: str) -> None:
    """Waits until every process gets here (with the same ``name``); nothing with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


T, R = TypeVar("T"), TypeVar("R")


def scoring_workers() -> int:
    """Batches to score at once: two in a single CPU process, whose top-k, gathers and scatters run
    on one core each (two batches at once fill both: 1.1-1.4x the students per second, for one more
    batch's scratch memory); one otherwise, so that every process launches its programs and
    collectives in the same order. ``STUDYREC_SCORING_WORKERS`` sets it for a single process."""
    if jax.process_count() > 1:
        return 1
    value = os.environ.get("STUDYREC_SCORING_WORKERS", "")
    if not value:
        return 2 if jax.default_backend() == "cpu" else 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"STUDYREC_SCORING_WORKERS={value!r}: give a positive number of batches to score at once")
    return int(value)


def in_order(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` with up to ``workers`` (default :func:`scoring_workers`) calls running at
    once on threads, results in order. On CPU a program runs on the thread that launches it, so two
    threads run two programs side by side (one thread's programs run one after another)."""
    workers = scoring_workers() if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        running = collections.deque()
        for item in items:
            running.append(pool.submit(fn, item))
            if len(running) == workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
