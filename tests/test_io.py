"""The loaders of studyrec.data.io: reference formats, exact values, and errors that point at a line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studyrec.data.io import (
    DataError,
    check_schools,
    check_students,
    load_activity,
    load_school_info,
    load_student_info,
)

REFERENCE = Path("/work/shared/reference_data")
HEADER = "StudentID,SHLF_NUM,Date,Seconds Read\n"
DAY = 86400


def write(tmp_path: Path, text: str, name: str = "a.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    """The spec's sample files (from shared/reference_data when present, else the same text)."""
    if REFERENCE.is_dir():
        return REFERENCE
    files = {
        "student_activity.csv": HEADER + "139,HB11,2020-12-12,891\n139,HB11,2020-12-30,743\n139,XF15,2020-12-30,887\n"
        "101,PJ08,2020-10-12,797\n186,FN75,2021-03-12,638\n186,LG87,2021-04-12,918\n186,LG87,2021-04-15,691\n"
        "188,GY75,2020-11-10,606\n188,XF15,2021-05-12,758",
        "student_info.csv": "StudentID,OrgnID,GRADE_LVL_NBR\n139,25,3\n101,25,3\n188,25,8\n186,12,12",
        "school_info.csv": "OrgnID,Parent_Building_ID\n25,1\n12,1",
    }
    for name, text in files.items():
        write(tmp_path, text, name)
    return tmp_path


def test_reference_sample_matches_spec_section_12(reference: Path):
    activity = load_activity(reference / "student_activity.csv")
    assert list(activity.columns) == ["StudentID", "SHLF_NUM", "timestamp", "Seconds Read"]
    assert activity["StudentID"].dtype == np.int64 and activity["timestamp"].dtype == np.int64
    assert activity["StudentID"].tolist() == [101, 139, 139, 139, 186, 186, 186, 188, 188]
    assert activity["SHLF_NUM"].tolist() == ["PJ08", "HB11", "HB11", "XF15", "FN75", "LG87", "LG87", "GY75", "XF15"]
    assert activity["timestamp"].tolist() == [
        1602460800, 1607731200, 1609286400, 1609286400, 1615507200, 1618185600, 1618444800, 1604966400, 1620777600,
    ]
    assert activity["Seconds Read"].tolist()[:4] == [797, 891, 743, 887]
    assert activity.index.tolist() == list(range(9))

    info = load_student_info(reference / "student_info.csv")
    assert info.dtypes.tolist() == [np.dtype(np.int64), np.dtype(np.int64), pd.Int64Dtype()]
    assert dict(zip(info["StudentID"], info["GRADE_LVL_NBR"])) == {139: 3, 101: 3, 188: 8, 186: 12}
    schools = load_school_info(reference / "school_info.csv")
    assert schools.to_dict("list") == {"OrgnID": [25, 12], "Parent_Building_ID": [1, 1]}
    assert check_students(activity, info, activity_path="a", info_path="i") == 0
    assert check_schools(info, schools, info_path="i", school_path="s") == 0


def test_plain_date_is_midnight_utc_and_datetimes_keep_seconds(tmp_path: Path):
    path = write(
        tmp_path,
        HEADER + "1,a,2023-01-18,1\n2,a,2023-01-18T08:30:15,1\n3,a,2023-01-18 08:30:15,1\n"
        "4,a,2023-01-18T08:30:15Z,1\n5,a,2023-01-18T08:30:15+02:00,1\n6,a,1969-12-31,1\n",
    )
    ts = load_activity(path)["timestamp"].tolist()
    base = 1674000000
    assert ts == [base, base + 30615, base + 30615, base + 30615, base + 30615 - 7200, -DAY]


def test_huge_student_ids_keep_every_digit(tmp_path: Path):
    ids = [2**31 + 5, 2**53 + 1, 2**63 - 1, 7]
    path = write(tmp_path, HEADER + "".join(f"{i},T,2020-01-0{k + 1},1\n" for k, i in enumerate(ids)))
    out = load_activity(path)
    assert out["StudentID"].dtype == np.int64
    assert sorted(out["StudentID"].tolist()) == sorted(ids)
    info = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n" + "".join(f"{i},{i},3\n" for i in ids), "info.csv")
    assert load_student_info(info)["OrgnID"].tolist() == ids


def test_titles_stay_strings_exactly_as_written(tmp_path: Path):
    path = write(
        tmp_path,
        HEADER + '1,007,2020-01-01,1\n1,NA,2020-01-02,1\n1,"Tom, Jerry",2020-01-03,1\n1,Ünïcødé 読書,2020-01-04,1\n'
        '1,"say ""hi""",2020-01-05,1\n1,1e5,2020-01-06,1\n',
    )
    assert load_activity(path)["SHLF_NUM"].tolist() == ["007", "NA", "Tom, Jerry", "Ünïcødé 読書", 'say "hi"', "1e5"]


def test_sort_is_stable_within_a_day_and_across_files(tmp_path: Path):
    a = write(tmp_path, HEADER + "2,z,2020-01-02,1\n1,c,2020-01-02,1\n1,b,2020-01-01,1\n1,a,2020-01-02,1\n", "a.csv")
    b = write(tmp_path, HEADER + "1,d,2020-01-02,1\n1,e,2020-01-01,1\n", "b.csv")
    out = load_activity(a, b)
    assert out["SHLF_NUM"].tolist() == ["b", "e", "c", "a", "d", "z"]
    assert load_activity(b, a)["SHLF_NUM"].tolist() == ["e", "b", "d", "c", "a", "z"]


def test_seconds_read_is_optional(tmp_path: Path):
    path = write(tmp_path, "Date,SHLF_NUM,StudentID,Extra\n2020-01-01,a,1,x\n")
    out = load_activity(path)
    assert list(out.columns) == ["StudentID", "SHLF_NUM", "timestamp"]


def test_utf8_bom_crlf_and_blank_lines_are_valid(tmp_path: Path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffStudentID,SHLF_NUM,Date\r\n5,ä,2020-01-01\r\n\r\n6,b,2020-01-02\r\n".encode("utf-8"))
    out = load_activity(path)
    assert out["StudentID"].tolist() == [5, 6] and out["SHLF_NUM"].tolist() == ["ä", "b"]


def test_parquet_with_typed_and_string_columns(tmp_path: Path):
    typed = pd.DataFrame(
        {
            "StudentID": np.array([2**62, 3], dtype=np.int64),
            "SHLF_NUM": ["007", "x"],
            "Date": pd.to_datetime(["2020-10-12", "2020-10-12 01:00:00"], format="ISO8601"),
        }
    )
    typed.to_parquet(tmp_path / "t.parquet")
    out = load_activity(tmp_path / "t.parquet")
    assert out["StudentID"].tolist() == [3, 2**62]
    assert out["timestamp"].tolist() == [1602460800 + 3600, 1602460800]
    assert out["SHLF_NUM"].tolist() == ["x", "007"]
    strings = typed.astype(str).assign(StudentID=["-1", "3"])
    strings.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet: row 1: column 'StudentID': .*negative"):
        load_activity(tmp_path / "s.parquet")


BAD_ACTIVITY = [
    # (file text, line, column, a fragment of the message)
    (HEADER + "1,a,2020-01-01,1\n2,b,2020-13-45,1\n", 3, "Date", "cannot parse '2020-13-45' as a date"),
    (HEADER + "1,a,1899-12-31,1\n", 2, "Date", "out of range"),
    (HEADER + "1,a,2201-01-01,1\n", 2, "Date", "out of range"),
    (HEADER + "1,a,,1\n", 2, "Date", "missing date"),
    (HEADER + "1,a,2020-01-01,1\n1.5,a,2020-01-01,1\n", 3, "StudentID", "'1.5'"),
    (HEADER + "abc,a,2020-01-01,1\n", 2, "StudentID", "integer"),
    (HEADER + "1,a,2020-01-01,1\n1,a,2020-01-01,1\n-4,a,2020-01-01,1\n", 4, "StudentID", "negative"),
    (HEADER + "1,a,2020-01-01,1\n,a,2020-01-01,1\n", 3, "StudentID", "missing StudentID"),
    (HEADER + "9223372036854775808,a,2020-01-01,1\n", 2, "StudentID", "larger than 2^63-1"),
    (HEADER + "1,a,2020-01-01,1\n2,,2020-01-01,1\n", 3, "SHLF_NUM", "missing title"),
    (HEADER + "1,   ,2020-01-01,1\n", 2, "SHLF_NUM", "missing title"),
    (HEADER + "1,a,2020-01-01,lots\n", 2, "Seconds Read", "'lots'"),
    # the earliest bad line wins across columns; a quoted newline and a blank line still count
    (HEADER + '1,"two\nlines",2020-01-01,1\n\n1,a,2020-02-30,1\n-1,a,2020-01-01,1\n', 5, "Date", "2020-02-30"),
]


@pytest.mark.parametrize(("text", "line", "column", "fragment"), BAD_ACTIVITY)
def test_bad_activity_rows_name_file_line_and_column(tmp_path: Path, text, line, column, fragment):
    path = write(tmp_path, text, "bad_rows.csv")
    with pytest.raises(DataError) as info:
        load_activity(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: column '{column}': "), message
    assert fragment in message
    assert (info.value.line, info.value.column) == (line, column)


def test_more_bad_rows_are_counted(tmp_path: Path):
    path = write(tmp_path, HEADER + "1,a,x,1\n1,a,y,1\n1,a,2020-01-01,1\n1,a,z,1\n")
    with pytest.raises(DataError, match=r"a\.csv:2: column 'Date': cannot parse 'x'.*\(2 more bad rows"):
        load_activity(path)


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_activity(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty \(0 bytes\)"):
        load_activity(write(tmp_path, "", "empty.csv"))
    with pytest.raises(DataError, match=r"head\.csv:1: has a header but no data rows"):
        load_activity(write(tmp_path, "StudentID,SHLF_NUM,Date\n", "head.csv"))
    with pytest.raises(DataError, match=r"ragged\.csv:3: this row has 4 fields but the header has 3"):
        load_activity(write(tmp_path, "StudentID,SHLF_NUM,Date\n1,a,2020-01-01\n1,a,b,2020-01-01\n", "ragged.csv"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"StudentID,SHLF_NUM,Date\n1,a,2020-01-01\n1,caf\xe9,2020-01-01\n")
    with pytest.raises(DataError, match=r"latin\.csv:3: is not valid UTF-8"):
        load_activity(latin)


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("StudentID;SHLF_NUM;Date", "';'-separated"),
        ("StudentID\tSHLF_NUM\tDate", "tab-separated"),
        ("studentid,SHLF_NUM,date", "case-sensitive: rename 'studentid' -> 'StudentID', 'date' -> 'Date'"),
        ("StudentID,Title,Date", "found columns ['StudentID', 'Title', 'Date']"),
    ],
)
def test_missing_columns_list_what_was_found_with_a_hint(tmp_path: Path, header: str, hint: str):
    sep = ";" if ";" in header else "\t" if "\t" in header else ","
    # the second row would also be ragged as CSV: the header problem is reported first
    path = write(tmp_path, header + f"\n1{sep}a{sep}2020-01-01\n2{sep}a, b{sep}2020-01-02\n", "cols.csv")
    with pytest.raises(DataError) as info:
        load_activity(path)
    message = str(info.value)
    assert message.startswith(f"{path}:1: column '") and "missing required column" in message
    assert hint in message, message


def test_student_info_duplicates_collapse_and_are_counted(tmp_path: Path, caplog):
    path = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n1,10,3\n2,10,\n1,10,3\n1,10,3\n3,11,4.0\n", "info.csv")
    with caplog.at_level(logging.WARNING, logger="studyrec.data"):
        info = load_student_info(path)
    assert info["StudentID"].tolist() == [1, 2, 3]
    assert info["GRADE_LVL_NBR"].tolist()[0] == 3 and info["GRADE_LVL_NBR"].isna().tolist() == [False, True, False]
    assert info.attrs["duplicate_rows"] == 2
    assert "2 exact duplicate row(s) for 1 student(s)" in caplog.text and "line 4" in caplog.text


def test_student_info_conflicts_name_both_lines(tmp_path: Path):
    path = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n1,10,3\n2,10,3\n1,10,3\n2,10,4\n", "info.csv")
    with pytest.raises(DataError) as info:
        load_student_info(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5: column 'GRADE_LVL_NBR': student 2"), message
    assert "line 3" in message and "GRADE_LVL_NBR=4" in message and "GRADE_LVL_NBR=3" in message


def test_student_info_bad_values(tmp_path: Path):
    bad_grade = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n1,10,3\n2,10,K\n", "g.csv")
    with pytest.raises(DataError, match=r"g\.csv:3: column 'GRADE_LVL_NBR': cannot parse 'K'"):
        load_student_info(bad_grade)
    half_grade = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n1,10,3.5\n", "h.csv")
    with pytest.raises(DataError, match=r"h\.csv:2: column 'GRADE_LVL_NBR': grade 3\.5"):
        load_student_info(half_grade)
    no_school = write(tmp_path, "StudentID,OrgnID,GRADE_LVL_NBR\n1,,3\n", "s.csv")
    with pytest.raises(DataError, match=r"s\.csv:2: column 'OrgnID': missing school id"):
        load_student_info(no_school)
    no_grade_column = write(tmp_path, "StudentID,OrgnID\n1,10\n", "c.csv")
    with pytest.raises(DataError, match=r"c\.csv:1: column 'GRADE_LVL_NBR': missing required column"):
        load_student_info(no_grade_column)


def test_school_info_conflict_and_duplicates(tmp_path: Path):
    ok = load_school_info(write(tmp_path, "OrgnID,Parent_Building_ID\n5,1\n5,1\n6,1\n", "ok.csv"))
    assert ok["OrgnID"].tolist() == [5, 6] and ok.attrs["duplicate_rows"] == 1
    with pytest.raises(DataError, match=r"bad\.csv:4: column 'Parent_Building_ID': school 5 .*line 2"):
        load_school_info(write(tmp_path, "OrgnID,Parent_Building_ID\n5,1\n6,1\n5,2\n", "bad.csv"))


def test_check_students_counts_missing_and_rejects_the_wrong_file(tmp_path: Path, caplog):
    activity = pd.DataFrame({"StudentID": np.array([1, 1, 2, 3, 3, 3], np.int64)})
    info = pd.DataFrame({"StudentID": np.array([1, 9], np.int64)})
    with caplog.at_level(logging.WARNING, logger="studyrec.data"):
        assert check_students(activity, info, activity_path="act.csv", info_path="info.csv") == 2
    assert caplog.text.count("missing from info.csv") == 1
    assert "4 activity rows belong to 2 students missing from info.csv: each gets its own classroom" in caplog.text
    with pytest.raises(DataError, match=r"act\.csv: column 'StudentID': none of its 3 students appear in other\.csv"):
        check_students(activity, info.assign(StudentID=[7, 8]), activity_path="act.csv", info_path="other.csv")


def test_check_schools_counts_unknown_schools(caplog):
    info = pd.DataFrame({"StudentID": [1, 2, 3], "OrgnID": [10, 11, 11]})
    schools = pd.DataFrame({"OrgnID": [10], "Parent_Building_ID": [1]})
    with caplog.at_level(logging.WARNING, logger="studyrec.data"):
        assert check_schools(info, schools, info_path="i.csv", school_path="s.csv") == 2
    assert "2 students in i.csv belong to 1 schools missing from s.csv" in caplog.text


@pytest.mark.parametrize("id_range", [5000, 2**62], ids=["one-int64-key", "lexsort-fallback"])
def test_many_unsorted_rows_sort_by_student_then_time(tmp_path: Path, id_range: int):
    """A shuffled daily log comes back in (StudentID, time) order, same-time rows in file order."""
    rng = np.random.default_rng(0)
    n = 50_000
    days = pd.date_range("2023-01-01", periods=140).strftime("%Y-%m-%d").to_numpy()
    frame = pd.DataFrame(
        {
            "StudentID": rng.integers(0, id_range, 500)[rng.integers(0, 500, n)],
            "SHLF_NUM": np.char.add("T", rng.integers(0, 2000, n).astype(str)),
            "Date": days[rng.integers(0, 140, n)],
            "Seconds Read": np.arange(n),  # the file order
        }
    )
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    out = load_activity(path)
    expected = frame.assign(timestamp=pd.to_datetime(frame["Date"]).astype("int64") // 10**9)
    expected = expected.sort_values(["StudentID", "timestamp"], kind="stable")
    assert out["Seconds Read"].tolist() == expected["Seconds Read"].tolist()
    assert out["SHLF_NUM"].tolist() == expected["SHLF_NUM"].tolist()


def test_sorted_input_is_not_reordered_and_titles_are_categorical(tmp_path: Path):
    path = write(tmp_path, HEADER + "1,b,2020-01-01,1\n1,a,2020-01-01,2\n2,b,2020-01-01,3\n")
    out = load_activity(path)
    assert isinstance(out["SHLF_NUM"].dtype, pd.CategoricalDtype)
    assert out["SHLF_NUM"].tolist() == ["b", "a", "b"] and out["Seconds Read"].tolist() == [1, 2, 3]
    assert (out["SHLF_NUM"] == "b").tolist() == [True, False, True]
