"""Malformed files and flags: exit code 2, one clear ``error:`` line, no traceback, nothing written.

Most cases call ``experiments.train.main`` in-process (the same code path as the command line, minus
the interpreter start); a few representative ones run the real CLI in a subprocess. Odd but valid
input (a BOM, CRLF, unicode and comma-laden titles, '007' next to '7', ids past 2^31 and 2^53) must
train end to end, and a run directory resumed with other flags or data is refused without a change.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.cli import summarise_tyro_error
from experiments.train import main
from studyrec.data.io import DataError, load_activity, load_school_info, load_student_info

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "data" / "bad"
TINY = [
    "--steps", "1", "--arch.num-layers", "1", "--arch.d-model", "16", "--arch.qkv-dim", "16", "--arch.num-heads", "2",
    "--arch.mlp-dim", "32", "--per-device-batch-size", "1", "--eval-rows", "8", "--wandb.mode", "disabled",
]
GOOD = {"train": "activity.csv", "valid": "valid.csv", "students": "students.csv", "schools": "schools.csv"}


def argv(output_dir: Path, *extra: str, **files: str) -> list[str]:
    """A tiny training command on the good fixture files, with some of them swapped for bad ones."""
    chosen = {**GOOD, **files}
    paths = {key: str(BAD / name) if name else None for key, name in chosen.items()}
    args = ["--output-dir", str(output_dir), *TINY]
    for flag, key in (("--train-data", "train"), ("--valid-data", "valid"), ("--student-info", "students"),
                      ("--school-info", "schools")):
        if paths[key]:
            args += [flag, paths[key]]
    return args + list(extra)


def run_main(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The only ``error:`` line of ``err``; fails on a traceback or more than one error."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry's size and time, but the lock file's (a refused resume held the lock while it checked)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
            if p.name != ".lock"}


# (files swapped in, fragments the error line must contain)
BAD_FILES = [
    pytest.param({"train": "missing_column.csv"}, ["missing_column.csv:1:", "column 'Date'", "missing required"],
                 id="missing-column"),
    pytest.param({"train": "renamed_header.csv"}, ["renamed_header.csv:1:", "rename 'studentid' -> 'StudentID'"],
                 id="renamed-header"),
    pytest.param({"train": "empty.csv"}, ["empty.csv:", "file is empty", "expected a header line"], id="empty-file"),
    pytest.param({"valid": "header_only.csv"}, ["header_only.csv:1:", "no data rows"], id="header-only"),
    pytest.param({"train": "semicolon.csv"}, ["semicolon.csv:1:", "';'-separated", "commas as separators"],
                 id="wrong-delimiter"),
    pytest.param({"train": "bad_date.csv"}, ["bad_date.csv:3:", "column 'Date'", "'2023-13-45'", "YYYY-MM-DD"],
                 id="unparseable-date"),
    pytest.param({"train": "future_date.csv"},
                 ["future_date.csv:3:", "column 'Date'", "out of range", "check the year"],
                 id="out-of-range-date"),
    pytest.param({"train": "non_integer_id.csv"}, ["non_integer_id.csv:3:", "column 'StudentID'", "'10x2'"],
                 id="non-integer-id"),
    pytest.param({"train": "negative_id.csv"}, ["negative_id.csv:3:", "column 'StudentID'", "negative"],
                 id="negative-id"),
    pytest.param({"train": "huge_id.csv"}, ["huge_id.csv:3:", "column 'StudentID'", "larger than 2^63-1"],
                 id="id-over-2^63"),
    pytest.param({"train": "missing_title.csv"}, ["missing_title.csv:3:", "column 'SHLF_NUM'", "missing title"],
                 id="nan-title"),
    pytest.param({"train": "unquoted_comma.csv"}, ["unquoted_comma.csv:3:", "5 fields", "quote fields"],
                 id="unquoted-comma"),
    pytest.param({"valid": "not_utf8.csv"}, ["not_utf8.csv:3:", "not valid UTF-8", "re-save"], id="not-utf8"),
    pytest.param({"train": "bad_seconds.csv"}, ["bad_seconds.csv:2:", "column 'Seconds Read'", "'ten'"],
                 id="non-numeric-seconds"),
    pytest.param({"train": "unknown_students.csv"}, ["unknown_students.csv:", "none of its 2 students", "students.csv"],
                 id="no-known-student"),
    pytest.param({"students": "conflicting_grades.csv"},
                 ["conflicting_grades.csv:4:", "GRADE_LVL_NBR", "student 101", "line 2", "one row per student"],
                 id="conflicting-grades"),
    pytest.param({"students": "bad_grade.csv"}, ["bad_grade.csv:3:", "GRADE_LVL_NBR", "'third'", "integer"],
                 id="non-numeric-grade"),
    pytest.param({"students": "students_no_school.csv"}, ["students_no_school.csv:1:", "'OrgnID'"],
                 id="student-info-missing-column"),
    pytest.param({"schools": "schools_bad_parent.csv"}, ["schools_bad_parent.csv:3:", "Parent_Building_ID", "'north'"],
                 id="non-integer-district"),
    pytest.param({"train": "no_such_file.csv"}, ["no_such_file.csv:", "file not found"], id="missing-file"),
]


@pytest.mark.parametrize("files, fragments", BAD_FILES)
def test_bad_file_gives_one_error_line_and_writes_nothing(tmp_path, capsys, files, fragments):
    out = tmp_path / "run"
    code, err = run_main(argv(out, **files), capsys)
    line = error_line(err)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists()


BAD_FLAGS = [
    pytest.param(["--student-chunk-size", "80", "--seq-len", "65"],
                 ["--student-chunk-size 80", "--seq-len 65", "at most 65"], id="chunk-over-seq-len"),
    pytest.param(["--student-chunk-size", "16", "--classmate-chunk-size", "60"],
                 ["--classmate-chunk-size 60", "between 1 and", "= 48"], id="classmate-chunk-leaves-no-room"),
    pytest.param(["--fsdp", "3"], ["--fsdp 3", "8 devices", "[1, 2, 4, 8]"], id="fsdp-not-dividing-devices"),
    pytest.param(["--steps", "0"], ["--steps 0", "at least 1"], id="zero-steps"),
    pytest.param(["--log-every", "0"], ["--log-every 0", "at least 1"], id="zero-log-every"),
    pytest.param(["--per-device-batch-size", "0"], ["--per-device-batch-size 0"], id="zero-batch"),
    pytest.param(["--vocab-size", "-5"], ["--vocab-size -5", "0 to keep every title"], id="negative-vocab"),
    pytest.param(["--arch.num-heads", "3"], ["qkv_dim=16", "num_heads=3"], id="heads-not-dividing-qkv"),
    pytest.param(["--arch.memory-size", "-1"], ["--arch.memory-size -1", "0 for no memory"], id="negative-memory-size"),
    pytest.param(["--arch.memory-days", "0"], ["--arch.memory-days 0.0", "days above 0"], id="zero-memory-days"),
    pytest.param(["--model", "transformer"], ["--model", "unknown model 'transformer'", "study-reference", "register"], id="unknown-model"),
    pytest.param(["huge"], ["huge", "cpu-small"], id="unknown-preset"),
    pytest.param(["--preset", "cpu-small"], ["presets are subcommands", "experiments.train cpu-small"], id="preset-flag-of-old"),
    pytest.param(["--stepz", "3"], ["--stepz", "did you mean --steps?"], id="unknown-flag"),
    pytest.param(["--learning-rate", "fast"], ["--learning-rate", "'fast'"], id="non-numeric-flag"),
]


@pytest.mark.parametrize("extra, fragments", BAD_FLAGS)
def test_bad_flag_gives_one_error_line_and_writes_nothing(tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    code, err = run_main(argv(out, *extra), capsys)
    line = error_line(err)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep me")
    code, err = run_main(argv(out), capsys)
    assert code == 2 and "--output-dir" in error_line(err) and "is a file" in error_line(err)
    assert out.read_text() == "keep me"


def test_output_dir_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    code, err = run_main(argv(blocker / "run"), capsys)
    line = error_line(err)
    assert code == 2 and f"inside {blocker}, which is a file" in line and "choose another directory" in line
    assert blocker.read_text() == "keep me"


def test_tyro_box_becomes_one_line():
    framed = (
        "╭─ Unrecognized options ─────────╮\n"
        "│ Unrecognized options: --stepz, │\n│ 3                              │\n"
        "│ ────────────────────────────── │\n"
        "│ Perhaps you meant:             │\n│     --steps INT                │\n"
        "╰────────────────────────────────╯\n"
    )
    plain = (
        " Unrecognized options  \n -------------------- \n  Unrecognized options: --stepz,\n  3 \n"
        "  --------------------\n  Perhaps you meant:\n      --steps INT\n"
    )
    for box in (framed, plain):
        assert summarise_tyro_error(box) == "Unrecognized options: --stepz, 3; did you mean --steps?"


# --- valid oddities ------------------------------------------------------------------------------------


def test_odd_but_valid_files_load_exactly():
    activity = load_activity(BAD / "odd_activity.csv")
    assert set(activity["StudentID"]) == {101, 102, 3_000_000_000, 9_007_199_254_740_993}  # 2^53 + 1 is exact
    titles = set(activity["SHLF_NUM"])
    assert {"007", "7", "Ünïcödé, vol. 2", 'The "Quoted" One', "📚 Bücher", "a,b,c"} == titles
    offset = activity.loc[activity["timestamp"] % 86400 != 0, "timestamp"].tolist()
    assert offset == [int(pd.Timestamp("2023-01-20T08:00:00Z").timestamp())]
    info = load_student_info(BAD / "odd_students.csv")
    assert info["StudentID"].tolist() == [3_000_000_000, 9_007_199_254_740_993, 101, 102]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory) -> Path:
    """A finished two-step run on the odd files (it doubles as the run that later tests try to resume)."""
    out = tmp_path_factory.mktemp("odd") / "run"
    main(argv(out, "--steps", "2", "--save-every", "1", "--n-recommendations", "1", "3",
              train="odd_activity.csv", valid="odd_valid.csv", students="odd_students.csv", schools="schools.csv"))
    return out


def test_odd_but_valid_files_train_end_to_end(odd_run):
    vocab = json.loads((odd_run / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    assert {"007", "7", "Ünïcödé, vol. 2", 'The "Quoted" One', "📚 Bücher", "a,b,c"} <= set(vocab)
    per_student = pd.read_csv(odd_run / "per_student.csv", dtype={"Student_ID": str})
    assert {"3000000000", "9007199254740993"} <= set(per_student["Student_ID"])
    recommendations = json.loads((odd_run / "recommendations.json").read_text(encoding="utf-8"))
    assert "9007199254740993" in recommendations
    recommended = {t for lists in recommendations.values() for ranking in lists for t in ranking}
    assert recommended <= set(vocab) and recommended & {"Ünïcödé, vol. 2", "a,b,c", "📚 Bücher", "007"}
    assert sorted(p.name for p in (odd_run / "checkpoints").iterdir()) == ["1", "2"]


# --- resuming with other flags or data --------------------------------------------------------------

ODD = dict(train="odd_activity.csv", valid="odd_valid.csv", students="odd_students.csv", schools="schools.csv")
RESUME_MISMATCHES = [
    pytest.param(["--model", "individual"], {}, ["model='study'", "model='individual'", "config.json"],
                 id="model-kind"),
    pytest.param(["--vocab-size", "3"], {}, ["vocab.json holds 8 tokens", "--vocab-size 3", "gives 5"],
                 id="vocab-size"),
    pytest.param([], {"train": "activity.csv", "students": "students.csv"}, ["vocab.json holds 8 tokens", "gives 10"],
                 id="other-training-data"),
    pytest.param(["--arch.d-model", "32", "--arch.qkv-dim", "32"], {},
                 ["shape (1, 16, 16)", "(1, 32, 32)", "config.json"],
                 id="model-sizes"),
    pytest.param(["--grad-clip", "None"], {}, ["optimizer state", "config.json"], id="optimizer-layout"),
]


@pytest.mark.parametrize("extra, files, fragments", RESUME_MISMATCHES)
def test_resume_with_other_settings_is_refused_and_changes_nothing(odd_run, capsys, extra, files, fragments):
    before = snapshot(odd_run)
    code, err = run_main(argv(odd_run, "--steps", "2", "--save-every", "1", *extra, **{**ODD, **files}), capsys)
    line = error_line(err)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in line, line
    assert snapshot(odd_run) == before


def test_damaged_vocab_json_is_refused(odd_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(odd_run, run)
    (run / "vocab.json").write_text('{"oov": "9", "vocab": {"a": ')
    before = snapshot(run)
    code, err = run_main(argv(run, "--steps", "2", **ODD), capsys)
    assert code == 2 and "vocab.json: not a valid vocab.json" in error_line(err)
    assert snapshot(run) == before


# --- the real command line ---------------------------------------------------------------------------


def cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_data_error_exit_code_and_debug_traceback(tmp_path):
    out = tmp_path / "run"
    plain = cli(*argv(out, train="bad_date.csv"))
    assert plain.returncode == 2, plain.stderr
    assert "bad_date.csv:3: column 'Date'" in error_line(plain.stderr)
    assert not out.exists()
    debug = cli(*argv(out, "--debug", train="bad_date.csv"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert not out.exists()


def test_cli_flag_error(tmp_path):
    fsdp = cli(*argv(tmp_path / "run", "--fsdp", "3"), devices=8)
    assert fsdp.returncode == 2 and "--fsdp 3 does not divide the 8 devices" in error_line(fsdp.stderr)
    assert not (tmp_path / "run").exists()


# --- duplicated header columns ------------------------------------------------------------------------


def duplicate_column(source: Path, target: Path, column: str, written_as: str | None = None) -> Path:
    """A copy of ``source`` with ``column`` repeated as its last column, headed ``written_as`` (default: the same)."""
    frame = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    names = [*frame.columns, written_as or column]
    if target.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = [pa.array(frame[name].tolist()) for name in [*frame.columns, column]]
        pq.write_table(pa.Table.from_arrays(arrays, names=names), target)
    else:
        repeated = frame[[*frame.columns, column]]
        repeated.columns = names
        repeated.to_csv(target, index=False)
    return target


def positions_of(path: Path, column: str) -> list[str]:
    """The 'column N' fragments the error must list: every header name equal to ``column`` up to case and spaces."""
    header = next(csv.reader(path.open(encoding="utf-8-sig")))
    return [f"(column {i + 1})" for i, name in enumerate(header) if name.strip().lower() == column.lower()]


LOADERS = [
    pytest.param("activity.csv", "Date", load_activity, id="activity-Date"),
    pytest.param("activity.csv", "Seconds Read", load_activity, id="activity-optional-Seconds-Read"),
    pytest.param("students.csv", "GRADE_LVL_NBR", load_student_info, id="student-info"),
    pytest.param("schools.csv", "OrgnID", load_school_info, id="school-info"),
]


@pytest.mark.parametrize("source, column, loader", LOADERS)
@pytest.mark.parametrize("written_as", [None, " {}", "{} ", "{}"], ids=["same", "leading-space", "trailing-space",
                                                                        "other-case"])
def test_duplicated_header_column_names_file_line_and_positions(tmp_path, source, column, loader, written_as):
    name = written_as.format(column.lower() if written_as == "{}" else column) if written_as else None
    path = duplicate_column(BAD / source, tmp_path / f"dup_{source}", column, name)
    with pytest.raises(DataError) as error:
        loader(path)
    message = str(error.value)
    assert message.startswith(f"{path}:1: column '{column}':"), message
    fragments = positions_of(path, column)
    assert len(fragments) == 2
    for fragment in fragments:
        assert fragment in message, message
    assert "appears once" in message


def test_duplicated_column_in_parquet_names_the_file_and_positions(tmp_path):
    path = duplicate_column(BAD / "activity.csv", tmp_path / "activity.parquet", "Date")
    with pytest.raises(DataError) as error:
        load_activity(path)
    message = str(error.value)
    assert message.startswith(f"{path}: column 'Date':") and "(column 3)" in message and "(column 5)" in message


def test_repeated_columns_that_are_not_read_are_allowed(tmp_path):
    path = tmp_path / "trailing_commas.csv"
    path.write_text("StudentID,SHLF_NUM,Date,,\n101,T1,2023-01-01,,\n101,T2,2023-01-02,,\n")
    assert load_activity(path)["SHLF_NUM"].tolist() == ["T1", "T2"]


DUPLICATED = [  # (file key, fixture, column repeated)
    ("train", "activity.csv", "Date"),
    ("valid", "valid.csv", "SHLF_NUM"),
    ("students", "students.csv", "StudentID"),
    ("schools", "schools.csv", "Parent_Building_ID"),
]


def baselines_argv(out: Path, **files: str) -> list[str]:
    """experiments.baselines on the good fixture files, with some of them swapped (absolute paths)."""
    chosen = {key: str(BAD / name) for key, name in {**GOOD, **files}.items()}
    return ["--baseline", "popularity", "--output-dir", str(out), "--train-data", chosen["train"], "--valid-data",
            chosen["valid"], "--student-info", chosen["students"], "--school-info", chosen["schools"]]


def run_baselines(args: list[str], capsys) -> tuple[int, str]:
    from experiments.baselines import main as baselines_main

    with pytest.raises(SystemExit) as exit_info:
        baselines_main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("key, source, column", DUPLICATED, ids=[d[0] for d in DUPLICATED])
@pytest.mark.parametrize("command", ["train", "baselines"])
def test_duplicated_column_stops_training_and_baselines(tmp_path, capsys, command, key, source, column):
    path = duplicate_column(BAD / source, tmp_path / f"dup_{source}", column)
    out = tmp_path / "run"
    if command == "train":
        code, err = run_main(argv(out, **{key: str(path)}), capsys)
    else:
        code, err = run_baselines(baselines_argv(out, **{key: str(path)}), capsys)
    line = error_line(err)
    assert code == 2, err
    assert f"{path}:1: column '{column}'" in line and "twice" in line, line
    assert not out.exists()


def recommend_argv(run: Path, out: Path, activity: Path, *extra: str, **files: Path) -> list[str]:
    students, schools = files.get("students", BAD / "odd_students.csv"), files.get("schools", BAD / "schools.csv")
    return ["--run", str(run), "--activity", str(activity), "--student-info", str(students), "--school-info",
            str(schools), "--out", str(out), "--k", "2", *extra]


@pytest.fixture
def odd_copy(odd_run, tmp_path) -> Path:
    """A private copy of the odd run, so that recommending from it cannot change what the resume tests see."""
    target = tmp_path / "odd_copy"
    shutil.copytree(odd_run, target)
    return target


def run_recommend(args: list[str], capsys) -> tuple[int, str]:
    from experiments.recommend import main as recommend_main

    with pytest.raises(SystemExit) as exit_info:
        recommend_main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("key, source, column", [("activity", "odd_activity.csv", "StudentID"),
                                                  ("students", "odd_students.csv", "OrgnID"),
                                                  ("schools", "schools.csv", "OrgnID")])
def test_duplicated_column_stops_recommend(odd_copy, tmp_path, capsys, key, source, column):
    path = duplicate_column(BAD / source, tmp_path / f"dup_{source}", column)
    files = {key: path} if key != "activity" else {}
    activity = path if key == "activity" else BAD / "odd_activity.csv"
    out = tmp_path / "recs.csv"
    code, err = run_recommend(recommend_argv(odd_copy, out, activity, **files), capsys)
    line = error_line(err)
    assert code == 2, err
    assert f"{path}:1: column '{column}'" in line and "twice" in line, line
    assert not out.exists()


def test_cli_duplicated_column_exit_code(tmp_path):
    path = duplicate_column(BAD / "activity.csv", tmp_path / "dup.csv", "Date")
    result = cli(*argv(tmp_path / "run", train=str(path)))
    assert result.returncode == 2, result.stderr
    assert f"{path}:1: column 'Date'" in error_line(result.stderr)


# --- dates the model cannot represent (int32 seconds around the time origin) -----------------------------


def with_row(source: Path, target: Path, row: str, line: int) -> Path:
    """A copy of ``source`` with ``row`` inserted as its physical line ``line``."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(line - 1, row + "\n")
    target.write_text("".join(lines), encoding="utf-8")
    return target


FAR_DATES = [  # (file key, fixture, inserted row, its line)
    pytest.param("train", "activity.csv", "102,T9,1901-01-01,5", 4, id="train-1901"),
    pytest.param("train", "activity.csv", "103,T9,2200-01-01,5", 7, id="train-2200"),
    pytest.param("valid", "valid.csv", "101,T9,1901-01-01,5", 6, id="valid-1901"),
]


@pytest.mark.parametrize("key, source, row, line", FAR_DATES)
@pytest.mark.parametrize("command", ["train", "baselines"])
def test_date_far_from_the_rest_names_file_line_and_column(tmp_path, capsys, command, key, source, row, line):
    path = with_row(BAD / source, tmp_path / f"far_{source}", row, line)
    out = tmp_path / "run"
    if command == "train":
        code, err = run_main(argv(out, **{key: str(path)}), capsys)
    else:
        code, err = run_baselines(baselines_argv(out, **{key: str(path)}), capsys)
    message = error_line(err)
    assert code == 2, err
    date = row.split(",")[2]
    assert f"{path}:{line}: column 'Date': date '{date}'" in message, message
    assert "68 years" in message and "drop or correct the row" in message
    assert not out.exists()


def test_second_training_file_is_named(tmp_path, capsys):
    second = with_row(BAD / "valid.csv", tmp_path / "more.csv", "104,T9,1901-01-01,5", 3)
    out = tmp_path / "run"
    args = argv(out) + ["--train-data", str(BAD / "activity.csv"), str(second)]
    code, err = run_main(args, capsys)
    assert code == 2 and f"{second}:3: column 'Date'" in error_line(err), err


def test_a_date_decades_away_loads_and_packs(tmp_path):
    from studyrec.data import dataset
    from studyrec.data.interactions import make_chunks
    from studyrec.data.packing import ClassroomPacker

    path = with_row(BAD / "activity.csv", tmp_path / "old.csv", "102,T9,1990-06-01,5", 4)
    frames = dataset.Frames.load(dataset.DataPaths((str(path),), (str(BAD / "valid.csv"),), None, None))
    origin = dataset.time_origin(frames.train)
    assert origin == int(pd.Timestamp("1990-06-01", tz="UTC").timestamp())
    vocab = dataset.build_vocab(frames, None)
    for frame in (frames.train, frames.valid):
        data = dataset.encode(frame, vocab, frames, "none")
        ClassroomPacker(data, make_chunks(data, 16), 64, vocab.sep, origin)


@pytest.mark.slow
def test_a_date_decades_away_still_trains(tmp_path):
    path = with_row(BAD / "activity.csv", tmp_path / "old.csv", "102,T9,1990-06-01,5", 4)
    out = tmp_path / "run"
    main(argv(out, "--n-recommendations", "1", "3", train=str(path)))
    config = json.loads((out / "config.json").read_text())
    assert config["time_origin"] == int(pd.Timestamp("1990-06-01", tz="UTC").timestamp())


def test_recommend_names_the_far_row_of_its_activity(odd_copy, tmp_path, capsys):
    path = with_row(BAD / "odd_activity.csv", tmp_path / "far.csv", "101,007,1901-01-01,5", 5)
    out = tmp_path / "recs.csv"
    code, err = run_recommend(recommend_argv(odd_copy, out, path), capsys)
    message = error_line(err)
    assert code == 2, err
    assert f"{path}:5: column 'Date': date '1901-01-01'" in message and "time origin 2023-01-01" in message
    assert not out.exists()


def test_recommend_refuses_an_as_of_outside_the_window(odd_copy, tmp_path, capsys):
    out = tmp_path / "recs.csv"
    code, err = run_recommend(recommend_argv(odd_copy, out, BAD / "odd_activity.csv", "--as-of", "1901-01-01"), capsys)
    message = error_line(err)
    assert code == 2 and "as_of '1901-01-01'" in message and "2091-01-19" in message, err


def test_recommend_on_a_frame_names_the_row(odd_copy):
    from studyrec.recommend import load_run

    frame = pd.DataFrame({"StudentID": [101, 101], "SHLF_NUM": ["007", "7"],
                          "timestamp": [int(pd.Timestamp(d, tz="UTC").timestamp()) for d in ("2023-01-02", "2200-01-01")]})
    with pytest.raises(ValueError, match=r"activity row 1 \(StudentID 101\): column 'Date': date '2200-01-01'"):
        load_run(odd_copy).recommend(frame, as_of="2200-06-01")
