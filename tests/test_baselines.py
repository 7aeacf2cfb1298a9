"""Heuristic baselines: hand cases, brute-force agreement, no leakage, popularity fill."""

import warnings

import numpy as np
import pandas as pd
import pytest

from studyrec.evaluate import BASELINES, recommend_baseline

DAY = 86_400
K = 6  # titles 1..6, <SEP> 7, OOV 8


def _frame(rows):
    frame = pd.DataFrame(rows, columns=["StudentID", "title_id", "timestamp", "classroom", "grade"])
    return frame.astype({"StudentID": "int64", "title_id": "int32", "timestamp": "int64", "classroom": "int64"})


# Students 10, 11 and 13, 14 share classroom 1; 12 is alone in classroom 2.
HISTORY = _frame(
    [
        (10, 1, 0 * DAY, 1, 3), (10, 2, 1 * DAY, 1, 3), (10, 1, 2 * DAY, 1, 3),
        (11, 1, 0 * DAY, 1, 3), (11, 3, 1 * DAY, 1, 3),
        (12, 4, 0 * DAY, 2, 4), (12, 4, 1 * DAY, 2, 4), (12, 4, 2 * DAY, 2, 4), (12, 5, 3 * DAY, 2, 4),
        (12, 8, 3 * DAY, 2, 4),  # OOV: never recommended
    ]
)
EVAL = _frame(
    [
        (10, 5, 10 * DAY, 1, 3), (10, 2, 10 * DAY, 1, 3), (10, 6, 11 * DAY, 1, 3),
        (11, 3, 10 * DAY + 100, 1, 3), (11, 1, 12 * DAY, 1, 3),
        (12, 6, 10 * DAY, 2, 4),
        (13, 4, 11 * DAY + 50, 1, 0),
        (14, 2, 10 * DAY + 300, 1, 9),
    ]
)
POPULAR = [1, 4, 2, 3, 5, 6]  # history counts 3, 3, 1, 1, 1, 0; ties by id


def _run(name, k, history=HISTORY, eval=EVAL, **kw):
    return recommend_baseline(name, history, eval, K, k, **kw).tolist()


def test_popularity():
    assert _run("popularity", 3) == [[1, 4, 2]] * len(EVAL)
    # Fewer titles than k: every title once, then padding.
    assert _run("popularity", 8)[0] == POPULAR + [0, 0]


def test_popularity_by_grade():
    # Grade 3 reads 1,2,1,1,3; grade 4 reads 4,4,4,5; grade 0 and the unseen grade 9 get overall popularity.
    assert _run("popularity_by_grade", 3) == [[1, 2, 3]] * 5 + [[4, 5, 1]] + [[1, 4, 2]] * 2


def test_own_last():
    assert _run("own_last", 4) == [
        [1, 2, 4, 3],  # history 1, 2, 1
        [5, 1, 2, 4],  # own earlier eval row at the same timestamp counts
        [2, 5, 1, 4],
        [3, 1, 4, 2],
        [3, 1, 4, 2],
        [5, 4, 1, 2],  # OOV skipped
        [1, 4, 2, 3],  # no history: popularity
        [1, 4, 2, 3],
    ]


def test_classmates_recent():
    assert _run("classmates_recent", 3) == [
        [1, 4, 2],  # nothing in [8d, 10d)
        [1, 4, 2],
        [2, 3, 1],  # 14 read 2 at 10d+300, 11 read 3 at 10d+100
        [2, 5, 1],  # 10's two reads at 10d, ties by id; 14's later read is hidden
        [2, 4, 6],  # 2 read twice; then the most recent
        [1, 4, 2],  # classroom 2 has no one else
        [2, 6, 3],
        [3, 2, 5],
    ]
    # A window of 1 day hides 10's reads at 10d from 11's read at 12d.
    assert _run("classmates_recent", 3, days=1)[4] == [4, 6, 1]


def test_knn():
    # Co-readers: {1, 2}, {1, 3}, {4, 5}; cosine(1, 2) = cosine(1, 3) = 1/sqrt(2), cosine(4, 5) = 1.
    out = _run("knn", 3)
    assert out[0] == [2, 3, 1]  # recent [1, 2] weighted 1, 0.5
    assert out[1] == [4, 2, 3]  # recent [5, 1, 2]
    assert out[5] == [4, 5, 1]  # recent [5, 4]
    assert out[6] == [1, 4, 2]  # no recent titles: popularity


def _random_data(seed, n_students=12, n_titles=10):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_students):
        for _ in range(rng.integers(0, 6)):
            rows.append((s, rng.integers(1, n_titles + 3), rng.integers(0, 20) * DAY // 2, s % 3, s % 4))
    history = _frame(rows)
    rows = []
    for s in range(n_students):
        times = np.sort(rng.integers(20, 30, rng.integers(1, 7))) * DAY // 2
        for t in times:
            rows.append((s, rng.integers(1, n_titles + 3), t, s % 3, s % 4))
    return history, _frame(rows)


def _brute_context(history, eval, i):
    """Rows interaction i may see: any row before t, and the student's own earlier eval rows."""
    s, t = eval["StudentID"].iat[i], eval["timestamp"].iat[i]
    own_earlier = (eval.index < i) & (eval["StudentID"] == s)
    visible_eval = eval[(eval["timestamp"] < t) | own_earlier]
    return pd.concat([history[history["timestamp"] < t], visible_eval]), s, t


def _brute_recent(history, eval, i, num_titles):
    """The student's distinct earlier titles, most recent first, in chronological order of reads."""
    s, t = eval["StudentID"].iat[i], eval["timestamp"].iat[i]
    own_history = history[(history["StudentID"] == s) & (history["timestamp"] < t)].assign(kind=1)
    own_eval = eval.iloc[:i][eval["StudentID"].iloc[:i] == s].assign(kind=0)
    own = pd.concat([own_eval, own_history]).sort_values(["timestamp", "kind"], kind="stable")
    recent = []
    for title in reversed(own["title_id"].tolist()):
        if 1 <= title <= num_titles and title not in recent:
            recent.append(title)
    return recent


def _fill(cands, popular, k):
    out = []
    for title in list(cands) + list(popular):
        if title not in out:
            out.append(title)
    return (out + [0] * k)[:k]


def _popular(history, num_titles):
    counts = np.bincount(history["title_id"].clip(0, num_titles + 1), minlength=num_titles + 2)[1 : num_titles + 1]
    return sorted(range(1, num_titles + 1), key=lambda t: (-counts[t - 1], t))


def test_own_last_and_classmates_match_brute_force():
    num_titles, k = 10, 6
    history, eval = _random_data(3)
    popular = _popular(history, num_titles)
    own_last = recommend_baseline("own_last", history, eval, num_titles, k)
    classmates = recommend_baseline("classmates_recent", history, eval, num_titles, k, days=3)
    for i in range(len(eval)):
        recent = _brute_recent(history, eval, i, num_titles)
        assert own_last[i].tolist() == _fill(recent, popular, k), i

        context, s, t = _brute_context(history, eval, i)
        window = context[
            (context["classroom"] == eval["classroom"].iat[i])
            & (context["StudentID"] != s)
            & (context["timestamp"] >= t - 3 * DAY)
            & context["title_id"].between(1, num_titles)
        ]
        stats = window.groupby("title_id")["timestamp"].agg(["count", "max"]).reset_index()
        ranked = sorted(zip(stats["title_id"], stats["count"], stats["max"]), key=lambda r: (-r[1], -r[2], r[0]))
        assert classmates[i].tolist() == _fill([r[0] for r in ranked], popular, k), i


def test_lagged_classmates_see_a_read_only_after_the_next_one():
    num_titles, k = 10, 6
    history, eval = _random_data(3)
    popular = _popular(history, num_titles)
    lagged = recommend_baseline("classmates_recent_lagged", history, eval, num_titles, k, days=3)
    events = pd.concat([history, eval], ignore_index=True).sort_values(["StudentID", "timestamp"], kind="stable")
    following = events.groupby("StudentID")["timestamp"].shift(-1)
    seen_at = following.fillna(np.inf).sort_index()
    full = pd.concat([history, eval], ignore_index=True).assign(seen_at=seen_at.to_numpy())
    n_hist = len(history)
    assert (lagged != recommend_baseline("classmates_recent", history, eval, num_titles, k, days=3)).any()
    for i in range(len(eval)):
        s, t = eval["StudentID"].iat[i], eval["timestamp"].iat[i]
        visible = full[(full["timestamp"] < t) & (full.index != n_hist + i)]
        window = visible[
            (visible["classroom"] == eval["classroom"].iat[i])
            & (visible["StudentID"] != s)
            & (visible["timestamp"] >= t - 3 * DAY)
            & (visible["seen_at"] < t)
            & visible["title_id"].between(1, num_titles)
        ]
        stats = window.groupby("title_id")["timestamp"].agg(["count", "max"]).reset_index()
        ranked = sorted(zip(stats["title_id"], stats["count"], stats["max"]), key=lambda r: (-r[1], -r[2], r[0]))
        assert lagged[i].tolist() == _fill([r[0] for r in ranked], popular, k), i


def test_knn_matches_brute_force():
    num_titles, k, last, decay = 10, 5, 3, 0.5
    history, eval = _random_data(4)
    popular = _popular(history, num_titles)
    sets = [set(g[g.between(1, num_titles)]) for _, g in history.groupby("StudentID")["title_id"]]
    co = np.array([[sum(a in r and b in r for r in sets) for b in range(num_titles + 1)] for a in range(num_titles + 1)], float)
    norms = np.sqrt(np.outer(co.diagonal(), co.diagonal()))
    sim = np.divide(co, norms, out=np.zeros_like(co), where=norms > 0)
    np.fill_diagonal(sim, 0)
    out = recommend_baseline("knn", history, eval, num_titles, k, last=last, decay=decay, neighbours=num_titles)
    for i in range(len(eval)):
        recent = _brute_recent(history, eval, i, num_titles)[:last]
        scores = sum((decay**j * sim[title] for j, title in enumerate(recent)), np.zeros(num_titles + 1))
        ranked = [t for t in sorted(range(1, num_titles + 1), key=lambda t: (-scores[t], t)) if scores[t] > 1e-12]
        got, expected = out[i].tolist(), _fill(ranked, popular, k)
        # Equal scores may differ in the last bit between the two sums: compare scores, then the fill.
        assert [round(scores[t], 9) for t in got] == [round(scores[t], 9) for t in expected], i
        assert got[len(ranked):] == expected[len(ranked):], i


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_no_leakage(name):
    rng = np.random.default_rng(7)
    history, eval = _random_data(5)
    # Some history overlaps the scored period: fitted baselines must ignore it.
    history = pd.concat([history, _frame([(1, 3, 26 * DAY // 2, 1, 1), (2, 4, 12 * DAY, 2, 2)])], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = recommend_baseline(name, history, eval, 10, 6)
        for i in rng.choice(len(eval), size=10, replace=False):
            t, s = eval["timestamp"].iat[i], eval["StudentID"].iat[i]
            later = (eval["timestamp"] >= t) & ((eval["StudentID"] != s) | (eval.index >= i))
            changed = eval.copy()
            changed.loc[later, "title_id"] = rng.integers(1, 13, later.sum()).astype(np.int32)
            # Row i's classroom and grade are the query's context; later rows may change them too.
            later_only = later & (eval.index != i)
            changed.loc[later_only, "classroom"] = rng.integers(0, 3, later_only.sum())
            changed.loc[later_only, "grade"] = rng.integers(0, 4, later_only.sum())
            changed_history = history.copy()
            future = history["timestamp"] >= t
            changed_history.loc[future, "title_id"] = rng.integers(1, 13, future.sum()).astype(np.int32)
            again = recommend_baseline(name, changed_history, changed, 10, 6)
            assert again[i].tolist() == base[i].tolist(), (name, i)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_rows_are_distinct_titles(name):
    history, eval = _random_data(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = recommend_baseline(name, history, eval, 10, 8)
    assert out.shape == (len(eval), 8) and out.dtype == np.int32
    assert ((out >= 1) & (out <= 10)).all()  # full rows: never pad, SEP or OOV
    assert all(len(set(row)) == len(row) for row in out.tolist())


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown baseline"):
        recommend_baseline("oracle", HISTORY, EVAL, K)
    with pytest.raises(ValueError, match="sorted"):
        recommend_baseline("popularity", HISTORY, EVAL.iloc[::-1].reset_index(drop=True), K)
    with pytest.raises(ValueError, match="lacks columns"):
        recommend_baseline("popularity", HISTORY.drop(columns="grade"), EVAL, K)
