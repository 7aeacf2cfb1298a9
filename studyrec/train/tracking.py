"""Metric logging: ``metrics.jsonl`` in the run directory and Weights & Biases (offline unless the flags or
``WANDB_*`` variables say otherwise)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from studyrec.data.atomic import write_text_atomic
from studyrec.config import WandbConfig, resolve_wandb


def _step_of(line: str) -> float:
    """A metrics line's step; a torn last line (power loss mid-write) counts as past every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class Tracker:
    """Writes on process 0 only. On resume, ``metrics.jsonl`` drops lines past the restored step."""

    def __init__(self, run_dir: Path, config: dict, wandb_config: WandbConfig, *, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        wandb_config = resolve_wandb(wandb_config, run_dir)
        if wandb_config.mode != "disabled":
            import wandb

            run_id_file = run_dir / "wandb_id.txt"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
            write_text_atomic(run_id_file, run_id)
            self.run = wandb.init(
                project=wandb_config.project,
                entity=wandb_config.entity,
                name=wandb_config.name,
                tags=list(wandb_config.tags),
                config=config,
                dir=wandb_config.dir,
                mode=wandb_config.mode,
                id=run_id,
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, name: str, frame) -> None:
        if self.enabled and self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(dataframe=frame)})

    def summary(self, values: dict) -> None:
        if self.enabled and self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
