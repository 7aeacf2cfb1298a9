"""Hits@n, NDCG@n and MRR per student, on the reference's three evaluation subsets (spec §8).

Interactions are flat arrays in chronological order within each student, students contiguous.
Per-student statistics are kept as integer rank histograms (:class:`StudentStats`), so shards
evaluated on different devices or hosts merge exactly, floating point included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from studyrec.data.atomic import write_text_atomic

SUBSETS: tuple[str, ...] = ("all", "non_continuation", "non_history")
"""The reference's evaluation subsets (``types.EvalTypes``); the paper calls non_history "novel"."""

PER_STUDENT_COLUMNS = ["Student_ID", "Evaluation_Type", "N_Recommendations", "Hits_at_N", "NDCG_at_N", "MRR"]
AGGREGATE_COLUMNS = ["Evaluation_Type", "N_Recommendations", "Hits_at_N", "NDCG_at_N", "MRR"]


def subset_masks(student_ids: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Which interactions belong to each subset of :data:`SUBSETS`.

    ``non_continuation``: the student's first interaction, or a title other than the previous one.
    ``non_history``: a title the student has not read before (first occurrence per student).

    Targets are compared as given: to reproduce the reference exactly, pass codes of the raw
    titles, since distinct out-of-vocabulary titles share one vocabulary id.
    """
    student_ids = np.asarray(student_ids)
    targets = np.asarray(targets)
    n = len(targets)
    first = np.ones(n, dtype=bool)
    first[1:] = student_ids[1:] != student_ids[:-1]
    non_continuation = first.copy()
    non_continuation[1:] |= targets[1:] != targets[:-1]
    # lexsort is stable, so the first of each (student, title) run is its earliest interaction.
    order = np.lexsort((targets, student_ids))
    s, t = student_ids[order], targets[order]
    new_pair = np.ones(n, dtype=bool)
    new_pair[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    non_history = np.empty(n, dtype=bool)
    non_history[order] = new_pair
    return {"all": np.ones(n, dtype=bool), "non_continuation": non_continuation, "non_history": non_history}


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target in its row of ``topk`` (best first); ``K`` when absent."""
    topk = np.asarray(topk)
    match = topk == np.asarray(targets)[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), topk.shape[1]).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class StudentStats:
    """Sufficient statistics per student and subset: interaction counts and rank histograms.

    Every metric is a fixed function of these integers (``hits_sum``, ``ndcg_sum``, ``rr_sum``),
    so :meth:`merge` is exact, associative and commutative, whatever the sharding.
    """

    student_ids: np.ndarray
    """int64 [S], ascending and unique."""
    counts: np.ndarray
    """int64 [S, subsets]: interactions per student and subset."""
    rank_counts: np.ndarray
    """int64 [S, subsets, k]: interactions whose target was at rank r (misses are not stored)."""
    ns: tuple[int, ...]
    """The n values tables report by default."""
    subsets: tuple[str, ...] = SUBSETS

    @property
    def k(self) -> int:
        """Ranks below ``k`` are hits; MRR is truncated at ``k``."""
        return self.rank_counts.shape[-1]

    @classmethod
    def from_ranks(
        cls,
        student_ids: np.ndarray,
        ranks: np.ndarray,
        masks: Mapping[str, np.ndarray],
        ns: Sequence[int],
        *,
        k: int | None = None,
    ) -> StudentStats:
        """Statistics of one shard of interactions.

        Arguments:
            student_ids: int [N], the student of each interaction.
            ranks: int [N], from :func:`target_ranks`; a rank ``>= k`` is a miss.
            masks: subset name -> bool [N], e.g. from :func:`subset_masks`.
            ns: the n values for hits@n and NDCG@n; each must be ``<= k``.
            k: the length of the recommendation lists (default ``max(ns)``); pass it so that
                MRR covers the whole list.
        """
        ns = tuple(int(n) for n in ns)
        k = max(ns) if k is None else int(k)
        if not ns or min(ns) < 1 or max(ns) > k:
            raise ValueError(f"every n must be in 1..k={k}, got {ns}")
        subsets = tuple(masks)
        ids, inverse = np.unique(np.asarray(student_ids, dtype=np.int64), return_inverse=True)
        # Misses land in bin k, which only feeds the counts.
        bins = inverse * (k + 1) + np.minimum(np.asarray(ranks, dtype=np.int64), k)
        hist = np.stack(
            [np.bincount(bins[np.asarray(masks[name], dtype=bool)], minlength=len(ids) * (k + 1)) for name in subsets],
            axis=1,
        ).reshape(len(ids), k + 1, len(subsets)).transpose(0, 2, 1).astype(np.int64)
        return cls(ids, hist.sum(axis=2), np.ascontiguousarray(hist[:, :, :k]), ns, subsets)

    @classmethod
    def empty(cls, ns: Sequence[int], *, k: int | None = None, subsets: Sequence[str] = SUBSETS) -> StudentStats:
        """The identity of :meth:`merge`."""
        ns = tuple(int(n) for n in ns)
        k = max(ns) if k is None else int(k)
        return cls(
            np.zeros(0, np.int64), np.zeros((0, len(subsets)), np.int64), np.zeros((0, len(subsets), k), np.int64), ns, tuple(subsets)
        )

    def merge(self, other: StudentStats) -> StudentStats:
        """Statistics of the union of two shards (a student may appear in both)."""
        if (self.subsets, self.k) != (other.subsets, other.k):
            raise ValueError(f"cannot merge stats over {self.subsets}, k={self.k} with {other.subsets}, k={other.k}")
        ids = np.union1d(self.student_ids, other.student_ids)
        counts = np.zeros((len(ids),) + self.counts.shape[1:], np.int64)
        rank_counts = np.zeros((len(ids),) + self.rank_counts.shape[1:], np.int64)
        for part in (self, other):
            at = np.searchsorted(ids, part.student_ids)  # unique within a part, so += is safe
            counts[at] += part.counts
            rank_counts[at] += part.rank_counts
        return StudentStats(ids, counts, rank_counts, self.ns, self.subsets)

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.k:
            raise ValueError(f"n={n} is outside 1..k={self.k}")

    def hits_sum(self, n: int) -> np.ndarray:
        """int64 [S, subsets]: interactions whose target is in the first n."""
        self._check_n(n)
        return self.rank_counts[:, :, :n].sum(axis=2)

    def ndcg_sum(self, n: int) -> np.ndarray:
        """float64 [S, subsets]: sum of NDCG@n = 1/log2(rank+2) for rank < n, one relevant item."""
        self._check_n(n)
        gains = 1.0 / np.log2(np.arange(n) + 2.0)
        return self.rank_counts[:, :, :n] @ gains

    def rr_sum(self) -> np.ndarray:
        """float64 [S, subsets]: sum of reciprocal ranks 1/(rank+1), 0 beyond k."""
        return self.rank_counts @ (1.0 / np.arange(1, self.k + 1))


def per_student_table(stats: StudentStats, ns: Sequence[int] | None = None) -> pd.DataFrame:
    """The reference's ``per_student.csv`` rows, plus ``NDCG_at_N`` and ``MRR``.

    Rows are ordered by n (as given), subset, then student ascending; a student appears for a
    subset only with at least one interaction in it. Metrics are per-student means over that subset.
    """
    ns = stats.ns if ns is None else tuple(int(n) for n in ns)
    rr = stats.rr_sum()
    frames = []
    for n in ns:
        hits, ndcg = stats.hits_sum(n), stats.ndcg_sum(n)
        for j, subset in enumerate(stats.subsets):
            count = stats.counts[:, j]
            has = count > 0
            c = count[has]
            frames.append(
                pd.DataFrame(
                    {
                        "Student_ID": stats.student_ids[has],
                        "Evaluation_Type": subset,
                        "N_Recommendations": n,
                        "Hits_at_N": hits[has, j] / c,
                        "NDCG_at_N": ndcg[has, j] / c,
                        "MRR": rr[has, j] / c,
                    }
                )
            )
    if not frames:
        return pd.DataFrame({c: [] for c in PER_STUDENT_COLUMNS})
    return pd.concat(frames, ignore_index=True)[PER_STUDENT_COLUMNS]


def aggregate_table(per_student: pd.DataFrame) -> pd.DataFrame:
    """Macro average over students, grouped by (subset, n) with sorted keys, as ``aggregate.csv``.

    Uses pandas' grouped mean, like the reference's ``aggregate.csv`` (which may differ in the last
    bit from :func:`hits_at_n`, which sums students left to right like the reference's ``aggregate``).
    """
    metrics = [c for c in ("Hits_at_N", "NDCG_at_N", "MRR") if c in per_student.columns]
    keys = ["Evaluation_Type", "N_Recommendations"]
    return per_student.groupby(keys, as_index=False, sort=True)[metrics].mean()[keys + metrics]


def write_tables(out_dir: str | Path, per_student: pd.DataFrame, aggregate: pd.DataFrame) -> None:
    """Writes ``per_student.csv`` and ``aggregate.csv`` (no index) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "per_student.csv", per_student.to_csv(index=False))
    write_text_atomic(out_dir / "aggregate.csv", aggregate.to_csv(index=False))


def _flatten(
    reference: Mapping[int, Sequence[str]], recommendations: Mapping[int, Sequence[Sequence[str]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (student, read code, has recommendation, recommendation codes) with the reference's
    alignment: recommendations fill the LAST reads; extra ones are dropped."""
    students, reads, has_rec, rec_rows = [], [], [], []
    for student in sorted(reference):
        recs = recommendations.get(student)
        if recs is None:
            continue
        titles = list(reference[student])
        recs = list(recs)[: len(titles)]
        skipped = len(titles) - len(recs)
        students += [student] * len(titles)
        reads += titles
        has_rec += [False] * skipped + [True] * len(recs)
        rec_rows += [list(r) for r in recs]
    width = max((len(r) for r in rec_rows), default=0)
    cells = [t for r in rec_rows for t in r + [None] * (width - len(r))]
    codes, _ = pd.factorize(pd.Series(reads + cells, dtype=object))  # None -> -1, never a target
    return (
        np.asarray(students, dtype=np.int64),
        codes[: len(reads)],
        np.asarray(has_rec, dtype=bool),
        codes[len(reads):].reshape(len(rec_rows), width),
    )


def score_stats(
    reference: Mapping[int, Sequence[str]],
    recommendations: Mapping[int, Sequence[Sequence[str]]],
    ns: Sequence[int],
) -> StudentStats:
    """:class:`StudentStats` for title-string recommendations, as the reference scores them.

    Arguments:
        reference: StudentID -> the titles read, in time order.
        recommendations: StudentID -> one ranked list of titles per interaction. A student with
            fewer lists than reads gets them aligned to the last reads; extra lists are ignored;
            students without recommendations are skipped. Subsets are decided on all the reads.
        ns: the n values, in output order.
    """
    students, reads, has_rec, recs = _flatten(reference, recommendations)
    masks = subset_masks(students, reads)
    k = max([recs.shape[1], *ns])
    recs = np.pad(recs, ((0, 0), (0, k - recs.shape[1])), constant_values=-1)
    ranks = target_ranks(recs, reads[has_rec])
    return StudentStats.from_ranks(students[has_rec], ranks, {s: m[has_rec] for s, m in masks.items()}, ns, k=k)


def score_recommendations(
    reference: Mapping[int, Sequence[str]],
    recommendations: Mapping[int, Sequence[Sequence[str]]],
    ns: Sequence[int],
) -> pd.DataFrame:
    """The per-student table (:func:`per_student_table`) of :func:`score_stats`."""
    return per_student_table(score_stats(reference, recommendations, ns))


def hits_at_n(
    reference: Mapping[int, Sequence[str]],
    recommendations: Mapping[int, Sequence[Sequence[str]]],
    n: int,
    subset: str = "all",
) -> float | None:
    """Macro-averaged hits@n over students (the reference's ``hits_at_n``); None without students."""
    table = score_recommendations(reference, recommendations, [n])
    values = table.loc[table["Evaluation_Type"] == subset, "Hits_at_N"].to_numpy(dtype=np.float64)
    if len(values) == 0:
        return None
    # Sequential left-to-right sum, bit-for-bit the reference's loop.
    return float(np.cumsum(values)[-1] / len(values))
