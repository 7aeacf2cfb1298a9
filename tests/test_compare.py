"""Paired bootstrap of two runs' per-student tables."""

import numpy as np
import pandas as pd
import pytest

from studyrec.evaluate.compare import paired_difference


def table(hits: dict[int, float], n: int = 1, subset: str = "all") -> pd.DataFrame:
    return pd.DataFrame(
        {"Student_ID": list(hits), "Evaluation_Type": subset, "N_Recommendations": n, "Hits_at_N": list(hits.values())}
    )


def test_a_constant_gain_on_every_student_has_no_spread():
    rng = np.random.default_rng(0)
    a = dict(enumerate(rng.uniform(0, 0.5, 50)))
    d = paired_difference(table(a), table({s: h + 0.1 for s, h in a.items()}), n=1)
    assert d.diff == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    assert d.students == 50 and d.b - d.a == pytest.approx(0.1)


def test_pairing_and_interval():
    # b helps half the students by 0.2 and leaves the rest: mean +0.1, and the interval covers it
    a = {s: 0.3 for s in range(200)}
    b = {s: 0.3 + (0.2 if s % 2 else 0.0) for s in range(200)}
    d = paired_difference(table(b), table(a), n=1)  # order matters: a minus b here
    assert d.diff == pytest.approx(-0.1)
    assert -0.13 < d.low < -0.1 < d.high < -0.07
    # rows in another order pair by student, not by position
    shuffled = table(b).sample(frac=1.0, random_state=0)
    assert paired_difference(shuffled, table(a), n=1).diff == pytest.approx(-0.1)


def test_other_students_or_missing_rows_are_refused():
    with pytest.raises(ValueError, match="different students"):
        paired_difference(table({1: 0.5, 2: 0.5}), table({1: 0.5, 3: 0.5}), n=1)
    with pytest.raises(ValueError, match="no 'all' rows at n=5"):
        paired_difference(table({1: 0.5}), table({1: 0.5}), n=5)


def test_quality_benchmark_compares_the_runs_it_finds(tmp_path):
    from benchmarks.quality import compare

    students = range(40)
    for name, hit in (("individual", 0.2), ("baseline-own_last", 0.1), ("study", 0.3)):
        (tmp_path / name).mkdir()
        rows = [table({s: hit for s in students}, n=n) for n in (1, 5, 20)]
        pd.concat(rows).to_csv(tmp_path / name / "per_student.csv", index=False)
    (tmp_path / "study-reference").mkdir()  # no per_student.csv yet: skipped
    found = {r["difference (all)"]: r for r in compare(tmp_path, "tiny")}
    assert set(found) == {"individual - own_last", "study - individual"}
    assert found["individual - own_last"]["h@5"] == "+0.1000 [+0.1000, +0.1000]"
    assert found["study - individual"]["data"] == "tiny"
