"""A run directory's records: ``config.json`` and the checks that tie it to ``vocab.json``.

Training, the baselines and :func:`studyrec.load_run` write and read these files through this one
module. ``config.json`` holds ``{"config": flags, "model": name, "model_names": 2, "model_config": sizes,
"time_origin": seconds, "vocab_size": tokens, "vocab_fingerprint": sha256, ..., "resumes": [...]}``
(a baseline's ``model`` is ``"baseline:<name>"`` and it has no ``model_config``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import typing
from pathlib import Path

from studyrec.config import DataConfig, TrainConfig
from studyrec.data.atomic import write_text_atomic
from studyrec.data.vocab import Vocabulary

logger = logging.getLogger("studyrec.rundir")

CONFIG = "config.json"
VOCAB = "vocab.json"


def vocab_file(run_dir: Path) -> Path:
    return run_dir / VOCAB


def save_vocab(run_dir: Path, vocab: Vocabulary) -> None:
    """Writes ``vocab.json`` (the reference's layout), atomically."""
    vocab.save(vocab_file(run_dir))


def load_vocab(run_dir: Path) -> Vocabulary:
    """The run's ``vocab.json``; a missing one is a clear error (titles cannot be read or written without it)."""
    file = vocab_file(run_dir)
    if not file.exists():
        raise FileNotFoundError(f"{run_dir}: no vocab.json; the run's vocabulary is needed to read and write titles")
    return Vocabulary.load(file)


MODEL_NAMES = 2
"""The version of the model names that ``config.json`` and checkpoints record (``model_names``).

Version 1 (no ``model_names`` key) called the reference's lagged STUDY ``study`` and the paper's
``study-lagfree``; version 2 calls them ``study-reference`` and ``study``."""
_RENAMED = {1: {"study": "study-reference", "study-lagfree": "study"}}


def model_name(name, version=None):
    """The current name of a model recorded as ``name`` under names ``version`` (None: version 1)."""
    return _RENAMED.get(version or 1, {}).get(name, name)


def upgrade_meta(meta: dict) -> dict:
    """Checkpoint metadata with its model named as today."""
    if "model" not in meta:
        return meta
    return {**meta, "model": model_name(meta["model"], meta.get("model_names")), "model_names": MODEL_NAMES}


def checkpoint_meta(model: str, vocab: Vocabulary) -> dict:
    """What every checkpoint records, and a resume expects, about its model and vocabulary."""
    return {"model": model, "model_names": MODEL_NAMES, "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint}


def read_config(path: Path) -> dict:
    """The record of a run directory's ``config.json``; a missing or unreadable file is a clear error."""
    file = path / CONFIG
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json; is this a run directory written by experiments.train?")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return record


def write_config(run_dir: Path, record: dict, resumed_at: int | None = None) -> None:
    """Writes ``config.json`` atomically, keeping the ``resumes`` of an existing one (plus ``resumed_at``)."""
    path = run_dir / CONFIG
    history = _resume_history(path)
    if resumed_at is not None:
        history.append({"step": resumed_at, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_text_atomic(path, json.dumps({**record, "resumes": history}, indent=2))


def _resume_history(path: Path) -> list:
    """The ``resumes`` list of an existing config.json; an unreadable one is rewritten (the flags make it anew)."""
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text()).get("resumes", [])
        return history if isinstance(history, list) else []
    except (ValueError, AttributeError) as e:
        logger.warning("%s is unreadable (%s); writing it anew, without its record of earlier resumes", path, e)
        return []


def from_dict(cls: type, data: dict, where: str):
    """A (nested) frozen dataclass from JSON: lists become tuples, unknown keys are logged and ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        logger.warning(
            "%s: ignoring unknown %s keys %s (written by another studyrec version?)", where, cls.__name__, unknown
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items() if name in known}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild {cls.__name__}: {e}") from None


def train_config(record: dict, where: str) -> TrainConfig:
    """The ``TrainConfig`` of a ``config.json`` record; runs saved before ``DataConfig`` had its fields at the top."""
    flags = record.get("config", {})
    if isinstance(flags, dict) and "data" not in flags:
        data_fields = {f.name for f in dataclasses.fields(DataConfig)}
        flags = {k: v for k, v in flags.items() if k not in data_fields} | {
            "data": {k: v for k, v in flags.items() if k in data_fields}
        }
    if isinstance(flags, dict) and "model_names" not in record:  # first names: a chunk of None was the whole row
        if "model" in flags:
            flags = {**flags, "model": model_name(flags["model"])}
        if flags.get("student_chunk_size") is None and "seq_len" in flags:
            flags = {**flags, "student_chunk_size": flags["seq_len"]}
        if "epochs" in flags and flags["epochs"] is None:  # --steps set the run
            flags = {k: v for k, v in flags.items() if k != "epochs"}
    return from_dict(TrainConfig, flags, f"{where}: config")


def _convert(hint, value, where: str):
    if isinstance(value, dict):
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate):
                return from_dict(candidate, value, where)
        return value
    if isinstance(value, list):
        return tuple(_convert(typing.Any, v, where) for v in value)
    return value


def check_fingerprint(vocab: Vocabulary, vocab_file: Path, saved: str | None, source: str) -> None:
    """Refuses a vocab.json whose titles differ from those the run trained with (recorded in ``source``)."""
    if saved is not None and saved != vocab.fingerprint:
        raise ValueError(
            f"{vocab_file} does not hold the titles that {source} was trained with (its vocabulary fingerprint "
            f"{vocab.fingerprint[:12]} differs from the recorded {str(saved)[:12]}); the files come from different "
            "runs or vocab.json was edited: restore the vocab.json that training wrote"
        )


@functools.cache
def warn_unverified(vocab_file: Path) -> None:
    logger.warning(
        "%s cannot be verified: the run was saved before studyrec recorded vocabulary fingerprints", vocab_file
    )
