"""Query rows: one packed row per student to recommend for, as of a moment.

Each student gets one row: their latest ``chunk_size - 1`` interactions followed by a *query slot*
at ``as_of`` whose logits score the next title (the slot's own title is a placeholder that the
model never reads, since position p never sees the title at p). For a model that reads classmates,
the rest of the row holds the classroom's most recently active classmates. Where keys carry the
previous title of their student (``DecoderModel.keys_carry_previous_title``, the one-step lag of
``StudyReference``), each classmate's segment ends with a *carrier* slot at their last timestamp: it carries
their latest title, and is strictly earlier than ``as_of``, so every classmate interaction in the row
reaches the query.

This is the third layout of :mod:`studyrec.data.packing`: :func:`query_placements` says where each
run goes, as :class:`~studyrec.data.packing.Placements` whose query and carrier slots are trailing
tokens, and :func:`studyrec.data.packing.compose` builds the rows, as it does for training and
evaluation.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd

from studyrec.data.memory import ClassroomMemory
from studyrec.data.packing import Placements, Sample, compose


@dataclasses.dataclass(frozen=True)
class QueryHistory:
    """Encoded activity before ``as_of``, students contiguous and earliest first."""

    titles: np.ndarray  # int32 [N]
    timestamps: np.ndarray  # int64 [N]
    students: np.ndarray  # int64 [S] ascending: everyone with activity or queried
    start: np.ndarray  # int64 [S]
    count: np.ndarray  # int64 [S]
    classroom: np.ndarray  # int64 [S]
    grade: np.ndarray  # int32 [S]
    time_origin: int  # seconds since 1970 that the rows' timestamps count from

    @functools.cached_property
    def relative_times(self) -> np.ndarray:
        """int32 [N]: timestamps as rows hold them, seconds from ``time_origin``."""
        return (self.timestamps - self.time_origin).astype(np.int32)

    @functools.cached_property
    def last_time(self) -> np.ndarray:
        """int64 [S]: each student's latest timestamp (int64 min without activity)."""
        padded = np.append(self.timestamps, np.iinfo(np.int64).min)
        return padded[np.where(self.count > 0, self.start + self.count - 1, -1)]

    @functools.cached_property
    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """Titles and timestamps with one trailing 0, so that index -1 reads "nothing"."""
        return np.append(self.titles, 0).astype(np.int32), np.append(self.timestamps, 0)

    @functools.cached_property
    def reads(self) -> pd.DataFrame:
        """Reads per (student index, title id): ``count`` and ``last`` timestamp."""
        frame = pd.DataFrame(
            {
                "student": np.repeat(np.arange(len(self.students)), self.count),
                "title": self.titles,
                "time": self.timestamps,
            }
        )
        return frame.groupby(["student", "title"])["time"].agg(count="size", last="max")

    def memory(self, **options) -> ClassroomMemory:
        """The classroom memory over this history (``ClassroomMemory``'s ``size``, ``days`` and ``max_reads``)."""
        student = np.repeat(np.arange(len(self.students)), self.count)
        read = np.repeat(self.start, self.count) + np.arange(len(student)) - np.repeat(np.cumsum(self.count) - self.count, self.count)
        classroom = np.empty(len(self.titles), np.int64)
        classroom[read] = self.classroom[student]
        return ClassroomMemory(classroom, self.relative_times, self.titles, **options)

    def reads_of(self, students: np.ndarray, titles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How often ``students[b]`` read ``titles[b, j]``, and when last (0 if never): two [B, k] arrays."""
        index = pd.MultiIndex.from_arrays([np.repeat(students, titles.shape[1]), titles.ravel()])
        found = self.reads.reindex(index)
        count = found["count"].fillna(0).to_numpy(np.int64).reshape(titles.shape)
        last = found["last"].fillna(0).to_numpy(np.int64).reshape(titles.shape)
        return count, last


@dataclasses.dataclass(frozen=True)
class QueryLayout:
    """Rows of queries: the queried student first, then classmates (``mates[r, j]``, -1 = none)."""

    query: np.ndarray  # int64 [R] student index
    own: np.ndarray  # int64 [R] own interactions in the row
    mates: np.ndarray  # int64 [R, W]
    mate_count: np.ndarray  # int64 [R, W] interactions taken (latest), excluding a carrier
    seq_len: int
    carriers: bool


def layout_queries(
    history: QueryHistory, query: np.ndarray, seq_len: int, chunk: int, classmates: bool, carriers: bool, mate_chunk: int
) -> QueryLayout:
    """Which classmates share each query's row: the most recently active first, while they fit.

    The query slot and the student's latest interactions take ``chunk`` tokens, each classmate's
    latest interactions (and carrier) at most ``mate_chunk``. The first classmate that does not fit
    is cut to its latest interactions when at least one fits.
    """
    own = np.minimum(history.count[query], chunk - 1)
    extra = 1 if carriers else 0
    least = 2 + extra  # a separator, one interaction, the carrier
    width = max((seq_len - 1) // least, 0) if classmates else 0
    R = len(query)
    if width == 0:
        empty = np.zeros((R, 0), np.int64)
        return QueryLayout(query, own, empty, empty, seq_len, carriers)
    active = np.flatnonzero(history.count > 0)
    members = active[np.lexsort((history.students[active], -history.last_time[active], history.classroom[active]))]
    rooms = history.classroom[members]
    first = np.searchsorted(rooms, history.classroom[query], side="left")
    size = np.searchsorted(rooms, history.classroom[query], side="right") - first
    j = np.arange(width + 1)[None, :]
    inside = j < size[:, None]
    cand = np.where(inside, members[np.minimum(first[:, None] + j, len(members) - 1)] if len(members) else 0, -1)
    cand = np.where(cand == query[:, None], -1, cand)
    keep = np.argsort(cand < 0, axis=1, kind="stable")[:, :width]  # drop self, keep order
    cand = np.take_along_axis(cand, keep, 1)
    valid = cand >= 0
    full = np.where(valid, np.minimum(history.count[np.maximum(cand, 0)], mate_chunk - extra), 0)
    need = np.where(valid, 1 + full + extra, 0)
    space = seq_len - (own + 1)
    used = np.cumsum(need, axis=1)
    fits = valid & (used <= space[:, None])
    taken = np.where(fits, full, 0)
    # The first misfit gets what is left, if that holds a separator, one interaction and its carrier.
    n_fit = fits.sum(axis=1)
    rows = np.flatnonzero(n_fit < width)
    col = n_fit[rows]
    left = space[rows] - np.where(col > 0, used[rows, np.maximum(col - 1, 0)], 0)
    cut = valid[rows, col] & (left >= least)
    taken[rows[cut], col[cut]] = left[cut] - 1 - extra
    cand = np.where(taken > 0, cand, -1)
    return QueryLayout(query, own, cand, taken, seq_len, carriers)


@dataclasses.dataclass(frozen=True)
class QueryRows:
    sample: Sample
    query_col: np.ndarray  # int32 [B]
    carried_title: np.ndarray  # int32 [B, L]: the title each key carries (with carriers: the previous one)
    carried_time: np.ndarray  # int64 [B, L]: when that title was read (absolute seconds)


def query_placements(
    history: QueryHistory, layout: QueryLayout, rows: np.ndarray, as_of: int
) -> tuple[Placements, tuple[np.ndarray, np.ndarray]]:
    """Where ``rows`` of the layout go, as rows ``0, 1, ...``: the placements and their trailing tokens.

    Row ``b``: the queried student's latest interactions (slot 1) then its query slot at ``as_of``;
    then, after a separator each, the classmates' latest interactions (slots 2, 3, ...), each with
    a carrier slot at the classmate's last timestamp when ``layout.carriers``.
    """
    n = len(rows)
    own = layout.own[rows]
    mates, taken = layout.mates[rows], layout.mate_count[rows]
    placed = mates >= 0
    b, k = np.nonzero(placed)
    widths = np.where(placed, 1 + taken + (1 if layout.carriers else 0), 0)  # separator, reads, carrier
    col = (own + 1)[:, None] + np.cumsum(widths, axis=1) - widths + 1  # after the query slot and separator
    student = np.concatenate([layout.query[rows], mates[b, k]])
    length = np.concatenate([own, taken[b, k]])
    m = len(student)
    where = Placements(
        row=np.concatenate([np.arange(n), b]),
        col=np.concatenate([np.zeros(n, np.int64), col[b, k]]),
        slot=np.concatenate([np.ones(n, np.int64), (np.cumsum(placed, axis=1) + 1)[b, k]]),
        start=history.start[student] + history.count[student] - length,
        length=length,
        student=student,
        scored=np.ones(m, bool),
        lead=np.zeros(m, np.int64),
    )
    trail = np.arange(m if layout.carriers else n)
    when = np.concatenate([np.full(n, as_of, np.int64), history.last_time[student[n:]]])[trail]
    return where, (trail, (when - history.time_origin).astype(np.int32))


def compose_queries(
    history: QueryHistory,
    layout: QueryLayout,
    rows: np.ndarray,
    batch: int,
    as_of: int,
    sep: int,
    memory: ClassroomMemory | None = None,
) -> QueryRows:
    """Packs ``rows`` of the layout into ``batch`` rows (the rest empty), with the classroom ``memory``
    (``QueryHistory.memory``) at each row's query slot when given.

    The query slot is the only one read out, and the memory is read only at the output, so the
    other tokens' memories are left empty: looking them up took most of the packing's time.
    """
    where, trailing = query_placements(history, layout, rows, as_of)
    sample, source = compose(
        batch, where, history.titles, history.relative_times, history.grade, sep, layout.seq_len, trailing
    )
    if memory is not None:
        classroom = np.full(sample.titles.shape, -1, np.int64)  # -1: no memory
        classroom[np.arange(len(rows)), layout.own[rows]] = history.classroom[layout.query[rows]]
        sample = memory.attach(sample, classroom)
    # Every interaction is scored, so ``source`` names them all. With carriers each key carries the
    # title before it in its student's run (nothing at a run's start); else its own.
    prev = np.full_like(source, -1)
    prev[:, 1:] = np.where(sample.positions[:, 1:] > 0, source[:, :-1], -1)
    prev = prev if layout.carriers else source
    all_titles, all_times = history.padded  # index -1 reads 0
    query_col = np.zeros(batch, np.int32)
    query_col[: len(rows)] = layout.own[rows]
    return QueryRows(sample, query_col, all_titles[prev], all_times[prev])
