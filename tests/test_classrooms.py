import numpy as np
import pandas as pd
import pytest

from studyrec.data import assign_classrooms

INFO = pd.DataFrame({
    "StudentID": [1, 2, 3, 4, 5],
    "OrgnID": [10, 10, 20, 20, 30],
    "GRADE_LVL_NBR": pd.array([3, 3, 3, 4, 3], dtype="Int64"),
})
SCHOOLS = pd.DataFrame({"OrgnID": [10, 20, 30], "Parent_Building_ID": [1, 1, 2]})


def groups(classroom):
    return sorted(sorted(np.flatnonzero(classroom == c).tolist()) for c in np.unique(classroom))


def test_school_grade_is_the_default_and_separates_schools():
    room, grade = assign_classrooms(np.array([1, 2, 3, 4, 5]), INFO)
    assert groups(room) == [[0, 1], [2], [3], [4]]
    assert grade.tolist() == [3, 3, 3, 4, 3]


def test_grade_only_is_the_references_literal_grouping():
    room, _ = assign_classrooms(np.array([1, 2, 3, 4, 5]), INFO, grouping="grade")
    assert groups(room) == [[0, 1, 2, 4], [3]]


def test_district_grade_keeps_every_student():
    room, _ = assign_classrooms(np.array([1, 2, 3, 4, 5]), INFO, SCHOOLS, grouping="district_grade")
    assert groups(room) == [[0, 1, 2], [3], [4]]
    with pytest.raises(ValueError, match="school_info"):
        assign_classrooms(np.array([1]), INFO, None, grouping="district_grade")


def test_none_and_missing_students():
    room, _ = assign_classrooms(np.array([1, 2, 9]), INFO, grouping="none")
    assert len(np.unique(room)) == 1
    room, grade = assign_classrooms(np.array([1, 2, 8, 9]), INFO)
    assert groups(room) == [[0, 1], [2], [3]] and grade.tolist() == [3, 3, 0, 0]
    assert room.tolist()[:2] == [0, 0]  # numbered by lowest student
