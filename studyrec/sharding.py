"""Device mesh, the logical-axis rule table, placing host batches on it and gathering results back."""

from __future__ import annotations

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
