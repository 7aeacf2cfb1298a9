"""A classroom's recent reads, for any moment: what a row of 65 tokens cannot hold.

A packed row holds a dozen classmates' latest chunks; a classroom has two dozen students who read
hundreds of books in two days. :class:`ClassroomMemory` summarises, for a (classroom, moment) pair,
the classroom's reads in the ``days`` before that moment, strictly earlier (ties stay hidden, as in
the attention masks): the ``size`` titles read most often, each with its number of reads and the
time of its latest read. Reading the summary is reading those interactions with keys that depend
only on the title and the age; ``studyrec.models.decoder.MemoryHead`` reads it.

Every read of the classroom counts, the querying student's own included (those are part of its
visible past anyway), so one summary serves every student of the classroom at that moment.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int

from studyrec.data.interactions import Interactions
from studyrec.data.packing import Placements, Sample, token_owners

DAY = 86400


def _rank_titles(summary: np.ndarray, reads: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The order of (summary, title) groups given in (summary, title) order: by summary, then most
    reads, then latest read, then title.

    One stable sort of a packed int64 key (ties keep the title order); ``np.lexsort`` on the four
    keys took 7x longer and is left for keys too wide to pack.
    """
    if len(summary) == 0:
        return np.zeros(0, np.int64)
    reads_bits, time_bits = int(reads.max()).bit_length(), int(last.max() - last.min()).bit_length()
    if int(summary.max()).bit_length() + reads_bits + time_bits > 62:
        return np.lexsort((np.arange(len(summary)), -last, -reads, summary))
    key = (summary.astype(np.int64) << (reads_bits + time_bits)) | (
        (int(reads.max()) - reads).astype(np.int64) << time_bits
    ) | (int(last.max()) - last).astype(np.int64)
    return np.argsort(key, kind="stable")


class ClassroomMemory:
    """Top titles of each classroom's reads in ``[t - days, t)``, for any classroom and moment ``t``.

    Reads are given one per interaction: classroom index, time (int32 seconds from the run's
    origin) and title (vocabulary id; 0, padding, never counts). At most the latest ``max_reads`` of
    the window count, which bounds the work per lookup. Titles rank by reads, then the latest read,
    then id.
    """

    def __init__(
        self,
        classroom: Int[np.ndarray, " n"],
        times: Int[np.ndarray, " n"],
        titles: Int[np.ndarray, " n"],
        *,
        size: int,
        days: float,
        max_reads: int,
    ):
        if size < 1 or max_reads < 1 or not days > 0:
            raise ValueError(f"classroom memory: size {size}, days {days} and max_reads {max_reads} must be positive")
        keep = np.asarray(titles) > 0
        classroom = np.asarray(classroom, np.int64)[keep]
        times = np.asarray(times, np.int64)[keep]
        self._t0 = int(times.min(initial=0))
        self._span = int(times.max(initial=0)) - self._t0 + 1
        key = classroom * self._span + (times - self._t0)
        order = np.argsort(key, kind="stable")
        self._key = key[order]
        self._titles = np.asarray(titles, np.int64)[keep][order]
        self._times = times[order]
        self.size, self.days, self.max_reads = size, float(days), max_reads
        self._num_titles = int(self._titles.max(initial=0)) + 1

    @classmethod
    def of(cls, data: Interactions, time_origin: int, *, size: int, days: float, max_reads: int) -> ClassroomMemory:
        """The memory of every interaction in ``data``, timed as rows hold them (seconds from ``time_origin``)."""
        return cls(data.classroom[data.student_of], data.timestamps - time_origin, data.titles, size=size, days=days, max_reads=max_reads)

    @classmethod
    def optional(cls, data: Interactions, time_origin: int, options: dict | None) -> ClassroomMemory | None:
        """:meth:`of` under ``options`` (``studyrec.models.memory_options``), or None without them (the
        model reads no classroom memory)."""
        return None if options is None else cls.of(data, time_origin, **options)

    def lookup(
        self, classroom: Int[np.ndarray, " q"], times: Int[np.ndarray, " q"]
    ) -> tuple[Int[np.ndarray, "q k"], Int[np.ndarray, "q k"], Int[np.ndarray, "q k"]]:
        """``(titles, reads, latest)``, each ``[q, size]`` int32: title 0 marks an empty slot."""
        classroom, times = np.asarray(classroom, np.int64), np.asarray(times, np.int64)
        q = len(classroom)
        titles = np.zeros((q, self.size), np.int32)
        reads = np.zeros((q, self.size), np.int32)
        latest = np.zeros((q, self.size), np.int32)
        if q == 0 or len(self._key) == 0:
            return titles, reads, latest
        # One summary per distinct (classroom, moment): a row's tokens share few of them.
        offset = times - self._t0
        width = int(offset.max() - offset.min()) + 1
        unique, inverse = np.unique(classroom * width + (offset - offset.min()), return_inverse=True)
        room, moment = unique // width, unique % width + offset.min()
        # Reads keys are classroom * span + offset with 0 <= offset < span: clipping keeps a window in its classroom.
        base = room * self._span
        hi = np.searchsorted(self._key, base + np.clip(moment, 0, self._span), side="left")
        lo = np.searchsorted(self._key, base + np.clip(moment - int(self.days * DAY), 0, self._span), side="left")
        lo = np.maximum(lo, hi - self.max_reads)
        count = hi - lo
        which = np.repeat(np.arange(len(unique)), count)
        read = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
        # Reads per (summary, title), and the latest.
        pair = which * self._num_titles + self._titles[read]
        order = np.argsort(pair, kind="stable")
        pair = pair[order]
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, np.int64)
        n = np.diff(np.r_[first, len(pair)])
        last = np.maximum.reduceat(self._times[read][order], first) if len(first) else n
        g_which, g_title = pair[first] // self._num_titles, pair[first] % self._num_titles
        rank = _rank_titles(g_which, n, last)
        g_which, g_title, n, last = g_which[rank], g_title[rank], n[rank], last[rank]
        start = np.searchsorted(g_which, np.arange(len(unique)), side="left")
        slot = np.arange(len(g_which)) - start[g_which]
        top = slot < self.size
        u_titles = np.zeros((len(unique), self.size), np.int32)
        u_reads = np.zeros((len(unique), self.size), np.int32)
        u_latest = np.zeros((len(unique), self.size), np.int32)
        u_titles[g_which[top], slot[top]] = g_title[top]
        u_reads[g_which[top], slot[top]] = n[top]
        u_latest[g_which[top], slot[top]] = last[top]
        return u_titles[inverse], u_reads[inverse], u_latest[inverse]

    def attach(self, sample: Sample, classroom: Int[np.ndarray, "*batch seq"]) -> Sample:
        """``sample`` with each token's memory: the summary for its student's classroom at its time.

        ``classroom`` is each token's classroom index (-1 on separators and padding, which get none).
        """
        real = classroom >= 0
        shape = classroom.shape + (self.size,)
        out = [np.zeros(shape, np.int32) for _ in range(3)]
        found = self.lookup(classroom[real], np.asarray(sample.timestamps)[real])
        for o, f in zip(out, found):
            o[real] = f
        return sample._replace(memory_titles=out[0], memory_reads=out[1], memory_times=out[2])

    def attach_placed(self, sample: Sample, where: Placements, classroom: Int[np.ndarray, " students"]) -> Sample:
        """:meth:`attach` for rows composed from ``where``: a token's classroom is its student's,
        ``classroom[student]``."""
        owner = token_owners(sample.segments.shape[0], where, sample.segments)
        return self.attach(sample, np.where(owner >= 0, classroom[np.maximum(owner, 0)], -1))
