"""From file paths to encoded train/valid interactions sharing one vocabulary and time origin."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from studyrec.data.classrooms import Grouping
from studyrec.data.generate import sample_data_paths
from studyrec.data.interactions import Interactions
from studyrec.data.io import check_schools, check_students, load_activity, load_school_info, load_student_info
from studyrec.data.vocab import Vocabulary

logger = logging.getLogger("studyrec.data")


@dataclasses.dataclass(frozen=True)
class DataPaths:
    train: tuple[str, ...]
    valid: tuple[str, ...]
    student_info: str | None
    school_info: str | None

    @classmethod
    def resolve(cls, train, valid, student_info, school_info) -> DataPaths:
        """Fills unset paths from the bundled sample when no training file is given."""
        if train:
            return cls(tuple(map(str, train)), tuple(map(str, valid)), student_info, school_info)
        sample = sample_data_paths()
        return cls(
            (str(sample["train"]),),
            tuple(map(str, valid)) or (str(sample["valid"]),),
            student_info or str(sample["student_info"]),
            school_info or str(sample["school_info"]),
        )


@dataclasses.dataclass(frozen=True)
class Frames:
    """Validated tables, as loaded."""

    train: pd.DataFrame
    valid: pd.DataFrame | None
    student_info: pd.DataFrame | None
    school_info: pd.DataFrame | None

    @classmethod
    def load(cls, paths: DataPaths) -> Frames:
        train = load_activity(*paths.train)
        valid = load_activity(*paths.valid) if paths.valid else None
        info = load_student_info(paths.student_info) if paths.student_info else None
        schools = load_school_info(paths.school_info) if paths.school_info else None
        if info is not None:
            check_students(train, info, activity_path=paths.train[0], info_path=paths.student_info)
            if valid is not None:
                check_students(valid, info, activity_path=paths.valid[0], info_path=paths.student_info)
            if schools is not None:
                check_schools(info, schools, info_path=paths.student_info, school_path=paths.school_info)
        else:
            logger.warning("no student_info given: every student is a classroom of their own")
        return cls(train, valid, info, schools)


def time_origin(train: pd.DataFrame) -> int:
    """The model sees timestamps relative to this (midnight UTC of the first training day)."""
    first = int(train["timestamp"].min())
    return first - first % 86400


def encode(
    frame: pd.DataFrame,
    vocab: Vocabulary,
    frames: Frames,
    grouping: Grouping,
    scored: np.ndarray | None = None,
) -> Interactions:
    return Interactions.from_frame(frame, vocab, frames.student_info, frames.school_info, grouping, scored=scored)


def with_history(frames: Frames) -> tuple[pd.DataFrame, np.ndarray]:
    """Training and validation rows together, with a mask of the validation rows to score."""
    if frames.valid is None:
        raise ValueError("no validation data to score")
    joined = pd.concat([frames.train, frames.valid], ignore_index=True)
    scored = np.arange(len(joined)) >= len(frames.train)
    return joined, scored


def build_vocab(frames: Frames, max_size: int | None) -> Vocabulary:
    return Vocabulary.build(frames.train["SHLF_NUM"], max_size=max_size or None)


def describe(name: str, data: Interactions) -> str:
    rooms = len(np.unique(data.classroom))
    return f"{name}: {data.num_interactions:,} interactions, {data.num_students:,} students, {rooms:,} classrooms"


__all__ = ["DataPaths", "Frames", "build_vocab", "describe", "encode", "time_origin", "with_history"]
