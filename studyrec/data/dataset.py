"""From file paths to encoded train/valid interactions sharing one vocabulary and time origin."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from studyrec.data.classrooms import Grouping
from studyrec.data.generate import sample_data_paths
from studyrec.data.interactions import Interactions
from studyrec.data.io import (
    DataError,
    check_schools,
    check_students,
    dates_outside,
    load_activity,
    load_school_info,
    load_student_info,
    moment_text,
    time_window,
)
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
        check_representable(train, valid)
        return cls(train, valid, info, schools)


def time_origin(train: pd.DataFrame) -> int:
    """The model sees timestamps relative to this (midnight UTC of the first training day)."""
    first = int(train["timestamp"].min())
    return first - first % 86400


_FIX = "drop or correct the row, or split the data into runs that each span less than 68 years"


def check_representable(train: pd.DataFrame, valid: pd.DataFrame | None) -> None:
    """Raises DataError at the first row (in file order) whose date the model cannot represent.

    The model sees int32 seconds from the time origin, the first training day: every training and
    validation date must lie within about 68 years of it. When the training dates alone span more,
    the rows outside the 68 years that hold the most training rows are the ones named.
    """
    stamps = train["timestamp"].to_numpy(np.int64)
    origin = time_origin(train)
    lo, hi = time_window(origin)
    if stamps.max() > hi:
        raise _training_outlier(train, stamps, origin)
    if valid is not None:
        error = dates_outside(valid, lo, hi, lambda date, count: _outside_run(date, count, origin))
        if error is not None:
            raise error


def check_recommend_times(activity: pd.DataFrame, origin: int, as_of: int, as_of_given: object = None) -> None:
    """Raises when an activity row before ``as_of``, or ``as_of`` itself, lies outside the run's window.

    ``as_of_given`` is the moment as the caller wrote it (None when it defaults to after the last row).
    """
    lo, hi = time_window(origin)
    error = dates_outside(activity, lo, hi, lambda date, count: _outside_run(date, count, origin), before=as_of)
    if error is not None:
        raise error
    if not lo <= as_of <= hi:
        written = moment_text(as_of) if as_of_given is None else str(as_of_given)
        raise ValueError(f"as_of {written!r} is {_window_text(origin)}; choose a moment within it")


def _rows(count: int) -> str:
    return "1 row lies" if count == 1 else f"{count} rows lie"


def _window_text(origin: int) -> str:
    lo, hi = time_window(origin)
    return (
        f"outside the dates the model can represent, {moment_text(lo)} to {moment_text(hi)} (int32 seconds either "
        f"side of the run's time origin {moment_text(origin)}, its first training day)"
    )


def _outside_run(date: str, count: int, origin: int) -> str:
    more = f"; {_rows(count - 1)} more outside it" if count > 1 else ""
    return f"date {date!r} is {_window_text(origin)}{more}; {_FIX}"


def _training_outlier(train: pd.DataFrame, stamps: np.ndarray, origin: int) -> DataError | ValueError:
    """The error for training dates spanning more than int32 seconds: names the first row outside
    the window that holds the most rows (the likely mistakes)."""
    ordered = np.sort(stamps)
    starts = ordered - ordered % 86400
    span = time_window(0)[1]
    held = np.searchsorted(ordered, starts + span, side="right") - np.arange(len(ordered))
    best = int(np.argmax(held))
    lo, hi = int(starts[best]), int(starts[best]) + span

    def describe(date: str, count: int) -> str:
        return (
            f"date {date!r} lies too far from the other training dates: the model counts time in int32 seconds "
            f"from the first training day (the time origin, here {moment_text(origin)}), so training dates must "
            f"fit in 68 years; {int(held[best])} of {len(stamps)} rows fit the window {moment_text(lo)} to "
            f"{moment_text(hi)} (the origin without the others), {_rows(count)} outside it; {_FIX}"
        )

    error = dates_outside(train, lo, hi, describe)
    return error if error is not None else ValueError(f"training dates span more than 68 years; {_FIX}")


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


__all__ = [
    "DataPaths",
    "Frames",
    "build_vocab",
    "check_recommend_times",
    "check_representable",
    "describe",
    "encode",
    "time_origin",
    "with_history",
]
