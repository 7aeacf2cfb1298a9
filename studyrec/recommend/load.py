"""Loading a saved run for inference: :func:`load_run`.

:func:`load_run` rebuilds the model named in ``config.json`` from its ``model_config``, restores the
parameters of a checkpoint into it with Orbax (no pickle: nothing from the run directory is ever
executed) and returns a :class:`~studyrec.recommend.run.Run`. A missing file or checkpoint is an
error: there is no fallback to random weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from studyrec.checkpoint import (
    CheckpointMismatch,
    Checkpoints,
    CorruptCheckpoint,
    UncommittedCheckpoint,
    all_finite,
    describe,
)
from studyrec.models import MODELS, ModelConfig, build
from studyrec.recommend.run import Run
from studyrec import rundir
from studyrec.rundir import check_fingerprint, from_dict, read_config, train_config, warn_unverified

logger = logging.getLogger("studyrec.recommend")


def load_run(path: str | os.PathLike, step: int | None = None) -> Run:
    """Loads a trained run directory for inference.

    Arguments:
        path: a run directory written by ``experiments.train`` (``config.json``, ``vocab.json``,
            ``checkpoints/``).
        step: the checkpoint to restore (default: the latest).

    Returns:
        A :class:`Run` whose ``model`` is in inference mode (no dropout).

    Raises:
        FileNotFoundError: the directory, ``config.json``, ``vocab.json`` or any checkpoint is missing.
        ValueError: the files do not fit together (unknown model, vocabulary size or titles, checkpoint
            shapes), or no checkpoint is usable (each step and its problem are named).

    A checkpoint that is not committed (no ``checksums.json``: a save cut short, or one in
    progress), fails its checksums, cannot be read or holds non-finite numbers is skipped with a
    warning and the one before it is used. Nothing in the run directory is moved or deleted.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run directory not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: is a file, expected a run directory")
    record = read_config(path)
    where = str(path / "config.json")
    name = rundir.model_name(record.get("model"), record.get("model_names"))
    if isinstance(name, str) and name.startswith("baseline:"):
        raise ValueError(f"{path} is a {name} run: it has scores but no model to load")
    if name not in MODELS:
        raise ValueError(
            f"{where}: unknown model {name!r}; this studyrec knows {', '.join(MODELS)} (a custom model must be "
            "registered with studyrec.models.register before its runs are loaded)"
        )
    if "model_config" not in record:
        raise ValueError(f"{where}: no 'model_config'")
    saved = record["model_config"]
    if isinstance(saved, dict):  # runs saved before copy_bias_gain existed learned the copy head's biases unscaled
        saved = {"copy_bias_gain": 1.0, **saved}
    model_config = from_dict(ModelConfig, saved, f"{where}: model_config")
    config = train_config(record, where)
    if "time_origin" not in record:
        raise ValueError(f"{where}: no 'time_origin' (the moment the model's timestamps count from)")
    time_origin = int(record["time_origin"])

    vocab_file = rundir.vocab_file(path)
    vocab = rundir.load_vocab(path)
    if vocab.logits_size != model_config.vocab_size:
        raise ValueError(
            f"{vocab_file} has {vocab.num_titles} titles (an output layer of {vocab.logits_size}) but "
            f"{where} says model_config.vocab_size={model_config.vocab_size}; the files come from different runs"
        )
    check_fingerprint(vocab, vocab_file, record.get("vocab_fingerprint"), where)

    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path}: no checkpoints/ directory; refusing to use random weights")
    checkpoints = Checkpoints(path, async_save=False)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint; refusing to use random weights")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{path}/checkpoints has no step {step}; available: {steps}")
        step, model, meta = _restore_usable(checkpoints, steps if step is None else [step], name, model_config)
    finally:
        checkpoints.close()
    meta = rundir.upgrade_meta(meta)
    if meta.get("model") not in (None, name):
        raise ValueError(f"{where} says model {name!r} but checkpoint {step} was saved by a {meta['model']!r} run")
    check_fingerprint(vocab, vocab_file, meta.get("vocab_fingerprint"), str(checkpoints.step_dir(step)))
    if record.get("vocab_fingerprint") is None and meta.get("vocab_fingerprint") is None:
        warn_unverified(vocab_file)
    return Run(
        path=path,
        model=eqx.nn.inference_mode(model),
        vocab=vocab,
        config=config,
        model_config=model_config,
        model_name=name,
        time_origin=time_origin,
        step=int(step),
    )


def _blank_model(name: str, config: ModelConfig):
    """A zero-filled model of the right structure: a restore target, quicker than a random init."""
    abstract = eqx.filter_eval_shape(build, name, config, key=jax.random.key(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s, abstract)


def _restore_usable(checkpoints: Checkpoints, steps: list[int], name: str, config: ModelConfig):
    """``(step, model, meta)`` of the newest of ``steps`` that is committed, intact and finite.

    The others are named in warnings (never moved: the run may be live); when none is usable, one
    ValueError names each step and its problem.
    """
    problems = []
    target = _blank_model(name, config)
    for step in reversed(steps):
        try:
            model, meta = _restore_checked(checkpoints, step, target)
            return step, model, meta
        except CheckpointMismatch as e:
            raise ValueError(
                f"{checkpoints.directory.parent}: checkpoint {step} does not fit the {name!r} model that config.json "
                f"describes: {e}"
            ) from None
        except UncommittedCheckpoint:
            problem = "is not committed (no checksums.json: a save cut short, or one in progress)"
        except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types; any means unusable
            problem = f"is damaged ({describe(e, limit=160)})"
        logger.warning("checkpoint %s %s; trying the one before", checkpoints.step_dir(step), problem)
        problems.append(f"step {step} {problem}")
    raise ValueError(
        f"{checkpoints.directory}: no intact checkpoint among steps {steps} ({'; '.join(problems)}); "
        "refusing to use random weights"
    )


def _restore_checked(checkpoints: Checkpoints, step: int, target):
    """Verifies, restores and checks one checkpoint: ``(model, meta)``."""
    checkpoints.verify(step)
    checkpoints.check_shapes(step, target)
    model, _, meta = checkpoints.restore(step, target)
    if not all_finite(model):
        raise CorruptCheckpoint("its parameters hold non-finite (NaN or infinite) numbers")
    return model, meta
