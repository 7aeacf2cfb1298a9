"""Orbax checkpoints of parameters, optimizer state, step and the Grain iterator position.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a kill
mid-save leaves no half checkpoint under its step's name. On top of that a checkpoint counts as
*committed* only once its ``checksums.json`` (size and SHA-256 of each file) exists: this class
writes it atomically as soon as the asynchronous save has finished (:meth:`Checkpoints.poll`, called
after every training step). :meth:`Checkpoints.restore_latest` sets a step without one aside to
``checkpoints/uncommitted-<step>``, and one that fails its checksums, cannot be read or holds
non-finite numbers to ``checkpoints/corrupt-<step>``, then uses the previous one. Nothing is
pickled: arrays go to TensorStore, the rest to JSON.
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
import jax.numpy as jnp
import orbax.checkpoint as ocp

from studyrec.data.atomic import write_text_atomic
from studyrec import sharding

logger = logging.getLogger("studyrec.train")

CHECKSUMS = "checksums.json"


class CheckpointMismatch(ValueError):
    """A readable checkpoint written by a run with other settings (model kind, vocabulary, sizes)."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


class UncommittedCheckpoint(CorruptCheckpoint):
    """A step directory without ``checksums.json``: its save was cut short (or is still being sealed)."""


def _file_digests(step_dir: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` for every file of the checkpoint but ``checksums.json``."""
    digests = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS and not path.name.startswith(f".{CHECKSUMS}."):
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            name = path.relative_to(step_dir).as_posix()
            digests[name] = {"size": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def describe(error: BaseException, limit: int = 300) -> str:
    """The error's type and message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def all_finite(tree) -> bool:
    """Whether every floating-point array of ``tree`` holds only finite numbers."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)


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

    def poll(self) -> None:
        """Seals (commits) the saves that have finished; returns at once while one is still being written.

        The training loop calls it after every step, so a kill loses at most ``--save-every`` steps.
        """
        if self._unsealed and not self.manager.is_saving_in_progress():
            self._seal()

    def _seal(self) -> None:
        """Writes ``checksums.json`` into the checkpoints this object saved that have finished.

        Waits for a save in flight. Only process 0 writes; the file is written atomically, so a step
        either has its complete list of checksums or is not committed.
        """
        if not self._unsealed:
            return
        self.manager.wait_until_finished()
        finished = set(self.manager.all_steps())
        for step in self._unsealed:
            if step in finished and self._primary and self.step_dir(step).is_dir():
                digests = _file_digests(self.step_dir(step))
                write_text_atomic(self.step_dir(step) / CHECKSUMS, json.dumps(digests, indent=1, sort_keys=True))
        self._unsealed = []

    def is_committed(self, step: int) -> bool:
        return (self.step_dir(step) / CHECKSUMS).is_file()

    def verify(self, step: int) -> None:
        """Raises CorruptCheckpoint when a file differs from ``checksums.json``.

        Raises:
            UncommittedCheckpoint: the step has no ``checksums.json`` (its save never finished).
            CorruptCheckpoint: a listed file is missing, has another size or another SHA-256.
        """
        step_dir = self.step_dir(step)
        listing = step_dir / CHECKSUMS
        if not listing.is_file():
            raise UncommittedCheckpoint(
                f"{step_dir} has no {CHECKSUMS}: it was never committed (its save was cut short or is in progress)"
            )
        try:
            expected = json.loads(listing.read_text())
            if not isinstance(expected, dict) or not all(
                isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in expected.values()
            ):
                raise ValueError("not a {file: {size, sha256}} object")
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"{listing} is unreadable ({describe(e)})") from None
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

    def restore_latest(self, model, opt_state=None, data_iterator=None, expect: dict | None = None, upgrade=None):
        """Restores the newest intact checkpoint: ``(step, model, opt_state, meta)``, or None if there is none.

        A step without ``checksums.json`` was never committed: it is moved to
        ``checkpoints/uncommitted-<step>``. A checkpoint that fails its checksums, cannot be read or
        holds non-finite numbers is moved to ``checkpoints/corrupt-<step>``. Either is named in a
        warning and the one before it is tried.

        Raises:
            CheckpointMismatch: an intact checkpoint disagrees with ``expect`` (``meta`` keys such
                as the model kind and vocabulary size, after ``upgrade(meta)`` when given) or with the
                parameter shapes of ``model``. Nothing is moved: the checkpoint is fine, the flags are not.
        """
        self._seal()  # this object's own finished saves are committed first
        self._remove_unfinished()
        for step in reversed(self.steps()):
            if sharding.any_process(not self.is_committed(step)):  # every process skips the same ones
                self._set_aside(step, "was never committed (it has no checksums.json: the run stopped before "
                                "its save was sealed)", "uncommitted")
                continue
            try:
                self.verify(step)
                meta = self.read_meta(step)
                meta = meta if upgrade is None else upgrade(meta)
                damage = None
            except Exception as e:  # noqa: BLE001 - any failure to read back means damage
                damage = e
            if sharding.any_process(damage is not None):
                self._set_aside(step, self._damaged(damage))
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
                if not (all_finite(restored[0]) and all_finite(restored[1])):
                    raise CorruptCheckpoint(f"{self.step_dir(step)} holds non-finite (NaN or infinite) numbers")
                damage = None
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001
                damage = e
            if sharding.any_process(damage is not None):
                self._set_aside(step, self._damaged(damage))
                continue
            return (step, *restored)
        return None

    @staticmethod
    def _damaged(error: BaseException | None) -> str:
        return f"is damaged ({describe(error or CorruptCheckpoint('found damaged by another process'))})"

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

    def _set_aside(self, step: int, reason: str, prefix: str = "corrupt") -> None:
        """Moves the step to ``<prefix>-<step>`` (process 0), so that no later restore tries it again."""
        source = self.step_dir(step)
        target = self.directory / f"{prefix}-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{prefix}-{step}.{n}"
        if self._primary:
            os.replace(source, target)
        sharding.barrier(f"set aside {target.name}")  # moved before any process looks again
        self.manager.reload()
        logger.warning(
            "checkpoint %s %s; moved it to %s and falling back to the previous checkpoint", source, reason, target
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()
