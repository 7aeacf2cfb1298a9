"""Query rows: one packed row per student to recommend for, as of a moment.

Each student gets one row: their latest ``chunk_size - 1`` interactions followed by a *query slot*
at ``as_of`` whose logits score the next title (the slot's own title is a placeholder that the
model never reads, since position p never sees the title at p). For a model that reads classmates,
the rest of the row holds the classroom's most recently active classmates. Where keys carry the
previous title of their student (``DecoderModel.keys_carry_previous_title``, the one-step lag of
``Study``), each classmate's segment ends with a *carrier* slot at their last timestamp: it carries
their latest title, and is strictly earlier than ``as_of``, so every classmate interaction in the row
reaches the query.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd

from studyrec.data.packing import Sample


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
    carried_title: np.ndarray  # int32 [B, L]: the title each key carries (Study: the previous one)
    carried_time: np.ndarray  # int64 [B, L]: when that title was read (absolute seconds)


def compose_queries(
    history: QueryHistory, layout: QueryLayout, rows: np.ndarray, batch: int, as_of: int, origin: int, sep: int
) -> QueryRows:
    """Packs ``rows`` of the layout into ``batch`` rows (the rest empty)."""
    L = layout.seq_len
    n = len(rows)
    W = layout.mates.shape[1]
    mates, taken = layout.mates[rows], layout.mate_count[rows]
    seg_len = taken + (1 if layout.carriers else 0)
    own = layout.own[rows]
    # Pieces: the queried student (slot 1) then each classmate placed (slots 2, 3, ...).
    placed = mates >= 0
    col0 = own + 1  # after the query slot
    widths = np.where(placed, 1 + seg_len, 0)
    starts = col0[:, None] + np.cumsum(widths, axis=1) - widths + 1  # skip the separator
    r_idx = np.arange(n)
    piece_row = np.concatenate([r_idx, np.repeat(r_idx, W)[placed.ravel()]])
    piece_col = np.concatenate([np.zeros(n, np.int64), starts[placed]])
    piece_slot = np.concatenate([np.ones(n, np.int64), (np.cumsum(placed, axis=1) + 1)[placed]])
    piece_student = np.concatenate([layout.query[rows], mates[placed]])
    piece_taken = np.concatenate([own, taken[placed]])
    piece_trailing = np.concatenate([np.ones(n, bool), np.full(placed.sum(), layout.carriers)])
    last = history.last_time[piece_student]
    piece_trail_time = np.concatenate([np.full(n, as_of, np.int64), last[n:]])

    cells = piece_taken + piece_trailing
    within = np.arange(cells.sum()) - np.repeat(np.cumsum(cells) - cells, cells)
    r = np.repeat(piece_row, cells)
    c = np.repeat(piece_col, cells) + within
    count = np.repeat(piece_taken, cells)
    first = np.repeat(history.start[piece_student] + history.count[piece_student] - piece_taken, cells)
    trailing = within >= count
    # Index -1 reads the padding appended below, so an empty history needs no special case.
    src = np.where(trailing, -1, first + within)
    prev = np.where(within > 0, first + within - 1, -1)
    all_titles, all_times = history.padded

    titles = np.zeros((batch, L), np.int32)
    segments = np.zeros((batch, L), np.int32)
    stamps = np.zeros((batch, L), np.int64)
    positions = np.zeros((batch, L), np.int32)
    carried = np.zeros((batch, L), np.int32)
    carried_time = np.zeros((batch, L), np.int64)
    titles[r, c] = all_titles[src]
    segments[r, c] = np.repeat(piece_slot, cells)
    stamps[r, c] = np.where(trailing, np.repeat(piece_trail_time, cells), all_times[src]) - origin
    positions[r, c] = within
    carried[r, c] = all_titles[prev]
    carried_time[r, c] = all_times[prev]
    later = piece_slot > 1
    titles[piece_row[later], piece_col[later] - 1] = sep
    grade = np.zeros(batch, np.int32)
    grade[:n] = history.grade[layout.query[rows]]
    query_col = np.zeros(batch, np.int32)
    query_col[:n] = own
    sample = Sample(titles, segments, stamps.astype(np.int32), positions, grade)
    return QueryRows(sample, query_col, carried, carried_time)
