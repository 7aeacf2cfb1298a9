"""Encoded interactions in flat arrays, students contiguous, and their per-student chunks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from studyrec.data.classrooms import Grouping, assign_classrooms
from studyrec.data.io import student_time_order
from studyrec.data.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Every interaction, sorted by (student, time); per-student arrays indexed by student slot.

    ``offsets[s]:offsets[s+1]`` are student slot ``s``'s interactions, earliest first.
    ``scored`` marks the interactions an evaluation scores (all of them unless context was added).
    """

    titles: np.ndarray  # int32 [N] vocabulary ids
    title_codes: np.ndarray  # int64 [N] one code per distinct raw title (tells OOV titles apart)
    timestamps: np.ndarray  # int64 [N] seconds since 1970 UTC
    scored: np.ndarray  # bool [N]
    offsets: np.ndarray  # int64 [S+1]
    students: np.ndarray  # int64 [S] StudentIDs, ascending
    classroom: np.ndarray  # int64 [S] dense classroom index
    grade: np.ndarray  # int32 [S], 0 = unknown

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def num_interactions(self) -> int:
        return len(self.titles)

    @property
    def student_of(self) -> np.ndarray:
        """Student slot of each interaction, int64 [N]."""
        return np.repeat(np.arange(self.num_students), np.diff(self.offsets))

    @property
    def student_ids(self) -> np.ndarray:
        """StudentID of each interaction, int64 [N]."""
        return np.repeat(self.students, np.diff(self.offsets))

    @classmethod
    def from_frame(
        cls,
        activity: pd.DataFrame,
        vocab: Vocabulary,
        student_info: pd.DataFrame | None = None,
        school_info: pd.DataFrame | None = None,
        grouping: Grouping = "school_grade",
        scored: np.ndarray | None = None,
    ) -> Interactions:
        """Encodes a loaded activity frame (``StudentID, SHLF_NUM, timestamp``).

        The frame is stably re-sorted by (StudentID, timestamp), so same-time rows keep their order.
        """
        order = student_time_order(activity["StudentID"].to_numpy(np.int64), activity["timestamp"].to_numpy(np.int64))
        order = slice(None) if order is None else order
        sids = activity["StudentID"].to_numpy(dtype=np.int64)[order]
        first = np.flatnonzero(np.diff(sids, prepend=sids[:1] - 1))  # sorted: a new student where the id changes
        students = sids[first]
        offsets = np.append(first, len(sids)).astype(np.int64)
        classroom, grade = assign_classrooms(students, student_info, school_info, grouping)
        return cls(
            titles=vocab.encode_many(activity["SHLF_NUM"])[order],
            title_codes=pd.factorize(activity["SHLF_NUM"])[0][order].astype(np.int64),
            timestamps=activity["timestamp"].to_numpy(dtype=np.int64)[order],
            scored=np.ones(len(sids), bool) if scored is None else np.asarray(scored, bool)[order],
            offsets=offsets,
            students=students,
            classroom=classroom,
            grade=grade,
        )


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Consecutive, non-overlapping runs of at most ``size`` interactions of one student."""

    start: np.ndarray  # int64 [C] first interaction
    length: np.ndarray  # int64 [C]
    owner: np.ndarray  # int64 [C] student slot
    rank: np.ndarray  # int64 [C] chunk number within the student, earliest first
    first_chunk: np.ndarray  # int64 [S] owner's first chunk
    num_chunks: np.ndarray  # int64 [S]
    size: int

    def __len__(self) -> int:
        return len(self.start)


def make_chunks(data: Interactions, size: int, align: str = "start") -> Chunks:
    """Cuts each student's history into chunks of ``size``.

    ``align="start"`` (the reference) lets the last chunk be short; ``align="end"`` lets the
    first one be short, so the latest interactions keep the longest history.
    """
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    lengths = np.diff(data.offsets)
    num_chunks = -(-lengths // size)
    owner = np.repeat(np.arange(data.num_students), num_chunks)
    first_chunk = np.concatenate([[0], np.cumsum(num_chunks)[:-1]]).astype(np.int64)
    rank = np.arange(len(owner)) - first_chunk[owner]
    n = lengths[owner]
    if align == "start":
        rel_start = rank * size
        rel_end = np.minimum(rel_start + size, n)
    elif align == "end":
        head = n - (num_chunks[owner] - 1) * size  # the first chunk takes the remainder
        rel_start = np.where(rank == 0, 0, head + (rank - 1) * size)
        rel_end = np.where(rank == 0, head, rel_start + size)
    else:
        raise ValueError(f"align must be 'start' or 'end', got {align!r}")
    return Chunks(
        start=data.offsets[owner] + rel_start,
        length=rel_end - rel_start,
        owner=owner,
        rank=rank,
        first_chunk=first_chunk,
        num_chunks=num_chunks,
        size=size,
    )
