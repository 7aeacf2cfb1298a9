"""Classroom grouping: which students share a packed row.

| studyrec grouping  | key                      | reference ``--classroom_grouping``            |
|--------------------|--------------------------|-----------------------------------------------|
| ``school_grade``   | (school, grade)          | what ``school_year`` was meant to be           |
| ``district_grade`` | (district, grade)        | ``district_year`` (with its merge bug fixed)   |
| ``grade``          | grade, across schools    | ``school_year`` as the reference really runs   |
| ``none``           | one classroom for all    | ``none``                                       |

A student missing from ``student_info`` (or, for ``district_grade``, whose school is missing
from ``school_info``) gets a classroom of their own.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd

Grouping = Literal["school_grade", "district_grade", "grade", "none"]
GROUPINGS: tuple[str, ...] = ("school_grade", "district_grade", "grade", "none")

logger = logging.getLogger("studyrec.data")


def assign_classrooms(
    students: np.ndarray,
    student_info: pd.DataFrame | None,
    school_info: pd.DataFrame | None = None,
    grouping: Grouping = "school_grade",
) -> tuple[np.ndarray, np.ndarray]:
    """Classroom index (int64, dense from 0) and grade (int32, 0 = unknown) for each student.

    Classrooms are numbered in order of their lowest student, as the reference inserts them.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown classroom grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    students = np.asarray(students, dtype=np.int64)
    frame = pd.DataFrame({"StudentID": students})
    if student_info is not None:
        info = student_info[["StudentID", "OrgnID", "GRADE_LVL_NBR"]].drop_duplicates("StudentID")
        frame = frame.merge(info, on="StudentID", how="left", validate="one_to_one")
    else:
        frame["OrgnID"] = pd.NA
        frame["GRADE_LVL_NBR"] = pd.NA
    grade = pd.to_numeric(frame["GRADE_LVL_NBR"], errors="coerce").round()
    school = pd.to_numeric(frame["OrgnID"], errors="coerce")

    if grouping == "none":
        keys = [pd.Series(np.zeros(len(frame)), index=frame.index)]
    elif grouping == "grade":
        keys = [grade]
    elif grouping == "school_grade":
        keys = [school, grade]
    else:
        if school_info is None:
            raise ValueError("classroom grouping 'district_grade' needs school_info (--school-info)")
        districts = school_info.drop_duplicates("OrgnID").set_index("OrgnID")["Parent_Building_ID"]
        district = pd.to_numeric(school.map(districts), errors="coerce")
        unknown = int((district.isna() & school.notna()).sum())
        if unknown:
            logger.warning("%d students attend schools missing from school_info: each gets its own classroom", unknown)
        keys = [district, grade]

    missing = np.zeros(len(frame), dtype=bool)
    for key in keys:
        missing |= key.isna().to_numpy()
    columns = np.stack([key.fillna(0).to_numpy(dtype=np.float64) for key in keys], axis=1)
    # Students without a key get one of their own, encoded out of the range of real keys.
    singleton = np.where(missing, np.arange(len(frame)), -1)
    table = pd.DataFrame(columns).assign(singleton=singleton)
    classroom, _ = pd.factorize(pd.MultiIndex.from_frame(table), sort=False)
    grades = grade.fillna(0).clip(lower=0).to_numpy(dtype=np.int64).astype(np.int32)
    return classroom.astype(np.int64), grades
