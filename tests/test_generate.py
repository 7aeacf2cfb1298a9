"""The synthetic generator: determinism, a temporal split, classrooms, and a real classroom effect."""

from __future__ import annotations

import dataclasses
import filecmp
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studyrec.data.generate import (
    FILE_NAMES,
    SAMPLE,
    GenerateConfig,
    generate,
    heuristic_hits,
    sample_data_paths,
    write,
)
from studyrec.data.io import check_schools, check_students, load_activity, load_school_info, load_student_info


@pytest.fixture(scope="module")
def data():
    return generate(GenerateConfig(n_students=400, seed=5))


def test_same_seed_same_data_other_seed_other_data(data):
    again = generate(GenerateConfig(n_students=400, seed=5))
    for name in ("train", "valid", "student_info", "school_info"):
        pd.testing.assert_frame_equal(getattr(data, name), getattr(again, name))
    other = generate(GenerateConfig(n_students=400, seed=6))
    assert not data.train["SHLF_NUM"].equals(other.train["SHLF_NUM"])


def test_schema(data):
    assert list(data.train.columns) == ["StudentID", "SHLF_NUM", "Date", "Seconds Read"]
    assert list(data.student_info.columns) == ["StudentID", "OrgnID", "GRADE_LVL_NBR"]
    assert list(data.school_info.columns) == ["OrgnID", "Parent_Building_ID"]
    assert data.train["SHLF_NUM"].str.fullmatch(r"T\d{5}").all()
    assert data.train["Date"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    assert data.student_info["StudentID"].is_unique and len(data.student_info) == 400
    assert set(data.student_info["OrgnID"]) <= set(data.school_info["OrgnID"])


def test_split_is_temporal_with_the_last_weeks_in_valid(data):
    assert data.valid["Date"].min() > data.train["Date"].max()
    days = pd.to_datetime(pd.concat([data.train["Date"], data.valid["Date"]]))
    first_valid = pd.Timestamp(data.valid["Date"].min())
    assert (days.max() - first_valid).days < 28 and (first_valid - days.min()).days >= 16 * 7 - 2
    assert 0.1 < len(data.valid) / (len(data.train) + len(data.valid)) < 0.3


def test_classes_are_school_grade_groups_of_15_to_30(data):
    info = data.student_info
    assert info["GRADE_LVL_NBR"].between(1, 12).all()
    sizes = info.groupby(["OrgnID", "GRADE_LVL_NBR"]).size()
    assert len(sizes) >= 400 // 30
    assert sizes.max() <= 30 and (sizes.iloc[:-1] >= 15).all()  # only the last class may be short
    assert data.school_info["Parent_Building_ID"].nunique() >= 1


def title_overlap(data) -> tuple[float, float]:
    """Mean number of titles shared by two classmates, and by two students of different classes
    in the same grade band (so that the catalogue alone cannot explain the difference)."""
    activity = pd.concat([data.train, data.valid])
    students, s = np.unique(activity["StudentID"], return_inverse=True)
    _, t = np.unique(activity["SHLF_NUM"], return_inverse=True)
    read = np.zeros((len(students), t.max() + 1))
    read[s, t] = 1.0
    shared = read @ read.T
    info = data.student_info.set_index("StudentID").loc[students]
    cls = pd.factorize(pd.MultiIndex.from_frame(info[["OrgnID", "GRADE_LVL_NBR"]]))[0]
    band = (info["GRADE_LVL_NBR"].to_numpy() - 1) // 3
    same_class = cls[:, None] == cls[None, :]
    same_band = band[:, None] == band[None, :]
    off_diagonal = ~np.eye(len(students), dtype=bool)
    return shared[same_class & off_diagonal].mean(), shared[same_band & ~same_class].mean()


def test_classmates_share_titles_more_than_strangers(data):
    classmates, strangers = title_overlap(data)
    assert classmates > 2.5 * strangers, (classmates, strangers)
    classmates0, strangers0 = title_overlap(generate(GenerateConfig(n_students=400, seed=5, classroom_effect=0.0)))
    assert classmates0 < 1.3 * strangers0, (classmates0, strangers0)


def test_heuristic_hit_rates_follow_the_classroom_effect(data):
    hits = heuristic_hits(data)
    assert 0.28 < hits["classmates"] < 0.5, hits
    assert 0.1 < hits["own_last"] < 0.28, hits
    flat = heuristic_hits(generate(GenerateConfig(n_students=400, seed=5, classroom_effect=0.0)))
    assert flat["classmates"] < hits["classmates"] - 0.15, (flat, hits)


def test_write_round_trips_through_the_loaders(data, tmp_path: Path):
    paths = write(data, tmp_path / "out")
    assert {p.name for p in paths.values()} == set(FILE_NAMES.values())
    activity = load_activity(paths["train"], paths["valid"])
    assert len(activity) == len(data.train) + len(data.valid)
    assert activity["SHLF_NUM"].isin(set(data.train["SHLF_NUM"]) | set(data.valid["SHLF_NUM"])).all()
    info = load_student_info(paths["student_info"])
    assert info["StudentID"].tolist() == data.student_info["StudentID"].tolist()
    assert load_school_info(paths["school_info"])["OrgnID"].tolist() == data.school_info["OrgnID"].tolist()


def test_bundled_sample_loads_is_small_and_is_reproducible(tmp_path: Path):
    paths = sample_data_paths()
    assert set(paths) == {"train", "valid", "student_info", "school_info"}
    assert sum(p.stat().st_size for p in paths.values()) < 1_000_000
    activity = load_activity(paths["train"], paths["valid"])
    info = load_student_info(paths["student_info"])
    schools = load_school_info(paths["school_info"])
    assert check_students(activity, info, activity_path=paths["train"], info_path=paths["student_info"]) == 0
    assert check_schools(info, schools, info_path=paths["student_info"], school_path=paths["school_info"]) == 0
    per_student = activity.groupby("StudentID").size()
    assert 250 <= len(per_student) <= 300 and 20 <= per_student.mean() <= 45
    fresh = write(generate(SAMPLE), tmp_path)
    for key, path in paths.items():
        assert filecmp.cmp(path, fresh[key], shallow=False), f"{path} differs: regenerate with write_sample_data()"


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="classroom_effect"):
        generate(GenerateConfig(n_students=50, classroom_effect=1.5))
    with pytest.raises(ValueError, match="valid_weeks"):
        generate(GenerateConfig(n_students=50, weeks=4, valid_weeks=4))
    with pytest.raises(ValueError, match=r"need 1 <= class_size\[0\]"):
        generate(GenerateConfig(n_students=50, class_size=(20, 10)))
    with pytest.raises(ValueError, match="n_titles 2 must be at least 4"):
        GenerateConfig(n_titles=2).validate()


def test_generate_data_cli_has_one_flag_per_public_generator_setting(capsys):
    from experiments.generate_data import main
    from studyrec.data.generate import LIBRARY_ONLY

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    settings = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(GenerateConfig) if f.name not in LIBRARY_ONLY}
    assert flags == settings | {"--help", "--out", "--check", "--no-check", "--debug", "--no-debug"}
    assert set(LIBRARY_ONLY) <= {f.name for f in dataclasses.fields(GenerateConfig)}


def test_generate_data_cli_writes_and_reports(tmp_path: Path, capsys):
    from experiments.generate_data import main

    main(["--out", str(tmp_path), "--n-students", "60", "--seed", "3", "--no-check"])
    out = capsys.readouterr().out
    assert "student_activity_train.csv" in out and "60 students" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILE_NAMES.values())
    assert len(load_student_info(tmp_path / "student_info.csv")) == 60
