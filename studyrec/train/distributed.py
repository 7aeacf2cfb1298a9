"""Joining a multi-process run through ``jax.distributed`` (JAX's own runtime, nothing home-made)."""

from __future__ import annotations

import jax

from studyrec.train.config import DistConfig


def initialize(config: DistConfig) -> None:
    """Initialises ``jax.distributed`` when the config asks for more than one process."""
    manual = config.coordinator_address is not None or config.num_processes is not None
    if not (config.auto or manual):
        return
    if config.auto and manual:
        raise ValueError("use either --dist.auto or the manual --dist.* flags, not both")
    if manual and (config.coordinator_address is None or config.num_processes is None or config.process_id is None):
        raise ValueError("a manual launch needs --dist.coordinator-address, --dist.num-processes and --dist.process-id")
    # CPU devices need a collectives backend to talk across processes; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=config.timeout_s)
    if manual:
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = list(config.local_device_ids)
    jax.distributed.initialize(**kwargs)
