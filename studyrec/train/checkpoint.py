"""Orbax checkpoints of parameters, optimizer state, step and the Grain iterator position.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a kill
mid-save leaves no half checkpoint under its step's name. On top of that every checkpoint this
class finishes gets a ``checksums.json`` (size and SHA-256 of each file), and
:meth:`Checkpoints.restore_latest` checks it: a checkpoint that is damaged later (a deleted,
truncated or altered file) is reported, moved aside to ``checkpoints/corrupt-<step>``, and the
previous one is used. Nothing is pickled: arrays go to TensorStore, the rest to JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import equinox as eqx
import grain
import jax
import orbax.checkpoint as ocp

from studyrec.data.atomic import write_text_atomic
from studyrec.train import distributed

logger = logging.getLogger("studyrec.train")

CHECKSUMS = "checksums.json"
_ITEMS = ("params", "opt_state", "meta", "data")


class CheckpointMismatch(ValueError):
    """A readable checkpoint written by a run with other settings (model kind, vocabulary, sizes)."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


def _file_digests(step_dir: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` for every file of the checkpoint's items."""
    digests = {}
    for item in _ITEMS:
        for path in sorted((step_dir / item).rglob("*")):
            if path.is_file():
                sha = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        sha.update(block)
                name = path.relative_to(step_dir).as_posix()
                digests[name] = {"size": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class Checkpoints:
    """``run_dir/checkpoints/<step>/``: a checkpoint at step ``s`` holds the state after ``s`` steps."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(os.path.abspath(run_dir)) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            save_interval_steps=1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._primary = jax.process_index() == 0
        self._unsealed: list[int] = []

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, model, opt_state, meta: dict, data_iterator=None, force: bool = False) -> None:
        """Starts an asynchronous save; a step that is already saved is left as it is."""
        if step in self.manager.all_steps():
            return
        self._seal()
        args = dict(
            params=ocp.args.StandardSave(eqx.filter(model, eqx.is_inexact_array)),
            opt_state=ocp.args.StandardSave(eqx.filter(opt_state, eqx.is_array)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if self.manager.save(step, args=ocp.args.Composite(**args), force=force):
            self._unsealed.append(step)

    def _seal(self) -> None:
        """Writes ``checksums.json`` into the checkpoints this object saved that have finished."""
        if not self._unsealed:
            return
        self.manager.wait_until_finished()
        finished = set(self.manager.all_steps())
        for step in self._unsealed:
            if step in finished and self._primary and self.step_dir(step).is_dir():
                digests = _file_digests(self.step_dir(step))
                write_text_atomic(self.step_dir(step) / CHECKSUMS, json.dumps(digests, indent=1, sort_keys=True))
        self._unsealed = []

    def verify(self, step: int) -> None:
        """Raises CorruptCheckpoint when a file differs from ``checksums.json`` (none: nothing to check)."""
        step_dir = self.step_dir(step)
        listing = step_dir / CHECKSUMS
        if not listing.exists():
            return
        try:
            expected = json.loads(listing.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"{listing} is unreadable ({_describe(e)})") from None
        actual = _file_digests(step_dir)
        for name, want in sorted(expected.items()):
            got = actual.get(name)
            if got is None:
                raise CorruptCheckpoint(f"{step_dir / name} is missing")
            if got["size"] != want["size"]:
                raise CorruptCheckpoint(f"{step_dir / name} has {got['size']} bytes, {want['size']} were written")
            if got["sha256"] != want["sha256"]:
                raise CorruptCheckpoint(f"{step_dir / name} does not match its checksum")

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_shapes(self, step: int, model, opt_state=None) -> None:
        """Raises CheckpointMismatch when saved array names or shapes differ from ``model`` / ``opt_state``."""
        flat = lambda tree: {  # noqa: E731
            jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "shape")
        }
        targets = {"params": ("parameter", eqx.filter(model, eqx.is_inexact_array))}
        if opt_state is not None:
            targets["opt_state"] = ("optimizer state entry", eqx.filter(opt_state, eqx.is_array))
        for item, (what, target) in targets.items():
            have = flat(ocp.StandardCheckpointHandler().metadata(self.step_dir(step) / item).tree)
            want = flat(target)
            for name in sorted(have.keys() | want.keys()):
                if have.get(name) != want.get(name):
                    saved = f"{what} {name} with shape {have[name]}" if name in have else f"no {what} {name}"
                    built = f"builds it with shape {want[name]}" if name in want else "has no such entry"
                    raise CheckpointMismatch(
                        f"checkpoint {self.step_dir(step)} has {saved}, but this configuration {built}; {self._fix}"
                    )

    @property
    def _fix(self) -> str:
        return (
            f"resume with the flags and data the run was started with (see {self.directory.parent / 'config.json'}), "
            "or choose a new --output-dir"
        )

    def restore(self, step: int, model, opt_state=None, data_iterator=None):
        """Restores into the structure (and shardings) of ``model`` / ``opt_state`` / the iterator."""
        params, static = eqx.partition(model, eqx.is_inexact_array)
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        args = dict(params=ocp.args.StandardRestore(abstract(params)), meta=ocp.args.JsonRestore())
        if opt_state is not None:
            opt_arrays, opt_static = eqx.partition(opt_state, eqx.is_array)
            args["opt_state"] = ocp.args.StandardRestore(abstract(opt_arrays))
        if data_iterator is not None:
            shared = self._shared_iterator_state(step)
            if shared is None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:  # saved by another number of processes, all at the same position: resume there
                data_iterator.set_state(shared)
                getattr(data_iterator, "start_prefetch", lambda: None)()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        model = eqx.combine(restored.params, static)
        if opt_state is not None:
            opt_state = eqx.combine(restored.opt_state, opt_static)
        return model, opt_state, restored.meta

    def _shared_iterator_state(self, step: int) -> dict | None:
        """The Grain iterator state if another process count saved it, the same on every process.

        Grain names its files by process (``process_<i>-of-<n>.json``); the training iterator's state
        is the step, so a run may resume with another number of processes.
        """
        data = self.step_dir(step) / "data"
        if (data / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
            return None
        states = [json.loads(path.read_text()) for path in sorted(data.glob("process_*-of-*.json"))]
        if not states or any(state != states[0] for state in states):
            return None  # Grain's own restore reports the missing file
        return states[0]

    def restore_latest(self, model, opt_state=None, data_iterator=None, expect: dict | None = None):
        """Restores the newest intact checkpoint: ``(step, model, opt_state, meta)``, or None if there is none.

        A checkpoint that fails its checksums or cannot be read is named in a warning, moved to
        ``checkpoints/corrupt-<step>`` and the one before it is tried.

        Raises:
            CheckpointMismatch: an intact checkpoint disagrees with ``expect`` (``meta`` keys such
                as the model kind and vocabulary size) or with the parameter shapes of ``model``.
                Nothing is moved: the checkpoint is fine, the flags are not.
        """
        self._remove_unfinished()
        for step in reversed(self.steps()):
            try:
                self.verify(step)
                meta = self.read_meta(step)
                damage = None
            except Exception as e:  # noqa: BLE001 - any failure to read back means damage
                damage = e
            if distributed.any_process(damage is not None):  # every process must skip the same checkpoints
                self._set_aside(step, damage or CorruptCheckpoint("found damaged by another process"))
                continue
            for key, want in (expect or {}).items():
                if key in meta and meta[key] != want:
                    raise CheckpointMismatch(
                        f"checkpoint {self.step_dir(step)} was written with {key}={meta[key]!r}, but this run has "
                        f"{key}={want!r}; {self._fix}"
                    )
            try:
                self.check_shapes(step, model, opt_state)
                restored = self.restore(step, model, opt_state, data_iterator)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e)
                continue
            return (step, *restored)
        return None

    def _remove_unfinished(self) -> None:
        """Deletes the temporary directories of saves that a killed run did not finish.

        Only the training job that is about to write here calls this (through ``restore_latest``):
        a reader of a live run must not touch a save in progress.
        """
        if not self._primary or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if ocp.utils.TMP_DIR_SUFFIX in path.name:
                logger.info("removing %s, a checkpoint whose save was cut short", path)
                shutil.rmtree(path, ignore_errors=True)

    def _set_aside(self, step: int, error: BaseException) -> None:
        source = self.step_dir(step)
        target = self.directory / f"corrupt-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}.{n}"
        if self._primary:
            os.replace(source, target)
        distributed.barrier(f"set aside {target.name}")  # moved before any process looks again
        self.manager.reload()
        logger.warning(
            "checkpoint %s is damaged (%s); moved it to %s and falling back to the previous checkpoint",
            source, _describe(error), target,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()
