"""Early stopping by selection: the parameters with the best validation score, in ``run_dir/best/``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import equinox as eqx
import jax
import orbax.checkpoint as ocp


class BestParameters:
    """Saves the parameters whenever the watched validation score improves (higher is better).

    On resume from step ``s``, entries saved after ``s`` are dropped, so a resumed run selects
    exactly as an uninterrupted one would.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int, keep: int = 3):
        directory = Path(os.path.abspath(run_dir)) / "best"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory, options=options)
        for step in self.manager.all_steps():
            if step > resume_step:
                self.manager.delete(step)
        self.step = self.manager.latest_step()
        self.score = -math.inf
        if self.step is not None:
            meta = self.manager.restore(self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            self.score = float(meta["score"])

    def offer(self, step: int, model, score: float) -> bool:
        """Keeps ``model``'s parameters if ``score`` beats every earlier one."""
        if not score > self.score:
            return False
        params = eqx.filter(model, eqx.is_inexact_array)
        self.manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave({"score": score})),
            force=True,
        )
        self.step, self.score = step, score
        return True

    def restore(self, model):
        """``model`` with the best parameters (``model`` itself when nothing was kept)."""
        if self.step is None:
            return model
        params, static = eqx.partition(model, eqx.is_inexact_array)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
        restored = self.manager.restore(self.step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return eqx.combine(restored.params, static)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
