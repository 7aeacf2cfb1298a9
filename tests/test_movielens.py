"""MovieLens-100k conversion, on a tiny fake RecBole wheel (no network), plus one real download (slow)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studyrec.data import movielens
from studyrec.data.generate import write
from studyrec.data.io import check_students, load_activity, load_school_info, load_student_info

WEEK = 7 * 86400
T0 = 880_000_000  # 1997-11-20T04:26:40Z

# 3 users; user 3 has a Canadian zip code. Ten ratings one week apart, the last two 1 s apart.
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t{r}\t{t}\n"
    for u, i, r, t in [
        (1, "050", 5, T0),
        (2, "7", 3, T0 + WEEK),
        (3, "7", 4, T0 + 2 * WEEK),
        (1, "7", 1, T0 + 3 * WEEK),
        (2, "12", 2, T0 + 4 * WEEK),
        (3, "12", 5, T0 + 5 * WEEK),
        (1, "9", 4, T0 + 6 * WEEK),
        (2, "9", 4, T0 + 7 * WEEK),
        (3, "9", 4, T0 + 8 * WEEK + 1),
        (1, "12", 4, T0 + 8 * WEEK),
    ]
)
USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t17\tF\tstudent\t94043\n2\t25\tM\tother\t05201\n3\t56\tM\twriter\tT8H1N\n"
)


def fake_wheel(path: Path, members: dict[str, str] | None = None) -> Path:
    members = members or {
        "recbole/dataset_example/ml-100k/ml-100k.inter": INTER,
        "recbole/dataset_example/ml-100k/ml-100k.user": USER,
        "recbole/dataset_example/ml-100k/ml-100k.item": "item_id:token\tmovie_title:token_seq\n7\tnot read\n",
        "recbole/__init__.py": "",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_read_atomic_strips_types_and_keeps_strings():
    frame = movielens.read_atomic("a:token\tb:float\n007\t1.5\n")
    assert list(frame.columns) == ["a", "b"] and frame["a"].tolist() == ["007"]


def test_convert_maps_users_items_times_schools_and_grades(tmp_path: Path):
    inter, users = movielens.read_wheel(fake_wheel(tmp_path / movielens.WHEEL_NAME))
    data = movielens.convert(inter, users)
    # the fewest whole weeks holding >= 10% of 10 ratings is 1 week: the last 2 ratings
    assert len(data.valid) == 2 and len(data.train) == 8
    assert data.train["Date"].iloc[0] == "1997-11-20T04:26:40Z"
    assert data.valid["Date"].min() > data.train["Date"].max()
    assert data.train["SHLF_NUM"].iloc[0] == "050"
    info = data.student_info.set_index("StudentID")
    assert info["GRADE_LVL_NBR"].to_dict() == {1: 1, 2: 3, 3: 7}
    assert info["OrgnID"].to_dict() == {1: 2, 2: 1, 3: 3}  # regions '0' < '9' < 'T'
    assert data.school_info.to_dict("list") == {"OrgnID": [1, 2, 3], "Parent_Building_ID": [1, 1, 1]}
    three_weeks = movielens.convert(inter, users, valid_weeks=3)
    assert len(three_weeks.valid) == 4


def test_converted_files_load_with_exact_timestamps(tmp_path: Path):
    inter, users = movielens.read_wheel(fake_wheel(tmp_path / "w.whl"))
    paths = write(movielens.convert(inter, users), tmp_path / "out")
    activity = load_activity(paths["train"], paths["valid"])
    expected = inter.assign(user_id=inter["user_id"].astype(np.int64), timestamp=inter["timestamp"].astype(np.int64))
    expected = expected.sort_values(["user_id", "timestamp"], kind="stable")
    assert activity["StudentID"].tolist() == expected["user_id"].tolist()
    assert activity["timestamp"].tolist() == expected["timestamp"].tolist()
    assert activity["SHLF_NUM"].tolist() == expected["item_id"].tolist()
    info = load_student_info(paths["student_info"])
    assert check_students(activity, info, activity_path=paths["train"], info_path=paths["student_info"]) == 0
    assert len(load_school_info(paths["school_info"])) == 3


def test_read_wheel_names_a_missing_member(tmp_path: Path):
    wheel = fake_wheel(tmp_path / "w.whl", {"recbole/dataset_example/ml-100k/ml-100k.inter": INTER})
    with pytest.raises(RuntimeError, match="ml-100k.user"):
        movielens.read_wheel(wheel)


def test_download_uses_the_cache_without_pip(tmp_path: Path, monkeypatch):
    cached = fake_wheel(tmp_path / movielens.WHEEL_NAME)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert movielens.download_wheel(tmp_path) == cached


def test_download_failure_is_a_clear_runtime_error(tmp_path: Path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and movielens.RECBOLE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)could not download recbole==1\.2\.1.*No matching distribution"):
        movielens.download_wheel(tmp_path / "cache")
    assert not (tmp_path / "cache" / movielens.WHEEL_NAME).exists()


def test_download_puts_the_wheel_in_the_cache(tmp_path: Path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        fake_wheel(Path(cmd[cmd.index("-d") + 1]) / movielens.WHEEL_NAME)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = movielens.download_wheel(tmp_path / "cache")
    assert path == tmp_path / "cache" / movielens.WHEEL_NAME and zipfile.is_zipfile(path)


def test_datasets_cli_with_a_cached_wheel(tmp_path: Path, capsys):
    from experiments.datasets import main

    fake_wheel(tmp_path / movielens.WHEEL_NAME)
    main(["movielens", "--out", str(tmp_path / "ml"), "--cache", str(tmp_path)])
    assert "8 interactions" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "ml" / "student_activity_valid.csv")) == 2


@pytest.mark.slow
def test_real_movielens_100k(tmp_path: Path):
    try:
        data = movielens.movielens_100k()
    except RuntimeError as e:
        pytest.skip(f"no network for pip download: {e}")
    n = len(data.train) + len(data.valid)
    assert n == 100_000 and len(data.student_info) == 943
    assert 0.10 <= len(data.valid) / n <= 0.20
    assert data.train["SHLF_NUM"].nunique() + data.valid["SHLF_NUM"].nunique() > 1600
    paths = write(data, tmp_path)
    assert len(load_activity(paths["train"], paths["valid"])) == 100_000
