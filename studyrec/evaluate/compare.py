"""Is one model better than another on the same students? A paired bootstrap over students.

``aggregate.csv`` is a mean over students, so the unit that varies between samples of students is
the student: resampling students (the same draw for both models) gives an interval for the
difference of the two macro averages that accounts for both models scoring the same people.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class Difference:
    """``b - a`` for one metric: the observed difference and a central bootstrap interval."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    students: int

    def __str__(self) -> str:
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_difference(
    a: pd.DataFrame,
    b: pd.DataFrame,
    *,
    n: int,
    subset: str = "all",
    metric: str = "Hits_at_N",
    draws: int = 5000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """``b`` minus ``a`` in ``metric`` at ``n`` on ``subset``, from two ``per_student.csv`` tables.

    Raises:
        ValueError: the tables do not score the same students on that subset and n (the
            difference would mix a change of model with a change of students).
    """
    x, y = (_column(t, n, subset, metric, name) for t, name in ((a, "a"), (b, "b")))
    if not x.index.equals(y.index):
        only = x.index.symmetric_difference(y.index)
        raise ValueError(
            f"the two tables score different students on {subset!r} at n={n} "
            f"({len(only)} in one only, e.g. {list(only[:3])}): compare runs on the same data"
        )
    x, y = x.to_numpy(np.float64), y.to_numpy(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(x), (draws, len(x)))
    boots = (y - x)[picks].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return Difference(float(x.mean()), float(y.mean()), float((y - x).mean()), float(low), float(high), len(x))


def _column(table: pd.DataFrame, n: int, subset: str, metric: str, name: str) -> pd.Series:
    rows = table[(table["Evaluation_Type"] == subset) & (table["N_Recommendations"] == n)]
    if rows.empty:
        raise ValueError(f"table {name} has no {subset!r} rows at n={n}")
    return rows.set_index("Student_ID")[metric].sort_index()
