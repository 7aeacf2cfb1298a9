"""A seeded synthetic reading dataset with a tunable classroom effect, in the reference CSV schema.

The world: districts hold schools, a school holds one class per grade it teaches (15-30 students),
and each class follows its teacher's reading list, a new title from its grade band every 2-4 days.
On each school day a student reads with probability ``read_prob``. With probability
``classroom_effect`` the title is one of the class's last few assignments (so classmates read the
same titles within days of each other); otherwise it is a re-read of the student's last title with
probability ``reread_prob``, else a Zipf-popular title of the grade band. The last ``valid_weeks``
weeks of the term are the validation split.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, get_type_hints

import numpy as np
import pandas as pd
import tyro

from studyrec.data.atomic import write_atomic

FILE_NAMES = {
    "train": "student_activity_train.csv",
    "valid": "student_activity_valid.csv",
    "student_info": "student_info.csv",
    "school_info": "school_info.csv",
}
GRADES = 12
GRADES_PER_BAND = 3


LibraryOnly = tyro.conf.Suppress
"""Marks a ``GenerateConfig`` field that gets no command-line flag: the world's fine structure, which
keeps its default in ``experiments.generate_data``."""


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of :func:`generate`: the world's size, the term, and the reading behaviour."""

    n_students: int = 1000
    """Number of students (the last class may be smaller than the others)."""
    seed: int = 0
    """Random seed; the same seed gives the same data."""
    classroom_effect: float = 0.7
    """Probability that a reading is one of the class's recent assignments."""
    n_titles: int = 1000
    """Catalogue size, split evenly over the grade bands 1-3, 4-6, 7-9 and 10-12."""
    weeks: int = 20
    """Length of the term in weeks; only Monday to Friday are school days."""
    valid_weeks: int = 4
    """The last weeks of the term, which form the validation split."""
    read_prob: float = 0.3
    """Probability that a student reads on a school day."""
    weekend_read_prob: float = 0.1
    """Probability that a student reads on a Saturday or Sunday."""
    reread_prob: float = 0.2
    """Probability that a reading outside the class list re-reads the student's last title."""
    class_size: Annotated[tuple[int, int], LibraryOnly] = (15, 30)
    """Inclusive range of class sizes."""
    classes_per_school: Annotated[int, LibraryOnly] = 6
    """Classes (distinct grades) per school."""
    schools_per_district: Annotated[int, LibraryOnly] = 4
    """Schools per district."""
    assign_every: Annotated[tuple[int, int], LibraryOnly] = (2, 4)
    """Inclusive range of school days between two assignments of a class."""
    recent_assignments: Annotated[int, LibraryOnly] = 2
    """How many of the latest assignments a class reading picks from."""
    recent_decay: Annotated[float, LibraryOnly] = 0.3
    """Relative weight of each older assignment (the newest has weight 1)."""
    zipf_exponent: Annotated[float, LibraryOnly] = 1.1
    """Popularity skew of titles within a grade band."""
    start: str = "2023-01-09"
    """First day of the term (YYYY-MM-DD)."""

    def validate(self, name: Callable[[str], str] = str) -> None:
        """Raises ValueError naming the first setting that cannot work.

        ``name`` spells a field in the message: the field itself by default, the flag on the
        command line (``experiments.generate_data`` passes ``n_students -> --n-students``).
        """
        if self.n_students < 1:
            raise ValueError(f"{name('n_students')} {self.n_students} must be at least 1")
        if self.n_titles < 4:
            raise ValueError(f"{name('n_titles')} {self.n_titles} must be at least 4 (one title per grade band)")
        if self.weeks < 2:
            raise ValueError(
                f"{name('weeks')} {self.weeks} must be at least 2 (training weeks, then {name('valid_weeks')})"
            )
        if not 1 <= self.valid_weeks < self.weeks:
            between = f"between 1 and {name('weeks')} - 1 = {self.weeks - 1}"
            raise ValueError(f"{name('valid_weeks')} {self.valid_weeks} must be {between}")
        if self.seed < 0:
            raise ValueError(f"{name('seed')} {self.seed} must be 0 or above")
        for field in ("classroom_effect", "read_prob", "weekend_read_prob", "reread_prob"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name(field)} {value} must be a probability in [0, 1]")
        try:
            dt.date.fromisoformat(self.start)
        except ValueError:
            raise ValueError(f"{name('start')} {self.start!r} is not a date; write it as YYYY-MM-DD") from None
        smallest, largest = self.class_size
        if smallest < 1 or smallest > largest or not 1 <= self.classes_per_school <= GRADES:
            size = name("class_size")
            raise ValueError(f"need 1 <= {size}[0] <= {size}[1] and 1 <= {name('classes_per_school')} <= 12")


LIBRARY_ONLY = tuple(
    name for name, hint in get_type_hints(GenerateConfig, include_extras=True).items()
    if LibraryOnly in getattr(hint, "__metadata__", ())
)
"""The ``GenerateConfig`` fields marked ``LibraryOnly``."""

SAMPLE = GenerateConfig(n_students=300, seed=2023, n_titles=400)
"""The settings of the bundled ``sample_data`` (regenerate with :func:`write_sample_data`)."""


@dataclass(frozen=True)
class GeneratedData:
    """Activity splits (``StudentID, SHLF_NUM, Date, Seconds Read``) and the two info tables."""

    train: pd.DataFrame
    valid: pd.DataFrame
    student_info: pd.DataFrame
    school_info: pd.DataFrame


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return np.cumsum(weights) / weights.sum()


def generate(config: GenerateConfig) -> GeneratedData:
    """Generates one school term of reading activity; deterministic for a given ``config.seed``.

    Raises ValueError (from :meth:`GenerateConfig.validate`) for settings that cannot work.
    """
    config.validate()
    rng = np.random.default_rng(config.seed)
    n_bands = GRADES // GRADES_PER_BAND
    per_band = max(1, config.n_titles // n_bands)

    # classes, schools and districts
    smallest, largest = config.class_size
    sizes = rng.integers(smallest, largest + 1, size=config.n_students // smallest + 1)
    bounds = np.cumsum(sizes)
    class_of = np.searchsorted(bounds, np.arange(config.n_students), side="right")
    n_classes = int(class_of.max()) + 1
    school_of_class = np.arange(n_classes) // config.classes_per_school
    n_schools = int(school_of_class.max()) + 1
    grade_order = np.argsort(rng.random((n_schools, GRADES)), axis=1)  # distinct grades per school
    grade_of_class = grade_order[school_of_class, np.arange(n_classes) % config.classes_per_school] + 1
    band_of_class = (grade_of_class - 1) // GRADES_PER_BAND
    district_of_school = np.arange(n_schools) // config.schools_per_district
    student_ids = 100_000 + rng.choice(10 * config.n_students, size=config.n_students, replace=False)
    school_ids = 1000 + np.arange(n_schools)

    # catalogue: a shuffled split of titles into bands; Zipf popularity by rank within a band
    band_titles = rng.permutation(n_bands * per_band).reshape(n_bands, per_band)
    cdf = _zipf_cdf(per_band, config.zipf_exponent)

    # teachers' reading lists: a title every few school days; assignment days increase along a row
    n_days = 7 * config.weeks
    school_day = (dt.date.fromisoformat(config.start).weekday() + np.arange(n_days)) % 7 < 5
    school_days = np.flatnonzero(school_day)
    lo, hi = config.assign_every
    n_assign = len(school_days) // max(lo, 1) + 2
    gaps = rng.integers(lo, hi + 1, size=(n_classes, n_assign))
    nth = np.cumsum(gaps, axis=1) - gaps[:, :1] + rng.integers(0, 2, size=(n_classes, 1))
    assign_day = school_days[np.minimum(nth, len(school_days) - 1)] + n_days * (nth >= len(school_days))
    assign_title = band_titles[band_of_class[:, None], rng.integers(0, per_band, size=(n_classes, n_assign))]

    # reading events, sorted by (student, day); weekends have home reading only
    day_prob = np.where(school_day, config.read_prob, config.weekend_read_prob)
    reads = rng.random((config.n_students, n_days)) < day_prob[None, :]
    student, day = np.nonzero(reads)
    n = len(student)
    cls = class_of[student]
    from_class = rng.random(n) < config.classroom_effect
    reread = ~from_class & (rng.random(n) < config.reread_prob)

    popular = band_titles[band_of_class[cls], np.minimum(np.searchsorted(cdf, rng.random(n)), per_band - 1)]

    stride = 2 * n_days + 1  # larger than any assignment day: keys of two classes never overlap
    flat = (np.arange(n_classes)[:, None] * stride + assign_day).ravel()
    latest = np.searchsorted(flat, cls * stride + day, side="right") - 1 - cls * n_assign
    back_weights = config.recent_decay ** np.arange(config.recent_assignments)
    back = np.searchsorted(np.cumsum(back_weights) / back_weights.sum(), rng.random(n))
    pick = np.maximum(latest - back, 0)
    class_title = assign_title[cls, pick]
    from_class &= latest >= 0  # before the first assignment there is nothing to follow
    title = np.where(from_class, class_title, popular)

    first = np.ones(n, bool)
    first[1:] = student[1:] != student[:-1]
    reread &= ~first & ~from_class
    source = np.maximum.accumulate(np.where(reread, 0, np.arange(n)))
    title = title[source]

    seconds = np.clip(rng.lognormal(6.3, 0.6, size=n), 30, 7200).astype(np.int64)
    dates = (np.datetime64(config.start) + np.arange(n_days)).astype(str)
    title_names = np.array([f"T{i + 1:05d}" for i in range(n_bands * per_band)], dtype=object)

    order = np.lexsort((student, day))  # a daily log: by date, then student
    activity = pd.DataFrame(
        {
            "StudentID": student_ids[student[order]],
            "SHLF_NUM": title_names[title[order]],
            "Date": dates[day[order]],
            "Seconds Read": seconds[order],
        }
    )
    is_valid = day[order] >= n_days - 7 * config.valid_weeks
    student_info = pd.DataFrame(
        {
            "StudentID": student_ids,
            "OrgnID": school_ids[school_of_class[class_of]],
            "GRADE_LVL_NBR": grade_of_class[class_of],
        }
    )
    school_info = pd.DataFrame({"OrgnID": school_ids, "Parent_Building_ID": 1 + district_of_school})
    return GeneratedData(
        train=activity[~is_valid].reset_index(drop=True),
        valid=activity[is_valid].reset_index(drop=True),
        student_info=student_info,
        school_info=school_info,
    )


def write(data: GeneratedData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes the four CSVs atomically into ``out_dir``; returns their paths (keys as FILE_NAMES)."""
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in FILE_NAMES.items()}
    for key, path in paths.items():
        frame: pd.DataFrame = getattr(data, key)
        write_atomic(path, lambda tmp, frame=frame: frame.to_csv(tmp, index=False, lineterminator="\n"))
    return paths


def sample_data_paths() -> dict[str, Path]:
    """Paths of the bundled sample dataset: keys ``train, valid, student_info, school_info``."""
    root = Path(__file__).resolve().parent / "sample_data"
    return {key: root / name for key, name in FILE_NAMES.items()}


def write_sample_data() -> dict[str, Path]:
    """Regenerates the bundled sample dataset from :data:`SAMPLE`."""
    return write(generate(SAMPLE), sample_data_paths()["train"].parent)


def heuristic_hits(data: GeneratedData, window_days: int = 2) -> dict[str, float]:
    """Hits@1 on the validation split of two simple predictors (a calibration check).

    - ``classmates``: the title most read by the student's classmates (same school and grade,
      the student excluded) on the ``window_days`` days before the reading;
    - ``own_last``: the student's own previous title (train history included).
    """
    events = pd.concat([data.train, data.valid], ignore_index=True)
    events["day"] = (pd.to_datetime(events["Date"]).to_numpy().astype("datetime64[D]")).astype(np.int64)
    events["is_valid"] = np.arange(len(events)) >= len(data.train)
    info = data.student_info.set_index("StudentID")
    school, grade = events["StudentID"].map(info["OrgnID"]), events["StudentID"].map(info["GRADE_LVL_NBR"])
    events["cls"] = pd.factorize(pd.MultiIndex.from_arrays([school, grade]))[0]
    events = events.sort_values(["StudentID", "day"], kind="stable").reset_index(drop=True)
    queries = events[events["is_valid"]].reset_index().rename(columns={"index": "row"})

    same = events["StudentID"].shift(1).to_numpy() == events["StudentID"].to_numpy()
    previous = events["SHLF_NUM"].shift(1).where(same)
    own_last = float((previous[queries["row"]].to_numpy() == queries["SHLF_NUM"].to_numpy()).mean())

    # every reading votes for its title on each of the next window_days days
    votes = pd.concat([events.assign(day=events["day"] + k) for k in range(1, window_days + 1)])
    total = votes.groupby(["cls", "day", "SHLF_NUM"]).size().rename("total").reset_index()
    own = votes.groupby(["StudentID", "day", "SHLF_NUM"]).size().rename("own").reset_index()
    cand = queries[["row", "StudentID", "cls", "day"]].merge(total, on=["cls", "day"])
    cand = cand.merge(own, on=["StudentID", "day", "SHLF_NUM"], how="left")
    cand["score"] = cand["total"] - cand["own"].fillna(0)
    cand = cand[cand["score"] > 0].sort_values(["row", "score", "SHLF_NUM"], ascending=[True, False, True])
    best = cand.drop_duplicates("row").set_index("row")["SHLF_NUM"]
    guess = best.reindex(queries["row"]).to_numpy()
    classmates = float((guess == queries["SHLF_NUM"].to_numpy()).mean())
    return {"classmates": classmates, "own_last": own_last, "n_valid": float(len(queries))}
