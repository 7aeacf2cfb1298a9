"""Orbax checkpoints of parameters, optimizer state, step and the Grain iterator position."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import equinox as eqx
import grain
import jax
import orbax.checkpoint as ocp

logger = logging.getLogger("studyrec.train")


class Checkpoints:
    """``run_dir/checkpoints/<step>/``: a checkpoint at step ``s`` holds the state after ``s`` steps."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(os.path.abspath(run_dir)) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, save_interval_steps=1
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, opt_state, meta: dict, data_iterator=None, force: bool = False) -> None:
        args = dict(
            params=ocp.args.StandardSave(eqx.filter(model, eqx.is_inexact_array)),
            opt_state=ocp.args.StandardSave(eqx.filter(opt_state, eqx.is_array)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, model, opt_state=None, data_iterator=None):
        """Restores into the structure (and shardings) of ``model`` / ``opt_state`` / the iterator."""
        params, static = eqx.partition(model, eqx.is_inexact_array)
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        args = dict(params=ocp.args.StandardRestore(abstract(params)), meta=ocp.args.JsonRestore())
        if opt_state is not None:
            opt_arrays, opt_static = eqx.partition(opt_state, eqx.is_array)
            args["opt_state"] = ocp.args.StandardRestore(abstract(opt_arrays))
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        model = eqx.combine(restored.params, static)
        if opt_state is not None:
            opt_state = eqx.combine(restored.opt_state, opt_static)
        return model, opt_state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
