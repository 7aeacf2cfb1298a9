"""Heuristic recommenders scored by the same metric code as the models.

Each baseline maps ``(history, eval, num_titles, k)`` to ``topk: int32 [len(eval), k]``, best
first. Frames have columns ``StudentID``, ``title_id`` (vocabulary ids; ``1..num_titles`` are
titles), ``timestamp`` (seconds), ``classroom`` and ``grade`` (0 = unknown); ``eval`` is sorted by
student, then time.

No leakage: interaction i of student s at time t sees history and eval rows of any student with
timestamp < t, and s's own earlier eval rows (even at time t), never row i or later. Baselines fitted
once (popularity, co-occurrence) use only history rows before the first scored timestamp.
Rows never repeat a title; empty slots are filled with overall popularity, and with 0 (padding)
only when the catalogue has fewer than k titles.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

DAY = 86_400
COLUMNS = ("StudentID", "title_id", "timestamp", "classroom", "grade")

Baseline = Callable[..., np.ndarray]


def _check(frame: pd.DataFrame, name: str) -> None:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} frame lacks columns {missing}")


def _check_sorted(eval: pd.DataFrame) -> None:
    s, t = eval["StudentID"].to_numpy(), eval["timestamp"].to_numpy()
    same = s[1:] == s[:-1]
    if np.any(same & (t[1:] < t[:-1])) or (~same).sum() + 1 != max(len(np.unique(s)), 1):
        raise ValueError("eval must be sorted by student (contiguous), then time")


def _is_title(titles: np.ndarray, num_titles: int) -> np.ndarray:
    return (titles >= 1) & (titles <= num_titles)


def _fit_rows(history: pd.DataFrame, eval: pd.DataFrame) -> pd.DataFrame:
    """History rows strictly before the first scored interaction, for baselines fitted once."""
    if len(eval) == 0:
        return history
    before = history["timestamp"].to_numpy() < eval["timestamp"].min()
    if not before.all():
        warnings.warn(
            f"{(~before).sum()} of {len(history)} history rows are not before the first scored "
            "interaction; fitted baselines ignore them to avoid leakage",
            stacklevel=3,
        )
    return history[before]


def _title_counts(titles: np.ndarray, num_titles: int) -> np.ndarray:
    """int64 [K+1]: reads per title id (slot 0 unused)."""
    titles = titles[_is_title(titles, num_titles)]
    return np.bincount(titles, minlength=num_titles + 1)


def popularity_order(history: pd.DataFrame, num_titles: int) -> np.ndarray:
    """int32 [K]: every title, most read first; ties (and unread titles) by id."""
    counts = _title_counts(history["title_id"].to_numpy(), num_titles)[1:]
    return (np.argsort(-counts, kind="stable") + 1).astype(np.int32)


def _first_unique(candidates: np.ndarray, k: int) -> np.ndarray:
    """int32 [N, k]: the first k distinct non-zero ids of each row, in order, 0-padded."""
    order = np.argsort(candidates, axis=1, kind="stable")
    ordered = np.take_along_axis(candidates, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    duplicate = np.empty_like(repeat)
    np.put_along_axis(duplicate, order, repeat, axis=1)
    keep = (candidates > 0) & ~duplicate
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.where(np.take_along_axis(keep, first, axis=1), np.take_along_axis(candidates, first, axis=1), 0)
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])))
    return out.astype(np.int32)


def _fill(candidates: np.ndarray, fallback: np.ndarray, k: int) -> np.ndarray:
    """Candidates (0 = empty) deduplicated, then topped up from ``fallback`` (best first)."""
    fallback = np.broadcast_to(fallback[:k], (len(candidates), min(k, len(fallback))))
    return _first_unique(np.concatenate([candidates, fallback], axis=1), k)


def _row_top(scores: sp.spmatrix, k: int, budget: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's k largest positive entries (ties by column): (rows, cols, values, rank in row).

    A full lexsort of every entry is slow, so rows with more than k entries are first cut at
    their k-th largest value (a partition over row blocks of at most ``budget`` cells).
    """
    csr = sp.csr_matrix(scores)
    csr.sum_duplicates()
    n = csr.shape[0]
    counts = np.diff(csr.indptr)
    kth = np.full(n, -np.inf)
    wide = np.flatnonzero(counts > k)
    wide = wide[np.argsort(-counts[wide], kind="stable")]  # blocks of similar widths pad little
    at = 0
    while at < len(wide):
        width = int(counts[wide[at]])
        block = wide[at : at + max(1, budget // width)]
        at += len(block)
        c = counts[block]
        within = np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
        padded = np.full((len(block), width), -np.inf)
        padded[np.repeat(np.arange(len(block)), c), within] = csr.data[np.repeat(csr.indptr[block], c) + within]
        kth[block] = np.partition(padded, width - k, axis=1)[:, width - k]
    rows = np.repeat(np.arange(n), counts)
    keep = (csr.data > 0) & (csr.data >= kth[rows])
    rows, cols, vals = rows[keep], csr.indices[keep], csr.data[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    top = rank < k
    return rows[top], cols[top], vals[top], rank[top]


def _sparse_topk(scores: sp.spmatrix, k: int) -> np.ndarray:
    """int32 [N, k]: column ids of each row's k largest positive entries (ties by id), 0-padded."""
    rows, cols, _, rank = _row_top(scores, k)
    out = np.zeros((scores.shape[0], k), dtype=np.int32)
    out[rows, rank] = cols
    return out


def _own_recent(history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, m: int) -> np.ndarray:
    """int32 [N, m]: each scored interaction's student's most recent distinct earlier titles.

    Earlier means own history rows with timestamp < t and own eval rows at earlier positions.
    """
    n = len(eval)
    own = history[history["StudentID"].isin(eval["StudentID"].unique())]
    combined = pd.DataFrame(
        {
            "s": np.concatenate([eval["StudentID"].to_numpy(), own["StudentID"].to_numpy()]),
            "t": np.concatenate([eval["timestamp"].to_numpy(), own["timestamp"].to_numpy()]),
            # At equal timestamps eval rows come first, so history at time t stays hidden from t.
            "kind": np.repeat(np.array([0, 1], np.int8), [n, len(own)]),
            "row": np.concatenate([np.arange(n), np.arange(len(own))]),
            "title": np.concatenate([eval["title_id"].to_numpy(), own["title_id"].to_numpy()]),
        }
    ).sort_values(["s", "t", "kind", "row"], kind="stable")
    out = np.zeros((n, m), dtype=np.int32)
    recent: dict[int, None] = {}  # insertion-ordered: the most recent read is last
    previous = None
    for s, kind, row, title in zip(
        combined["s"].tolist(), combined["kind"].tolist(), combined["row"].tolist(), combined["title"].tolist()
    ):
        if s != previous:
            recent, previous = {}, s
        if kind == 0:
            latest = list(itertools.islice(reversed(recent), m))
            out[row, : len(latest)] = latest
        if 1 <= title <= num_titles:
            recent.pop(title, None)
            recent[title] = None
    return out


def popularity(history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, k: int = 20) -> np.ndarray:
    """The k most-read titles in history, the same for every interaction."""
    order = popularity_order(_fit_rows(history, eval), num_titles)
    return _fill(np.zeros((len(eval), 0), np.int32), order, k)


def popularity_by_grade(history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, k: int = 20) -> np.ndarray:
    """Most read among history rows of the student's grade, then overall popularity.

    Grade 0 (unknown) and grades absent from history get overall popularity.
    """
    fit = _fit_rows(history, eval)
    overall = popularity_order(fit, num_titles)
    rank = np.empty(num_titles + 1, np.int64)
    rank[overall] = np.arange(num_titles)
    grades = eval["grade"].to_numpy()
    table = {0: overall[:k]}
    fit_grades, fit_titles = fit["grade"].to_numpy(), fit["title_id"].to_numpy()
    for g in np.unique(grades[grades != 0]):
        counts = _title_counts(fit_titles[fit_grades == g], num_titles)[1:]
        titles = np.arange(1, num_titles + 1)
        table[int(g)] = titles[np.lexsort((rank[1:], -counts))][:k].astype(np.int32)
    rows = np.zeros((len(eval), min(k, num_titles)), np.int32)
    for g, titles in table.items():
        rows[grades == g] = titles
    return _fill(rows, overall, k)


def _cosine_neighbours(fit: pd.DataFrame, num_titles: int, neighbours: int) -> sp.csr_matrix:
    """[V, V] item-item cosine similarity of co-reading students, each row pruned to its best."""
    titles = fit["title_id"].to_numpy()
    keep = _is_title(titles, num_titles)
    students = pd.factorize(fit["StudentID"].to_numpy()[keep])[0]
    width = num_titles + 3
    reads = sp.csr_matrix((np.ones(keep.sum()), (students, titles[keep])), shape=(students.max(initial=-1) + 1, width))
    reads.data[:] = 1.0  # duplicates summed by the constructor: count each student once
    co = (reads.T @ reads).tocoo()
    norm = np.sqrt(co.diagonal())
    off_diagonal = co.row != co.col
    rows, cols = co.row[off_diagonal], co.col[off_diagonal]
    sim = sp.coo_matrix((co.data[off_diagonal] / (norm[rows] * norm[cols]), (rows, cols)), shape=co.shape)
    rows, cols, vals, _ = _row_top(sim, neighbours)
    return sp.csr_matrix((vals, (rows, cols)), shape=co.shape)


def knn(
    history: pd.DataFrame,
    eval: pd.DataFrame,
    num_titles: int,
    k: int = 20,
    last: int = 5,
    decay: float = 0.5,
    neighbours: int = 50,
) -> np.ndarray:
    """Item-item kNN: titles co-read (cosine) with the student's ``last`` distinct recent titles.

    The j-th most recent title weighs ``decay**j``; each title keeps its ``neighbours`` most
    similar titles. Co-reading is counted over history students.
    """
    fit = _fit_rows(history, eval)
    sim = _cosine_neighbours(fit, num_titles, neighbours)
    recent = _own_recent(history, eval, num_titles, last)
    rows, slot = np.nonzero(recent)
    weights = sp.csr_matrix((decay ** slot.astype(np.float64), (rows, recent[rows, slot])), shape=(len(eval), sim.shape[0]))
    return _fill(_sparse_topk(weights @ sim, k), popularity_order(fit, num_titles), k)


def own_last(history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, k: int = 20) -> np.ndarray:
    """The student's own previous titles, most recent first."""
    recent = _own_recent(history, eval, num_titles, k)
    return _fill(recent, popularity_order(_fit_rows(history, eval), num_titles), k)


def classmates_recent(
    history: pd.DataFrame,
    eval: pd.DataFrame,
    num_titles: int,
    k: int = 20,
    days: float = 2.0,
    max_pairs: int = 4_000_000,
    lagged: bool = False,
) -> np.ndarray:
    """Titles read by classmates (same classroom, other students) in ``[t - days, t)``.

    Ranked by how many reads in the window, then the latest read, then id. ``max_pairs`` bounds
    the memory of one chunk of (interaction, window row) pairs. ``lagged=True`` counts a read only
    once the classmate's next read is strictly before ``t``: what the reference STUDY mask can see.
    """
    context = pd.concat([history[list(COLUMNS)], eval[list(COLUMNS)]], ignore_index=True)
    context = context.assign(seen_at=_next_read_time(context))
    context = context[_is_title(context["title_id"].to_numpy(), num_titles)]
    # One sortable int64 key per row: classroom code, then time.
    rooms, room_ids = pd.factorize(
        np.concatenate([context["classroom"].to_numpy(), eval["classroom"].to_numpy()]), sort=True
    )
    times = np.concatenate([context["timestamp"].to_numpy(), eval["timestamp"].to_numpy()]).astype(np.int64)
    t0 = times.min(initial=0)
    span = times.max(initial=0) - t0 + 1
    if len(room_ids) * span >= 2**62:
        raise ValueError("classroom x time range too large for one int64 key")
    key = rooms * span + (times - t0)
    context_key, query_key = key[: len(context)], key[len(context):]
    order = np.argsort(context_key, kind="stable")
    context_key = context_key[order]
    c_student = context["StudentID"].to_numpy()[order]
    c_title = context["title_id"].to_numpy()[order]
    c_time = context["timestamp"].to_numpy()[order]
    c_seen = context["seen_at"].to_numpy()[order] if lagged else c_time
    q_room = rooms[len(context):]
    q_offset = times[len(context):] - t0
    window = int(days * DAY)
    lo = np.searchsorted(context_key, q_room * span + np.maximum(q_offset - window, 0), side="left")
    hi = np.searchsorted(context_key, query_key, side="left")
    q_student = eval["StudentID"].to_numpy()
    q_time = eval["timestamp"].to_numpy()

    candidates = np.zeros((len(eval), k), np.int32)
    sizes = hi - lo
    total = np.concatenate([[0], np.cumsum(sizes)])
    start = 0
    while start < len(eval):
        end = min(len(eval), max(start + 1, int(np.searchsorted(total, total[start] + max_pairs, side="right")) - 1))
        q = np.arange(start, end)
        size = sizes[q]
        pair_q = np.repeat(q, size)
        pair_row = np.repeat(lo[q] - np.cumsum(size) + size, size) + np.arange(size.sum())
        classmate = (c_student[pair_row] != q_student[pair_q]) & (c_seen[pair_row] < q_time[pair_q])
        pair_q, pair_row = pair_q[classmate], pair_row[classmate]
        candidates[start:end] = _rank_window(pair_q - start, c_title[pair_row], c_time[pair_row], end - start, k)
        start = end
    return _fill(candidates, popularity_order(_fit_rows(history, eval), num_titles), k)


def _next_read_time(events: pd.DataFrame) -> np.ndarray:
    """The time of each row's student's next read (int64 max for their last)."""
    student, time = events["StudentID"].to_numpy(), events["timestamp"].to_numpy().astype(np.int64)
    order = np.lexsort((time, student))
    following = np.full(len(order), np.iinfo(np.int64).max)
    same = student[order][1:] == student[order][:-1]
    following[order[:-1][same]] = time[order][1:][same]
    return following


def classmates_recent_lagged(history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, k: int = 20, days: float = 2.0) -> np.ndarray:
    """``classmates_recent`` restricted to what the reference STUDY mask can see (the one-step lag)."""
    return classmates_recent(history, eval, num_titles, k, days=days, lagged=True)


def _rank_window(query: np.ndarray, title: np.ndarray, time: np.ndarray, n: int, k: int) -> np.ndarray:
    """int32 [n, k]: per query, titles by (count desc, latest read desc, id)."""
    order = np.lexsort((time, title, query))
    query, title, time = query[order], title[order], time[order]
    last = np.ones(len(query), dtype=bool)  # last row of each (query, title) group has its max time
    last[:-1] = (query[1:] != query[:-1]) | (title[1:] != title[:-1])
    ends = np.flatnonzero(last)
    counts = np.diff(np.concatenate([[-1], ends]))
    gq, gt, glatest = query[ends], title[ends], time[ends]
    rank_order = np.lexsort((gt, -glatest, -counts, gq))
    gq, gt = gq[rank_order], gt[rank_order]
    starts = np.searchsorted(gq, np.arange(n))
    rank = np.arange(len(gq)) - starts[gq]
    top = rank < k
    out = np.zeros((n, k), np.int32)
    out[gq[top], rank[top]] = gt[top]
    return out


BASELINES: dict[str, Baseline] = {
    "popularity": popularity,
    "popularity_by_grade": popularity_by_grade,
    "knn": knn,
    "classmates_recent": classmates_recent,
    "classmates_recent_lagged": classmates_recent_lagged,
    "own_last": own_last,
}


def recommend_baseline(
    name: str, history: pd.DataFrame, eval: pd.DataFrame, num_titles: int, k: int = 20, **kw
) -> np.ndarray:
    """``topk: int32 [len(eval), k]`` from the baseline ``name`` of :data:`BASELINES`."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    _check(history, "history")
    _check(eval, "eval")
    _check_sorted(eval)
    return BASELINES[name](history, eval, num_titles, k, **kw)
