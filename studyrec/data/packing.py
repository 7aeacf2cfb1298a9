"""Classroom packs: rows of ``seq_len`` tokens holding one chunk per classmate.

Row layout (spec §4): chunks joined by a single ``<SEP>`` token, right-padded with 0. Unlike the
reference, rows carry a per-row ``segments`` number (1, 2, … for the row's students; 0 for
separators and padding) instead of raw StudentIDs, so no id can collide with a separator or
padding, and timestamps are int32 seconds relative to a stored origin (no 2038 limit).

Every layout says where runs of interactions go (``Placements``) and leaves the rows to one
``compose``. Three layouts, all vectorised over rows:

- ``random_rows(seed, rows)``: training rows drawn with replacement. A row's classroom is drawn in
  proportion to its students; classmates are taken in random order while they fit (three misfits
  end the row). Row ``i`` is a pure function of ``(seed, i)``. With ``aligned=True`` (the default)
  the classmates' chunks are taken around one moment, so a row shows what the class read at the
  same time; ``aligned=False`` draws each classmate's chunk at random, as the reference does.
- ``EvalLayout``: an exhaustive, ordered pass. Classmates' ``r``-th chunks counting back from
  their latest share rows (filled in StudentID order), so every interaction lands in exactly one
  row, classmates' latest activity sits together, and a student's chunks come out earliest first.
- Recommendation query rows (``studyrec.data.query_rows``): one row per student, their latest
  interactions then a trailing *query slot* at the moment asked about, and the classroom's most
  recently active classmates after them (each ending with a trailing *carrier* slot for models
  whose keys carry the previous title).

With ``context_size`` the first two become *focus* rows: one student's chunk, then each classmate's
latest ``context_size`` interactions strictly before its last (see ``ClassroomPacker``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from jaxtyping import Array, Int

from studyrec.data.interactions import Chunks, Interactions
from studyrec.data.vocab import Vocabulary

if TYPE_CHECKING:
    from studyrec.data.memory import ClassroomMemory

MAX_REJECTS = 3
_INT32 = np.iinfo(np.int32)


class Sample(NamedTuple):
    """One packed row (or a batch of them, with leading batch axes)."""

    titles: Int[Array, "*batch seq"]
    """Vocabulary ids; 0 = padding, ``vocab.sep`` between students."""
    segments: Int[Array, "*batch seq"]
    """Student slot within the row, 1-based; 0 on separators and padding."""
    timestamps: Int[Array, "*batch seq"]
    """Seconds relative to the run's time origin."""
    positions: Int[Array, "*batch seq"]
    """Position within the student's chunk, from 0."""
    grade_level: Int[Array, "*batch"]
    """Grade of the row's first student (0 = unknown)."""
    memory_titles: Int[Array, "*batch seq memory"] | None = None
    """Each token's classroom memory (``studyrec.data.memory``): the titles its classroom read most in
    the days strictly before it (0: empty slot); None: no memory (a model that reads one sees it empty)."""
    memory_reads: Int[Array, "*batch seq memory"] | None = None
    """How many times the classroom read each memory title in that window."""
    memory_times: Int[Array, "*batch seq memory"] | None = None
    """When the classroom last read each memory title (seconds from the time origin, strictly before the token's time)."""


def _uniform(seed: int, rows: np.ndarray, stream: int, width: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1), shape [len(rows), width]: a pure function of its inputs."""
    key = np.array([seed, stream], dtype=np.uint64) * np.array([0x9E3779B97F4A7C15, 0xABC98388FB8FAC03], dtype=np.uint64)
    x = (
        key.sum()
        + rows.astype(np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03)
        + np.arange(width, dtype=np.uint64)[None, :] * np.uint64(0x8CB92BA72F3D8DD7)
    )
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclasses.dataclass(frozen=True)
class Placements:
    """Where runs of interactions go: ``length[i]`` interactions of ``student[i]`` from ``start[i]``
    fill row ``row[i]`` from column ``col[i]`` as slot ``slot[i]``; unscored ones are context only,
    and so are the first ``lead[i]`` interactions of a scored one."""

    row: np.ndarray
    col: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    length: np.ndarray
    student: np.ndarray
    scored: np.ndarray
    lead: np.ndarray

    @classmethod
    def of_chunks(cls, chunks: Chunks, row, col, slot, chunk, lead=0) -> Placements:
        """Whole chunks, all scored, each after the ``lead`` interactions before it (context only)."""
        chunk = np.asarray(chunk, np.int64)
        lead = np.broadcast_to(np.asarray(lead, np.int64), chunk.shape)
        return cls(
            row=np.asarray(row, np.int64), col=np.asarray(col, np.int64), slot=np.asarray(slot, np.int64),
            start=chunks.start[chunk] - lead, length=chunks.length[chunk] + lead, student=chunks.owner[chunk],
            scored=np.ones(len(chunk), bool), lead=lead,
        )

    def take(self, index) -> Placements:
        return Placements(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: Sequence[Placements]) -> Placements:
        return Placements(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Placements)})


def compose(
    num_rows: int,
    where: Placements,
    titles: np.ndarray,
    relative_times: np.ndarray,
    grades: np.ndarray,
    sep: int,
    seq_len: int,
    trailing: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Sample, np.ndarray]:
    """Builds ``num_rows`` rows of ``seq_len`` from placements; also returns each token's source
    interaction (-1: none, and for context-only interactions).

    Interaction ``i`` reads ``titles[i]`` at ``relative_times[i]`` (int32 seconds from the time
    origin); student ``s`` has grade ``grades[s]``, the row's grade when in slot 1. A later slot
    follows a ``sep`` token. ``trailing = (index, time)``: placement ``index[j]`` ends with one more
    token of title 0 at relative time ``time[j]``, continuing its slot and positions, with no source
    (a recommendation's query slot, or a classmate's carrier slot: see ``studyrec.data.query_rows``).
    """
    L = seq_len
    lengths = where.length
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    r = np.repeat(where.row, lengths)
    c = np.repeat(where.col, lengths) + within
    src = np.repeat(where.start, lengths) + within
    out_titles = np.zeros((num_rows, L), np.int32)
    segments = np.zeros((num_rows, L), np.int32)
    timestamps = np.zeros((num_rows, L), np.int32)
    positions = np.zeros((num_rows, L), np.int32)
    source = np.full((num_rows, L), -1, np.int64)
    out_titles[r, c] = titles[src]
    segments[r, c] = np.repeat(where.slot, lengths)
    timestamps[r, c] = relative_times[src]
    positions[r, c] = within
    source[r, c] = np.where(np.repeat(where.scored, lengths) & (within >= np.repeat(where.lead, lengths)), src, -1)
    if trailing is not None:
        index, trail_time = trailing
        tr, tc = where.row[index], where.col[index] + lengths[index]
        segments[tr, tc] = where.slot[index]
        timestamps[tr, tc] = trail_time
        positions[tr, tc] = lengths[index]
    later = where.slot > 1
    out_titles[where.row[later], where.col[later] - 1] = sep
    grade = np.zeros(num_rows, np.int32)
    first = where.slot == 1
    grade[where.row[first]] = grades[where.student[first]]
    return Sample(out_titles, segments, timestamps, positions, grade), source


def token_owners(num_rows: int, where: Placements, segments: np.ndarray) -> np.ndarray:
    """The student of every token of rows composed from ``where`` (-1 on separators and padding)."""
    owner = np.full((num_rows, int(where.slot.max(initial=0)) + 1), -1, np.int64)
    owner[where.row, where.slot] = where.student
    return np.where(segments > 0, owner[np.arange(num_rows)[:, None], segments], -1)


def local_rows(step: int, global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Row indices of this process's slice of global batch ``step``: rows ``step * global_batch ..``, split
    into contiguous slices, one per JAX process (see :mod:`studyrec.data.pipeline`)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not divide over {process_count} processes")
    local = global_batch // process_count
    return step * global_batch + process_index * local + np.arange(local, dtype=np.int64)


class ClassroomPacker:
    """Packs the chunks of ``data`` into classroom rows of ``seq_len`` tokens.

    With ``context_size``, each row is one student's chunk followed by the latest ``context_size``
    interactions before its end of each classmate, most recently active first (a *focus* row); only
    that student's chunk is scored in the evaluation pass.
    """

    def __init__(
        self,
        data: Interactions,
        chunks: Chunks,
        seq_len: int,
        sep: int,
        time_origin: int,
        aligned: bool = True,
        context_size: int | None = None,
        memory: ClassroomMemory | None = None,
    ):
        if chunks.size > seq_len:
            raise ValueError(
                f"student chunk size {chunks.size} is larger than seq_len {seq_len}: a chunk could never "
                f"be placed; use a chunk size <= seq_len"
            )
        if context_size is not None and not 1 <= context_size <= seq_len - chunks.size - 1:
            raise ValueError(
                f"classmate chunk size {context_size} leaves no room: it must be between 1 and seq_len - "
                f"student chunk size - 1 = {seq_len - chunks.size - 1}"
            )
        relative = data.timestamps - time_origin
        if len(relative) and (relative.min() < _INT32.min or relative.max() > _INT32.max):
            # a last resort: dataset.check_representable names the file and line of such a row first
            raise ValueError(
                f"timestamps span more than ±68 years around the time origin {time_origin} (seconds since 1970): "
                "int32 cannot hold them; check the data with studyrec.data.dataset.check_representable"
            )
        self.data, self.chunks, self.seq_len, self.sep, self.memory = data, chunks, seq_len, sep, memory
        self.time_origin = int(time_origin)
        self._relative = relative.astype(np.int32)
        order = np.argsort(data.classroom, kind="stable")
        self._members = order  # student slots grouped by classroom, ascending StudentID within
        counts = np.bincount(data.classroom, minlength=int(data.classroom.max(initial=-1)) + 1)
        self._class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._class_size = counts
        # Cap on classmates considered per row: more than can ever fit, fewer than a huge class.
        self._width = int(min(counts.max(initial=1), 4 * seq_len))
        self.aligned = aligned
        # (owner, chunk start time) as one sortable key, to find a student's chunk at a moment.
        since_first = relative - relative.min(initial=0)
        self._key_base = np.int64(since_first.max(initial=0) + 1)
        self._chunk_end_time = since_first[chunks.start + chunks.length - 1]
        self._chunk_key = chunks.owner * self._key_base + since_first[chunks.start]
        self.context_size = context_size
        if context_size is not None:
            self._since_first = since_first
            # (student, time) of every interaction, ascending: a classmate's reads before a moment.
            owner = np.repeat(np.arange(data.num_students), np.diff(data.offsets))
            self._interaction_key = owner * self._key_base + since_first

    def compose(self, num_rows: int, where: Placements) -> tuple[Sample, np.ndarray]:
        """Builds ``num_rows`` rows from placements (with the classroom memory when the packer has one);
        also returns each token's source interaction (-1: none)."""
        sample, source = compose(num_rows, where, self.data.titles, self._relative, self.data.grade, self.sep, self.seq_len)
        if self.memory is not None:
            sample = self.memory.attach_placed(sample, where, self.data.classroom)
        return sample, source

    def random_placements(self, seed: int, rows: np.ndarray) -> Placements:
        """Training rows with replacement; row ``rows[b]`` depends only on ``(seed, rows[b])``."""
        rows = np.asarray(rows, dtype=np.int64)
        L, data, chunks = self.seq_len, self.data, self.chunks
        # A classroom in proportion to its students: the classroom of a uniformly drawn student.
        anchor = np.minimum((_uniform(seed, rows, 0, 1)[:, 0] * data.num_students).astype(np.int64), data.num_students - 1)
        room = data.classroom[anchor]
        student, valid = self._classmates(seed, rows, room)
        if self.context_size is not None:
            anchor_chunk = self._random_chunk(_uniform(seed, rows, 4, 1)[:, 0], anchor)
            return self._focus_placements(anchor_chunk, student, valid)
        B = len(rows)
        # At most (L+1)//2 chunks fit, and three misfits end a row: later candidates are never looked at.
        front = np.argsort(~valid, axis=1, kind="stable")[:, : min(student.shape[1], (L + 1) // 2 + MAX_REJECTS)]
        student, valid = np.take_along_axis(student, front, 1), np.take_along_axis(valid, front, 1)
        W = front.shape[1]
        if self.aligned:
            # Classmates' chunks around one moment: the anchor's random chunk ends at that moment,
            # and each classmate contributes their last chunk starting at or before it.
            anchor_chunk = self._random_chunk(_uniform(seed, rows, 4, 1), anchor[:, None])
            moment = self._chunk_end_time[anchor_chunk]
            at = np.searchsorted(self._chunk_key, student * self._key_base + moment, side="right") - 1
            chunk = np.maximum(at, chunks.first_chunk[student])
        else:
            chunk = self._random_chunk(np.take_along_axis(_uniform(seed, rows, 3, self._width), front, 1), student)
        length = chunks.length[chunk]

        accept = np.zeros((B, W), bool)
        col = np.zeros((B, W), np.int64)
        cur = np.zeros(B, np.int64)
        rejects = np.zeros(B, np.int64)
        active = np.ones(B, bool)
        for k in range(W):
            considered = valid[:, k] & active
            start = cur + (cur > 0)
            fits = considered & (start + length[:, k] <= L)
            accept[:, k], col[:, k] = fits, start
            cur = np.where(fits, start + length[:, k], cur)
            rejects += considered & ~fits
            active &= (rejects < MAX_REJECTS) & (cur < L - 1)
            if not active.any():
                break
        b, k = np.nonzero(accept)
        slot = np.cumsum(accept, axis=1)[b, k]
        return Placements.of_chunks(chunks, b, col[b, k], slot, chunk[b, k])

    def _classmates(self, seed: int, rows: np.ndarray, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``_width`` distinct members of each row's classroom in random order: student slots
        ``[B, W]`` and whether each is real."""
        W = self._width
        size = self._class_size[room]
        j = np.arange(W)[None, :]
        # Exact permutations for small classes, distinct draws for large ones.
        small = (size <= W)[:, None]
        drawn = np.minimum((_uniform(seed, rows, 1, W) * size[:, None]).astype(np.int64), size[:, None] - 1)
        member = np.where(small, j, drawn)
        valid = np.where(small, j < size[:, None], True)
        keys = np.where(valid, _uniform(seed, rows, 2, W), 2.0)
        order = np.argsort(keys, axis=1, kind="stable")
        member = np.take_along_axis(member, order, 1)
        valid = np.take_along_axis(valid, order, 1)
        by_member = np.argsort(member, axis=1, kind="stable")
        sorted_member = np.take_along_axis(member, by_member, 1)
        repeat = np.zeros_like(valid)
        np.put_along_axis(repeat, by_member[:, 1:], sorted_member[:, 1:] == sorted_member[:, :-1], 1)
        valid &= ~repeat
        return self._members[self._class_start[room][:, None] + np.where(valid, member, 0)], valid

    def _focus_placements(self, anchor_chunk: np.ndarray, student: np.ndarray, valid: np.ndarray) -> Placements:
        """Row ``b``: chunk ``anchor_chunk[b]`` (scored), then each candidate classmate's latest
        ``context_size`` interactions strictly before that chunk's last one, most recent first, while
        they fit; the first that does not fit keeps what room is left."""
        L, data, chunks = self.seq_len, self.data, self.chunks
        B = len(anchor_chunk)
        anchor = chunks.owner[anchor_chunk]
        own = chunks.length[anchor_chunk]
        valid = valid & (student != anchor[:, None])
        moment = self._chunk_end_time[anchor_chunk]
        end = np.searchsorted(self._interaction_key, student * self._key_base + moment[:, None], side="left")
        count = np.where(valid, np.clip(end - data.offsets[student], 0, self.context_size), 0)
        latest = np.where(count > 0, self._since_first[np.maximum(end - 1, 0)], -1)
        order = np.argsort(-latest, axis=1, kind="stable")  # the most recent first, the empty last
        student, count, end = (np.take_along_axis(a, order, 1) for a in (student, count, end))
        need = np.where(count > 0, count + 1, 0)  # with its separator
        used = own[:, None] + np.cumsum(need, axis=1)
        taken = np.where(used <= L, count, 0)
        # The first misfit keeps its latest interactions that fit after a separator.
        fit = (taken > 0).sum(axis=1)
        b = np.flatnonzero(fit < count.shape[1])
        k = fit[b]
        room_left = L - np.where(k > 0, used[b, np.maximum(k - 1, 0)], own[b]) - 1
        taken[b, k] = np.where(count[b, k] > 0, np.clip(room_left, 0, count[b, k]), 0)
        r, k = np.nonzero(taken > 0)
        width = np.where(taken > 0, taken + 1, 0)
        col = own[:, None] + np.cumsum(width, axis=1) - taken  # after the separator
        mates = Placements(
            row=r, col=col[r, k], slot=k + 2, start=end[r, k] - taken[r, k], length=taken[r, k],
            student=student[r, k], scored=np.zeros(len(r), bool), lead=np.zeros(len(r), np.int64),
        )
        first = Placements.of_chunks(chunks, np.arange(B), np.zeros(B, np.int64), np.ones(B, np.int64), anchor_chunk)
        both = Placements.concat([first, mates])
        return both.take(np.argsort(both.row, kind="stable"))

    def _random_chunk(self, u: np.ndarray, student: np.ndarray) -> np.ndarray:
        """The chunk of ``student`` at fraction ``u`` of their chunks."""
        n = self.chunks.num_chunks[student]
        return self.chunks.first_chunk[student] + np.minimum((u * n).astype(np.int64), n - 1)

    def random_rows(self, seed: int, rows: np.ndarray) -> Sample:
        sample, _ = self.compose(len(rows), self.random_placements(seed, rows))
        return sample

    def eval_layout(self, chunk_mask: np.ndarray | None = None, *, lead: bool = False) -> EvalLayout:
        """The exhaustive, ordered pass over the chunks selected by ``chunk_mask`` (all by default).

        With ``lead``, each chunk but a student's first comes after the student's previous
        interaction, as context only, so every scored interaction sees the one before it (a row
        then holds chunks one longer than ``chunks.size``; not with focus rows).
        """
        chunks, L = self.chunks, self.seq_len
        selected = np.arange(len(chunks)) if chunk_mask is None else np.flatnonzero(chunk_mask)
        if self.context_size is not None:
            if lead:
                raise ValueError("lead interactions are not supported with focus rows (context_size)")
            return self._focus_layout(selected)
        if lead and chunks.size + 1 > L:
            raise ValueError(f"a chunk of {chunks.size} with its lead interaction does not fit seq_len {L}")
        room = self.data.classroom[chunks.owner[selected]]
        # Classmates' chunks share rows counting back from their latest, so the latest are together.
        from_last = chunks.num_chunks[chunks.owner] - 1 - chunks.rank
        order = selected[np.lexsort((chunks.owner[selected], -from_last[selected], room))]
        group = np.stack([self.data.classroom[chunks.owner[order]], from_last[order]], 1)
        new_group = np.ones(len(order), bool)
        new_group[1:] = np.any(group[1:] != group[:-1], axis=1)
        leads = (chunks.rank[order] > 0).astype(np.int64) if lead else np.zeros(len(order), np.int64)
        lengths = (chunks.length[order] + leads).tolist()
        row = np.empty(len(order), np.int64)
        col = np.empty(len(order), np.int64)
        slot = np.empty(len(order), np.int64)
        r, cur, s = -1, L, 0
        for i, (n, fresh) in enumerate(zip(lengths, new_group.tolist())):  # next-fit: one pass over chunks
            if fresh or cur + 1 + n > L:
                r, cur, s = r + 1, 0, 0
                col[i] = 0
            else:
                col[i] = cur + 1
            cur = col[i] + n
            s += 1
            row[i], slot[i] = r, s
        return EvalLayout(self, Placements.of_chunks(chunks, row, col, slot, order, leads), num_rows=r + 1)

    def _focus_layout(self, selected: np.ndarray, block: int = 16384) -> EvalLayout:
        """One focus row per selected chunk, in chunk order; classmates drawn with seed 0."""
        empty = np.zeros(0, np.int64)
        parts = [Placements.of_chunks(self.chunks, empty, empty, empty, empty)]
        for lo in range(0, len(selected), block):
            query = selected[lo : lo + block]
            room = self.data.classroom[self.chunks.owner[query]]
            part = self._focus_placements(query, *self._classmates(0, query, room))
            parts.append(dataclasses.replace(part, row=part.row + lo))
        return EvalLayout(self, Placements.concat(parts), num_rows=len(selected))


@dataclasses.dataclass(frozen=True)
class EvalLayout:
    """Rows of an exhaustive pass, composed a batch at a time."""

    packer: ClassroomPacker
    placements: Placements  # sorted by row
    num_rows: int

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_rows // batch_size)

    def batch(self, index: int, batch_size: int) -> tuple[Sample, np.ndarray]:
        """Rows ``[index*batch_size, (index+1)*batch_size)``, padded with empty rows at the end."""
        lo, hi = index * batch_size, (index + 1) * batch_size
        p = self.placements
        a, b = np.searchsorted(p.row, [lo, hi])
        part = p.take(slice(a, b))
        return self.packer.compose(batch_size, dataclasses.replace(part, row=part.row - lo))


def to_seconds(value) -> int:
    """An int is taken as seconds since 1970; a datetime (naive = UTC) is converted."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp())
    if hasattr(value, "timestamp") and not isinstance(value, (int, np.integer)):
        return to_seconds(value.to_pydatetime())  # pandas Timestamp
    return int(value)


def pack_histories(
    histories: Sequence[tuple[int, Sequence[str], Sequence]],
    vocab: Vocabulary,
    seq_len: int,
    grade_level: int = 0,
    time_origin: int = 0,
) -> Sample:
    """Composes one row by hand from ``(student_id, titles, timestamps)`` in row order.

    Titles are raw strings (unknown ones become OOV); timestamps are ints (seconds) or datetimes.
    """
    titles, segments, times, positions = [], [], [], []
    for slot, (_, student_titles, student_times) in enumerate(histories, start=1):
        if len(student_titles) != len(student_times):
            raise ValueError(f"student {slot}: {len(student_titles)} titles but {len(student_times)} timestamps")
        if titles:
            titles.append(vocab.sep)
            segments.append(0)
            times.append(0)
            positions.append(0)
        titles += [vocab.encode(t) for t in student_titles]
        segments += [slot] * len(student_titles)
        times += [to_seconds(t) - time_origin for t in student_times]
        positions += list(range(len(student_titles)))
    if len(titles) > seq_len:
        raise ValueError(f"the histories need {len(titles)} tokens with separators, more than seq_len={seq_len}")
    pad = seq_len - len(titles)
    row = lambda values: np.asarray(values + [0] * pad, dtype=np.int32)  # noqa: E731
    return Sample(row(titles), row(segments), row(times), row(positions), np.int32(grade_level))
