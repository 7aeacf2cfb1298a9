"""Loading and validating the reference file formats (spec §1).

Three tables, CSV (or Parquet) files:

- activity: ``StudentID, SHLF_NUM, Date[, Seconds Read]``, one row per interaction;
- student info: ``StudentID, OrgnID, GRADE_LVL_NBR``;
- school info: ``OrgnID, Parent_Building_ID``.

Every problem raises :class:`DataError` naming the file, the line (header = line 1) and the column.
Every row that is dropped or set aside is counted in a ``logging`` warning on ``studyrec.data``.
All checks are vectorised; per-row Python only runs on the error path, to find a physical line.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

logger = logging.getLogger("studyrec.data")

ACTIVITY_COLUMNS = ("StudentID", "SHLF_NUM", "Date")
SECONDS_READ = "Seconds Read"
STUDENT_INFO_COLUMNS = ("StudentID", "OrgnID", "GRADE_LVL_NBR")
SCHOOL_INFO_COLUMNS = ("OrgnID", "Parent_Building_ID")
SOURCE_FILES = "source_files"

_PARQUET_SUFFIXES = (".parquet", ".pq")
_MIN_DATE = pd.Timestamp("1900-01-01", tz="UTC")
_END_DATE = pd.Timestamp("2201-01-01", tz="UTC")  # exclusive: 2200-12-31 is the last valid day
_INT64_MAX = str(np.iinfo(np.int64).max)
_DATE_HELP = "expected YYYY-MM-DD or an ISO datetime"
_INT32 = np.iinfo(np.int32)


class DataError(ValueError):
    """A problem in an input file, as ``path:line: column 'name': what is wrong; how to fix it``.

    ``line`` is the physical CSV line (header = 1); Parquet files get ``row`` (1-based data row).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        problem: str,
        *,
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
    ):
        self.path, self.line, self.row, self.column = str(path), line, row, column
        where = self.path
        if line is not None:
            where += f":{line}"
        elif row is not None:
            where += f": row {row}"
        col = f" column '{column}':" if column else ""
        super().__init__(f"{where}:{col} {problem}")


@dataclass
class _Table:
    """One file's raw columns (strings for CSV) and how to point at its rows."""

    path: Path
    frame: pd.DataFrame
    is_csv: bool

    def error(self, row: int, column: str | None, problem: str) -> DataError:
        """A DataError at 0-based data ``row``: a physical line for CSV, a 1-based row for Parquet."""
        if self.is_csv:
            return DataError(self.path, problem, line=_csv_lines(self.path, [row])[row], column=column)
        return DataError(self.path, problem, row=row + 1, column=column)

    def where(self, row: int) -> str:
        return f"line {_csv_lines(self.path, [row])[row]}" if self.is_csv else f"row {row + 1}"


@dataclass
class _Problem:
    """The first bad row of a column (0-based data row) and how many rows share the problem."""

    row: int
    column: str
    what: str
    count: int = 1

    def raise_from(self, table: _Table) -> None:
        more = f" ({self.count - 1} more bad rows in this column)" if self.count > 1 else ""
        raise table.error(self.row, self.column, self.what + more)


def _raise_first(table: _Table, problems: Sequence[_Problem | None]) -> None:
    found = [p for p in problems if p is not None]
    if found:
        min(found, key=lambda p: p.row).raise_from(table)


# --- reading -----------------------------------------------------------------------------------------


def _csv_records(path: Path):
    """Yields (first physical line, fields) per data record, skipping blank lines like the parser."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        last = reader.line_num
        for fields in reader:
            start, last = last + 1, reader.line_num
            if fields:
                yield start, fields


def _csv_lines(path: Path, rows: Sequence[int]) -> dict[int, int]:
    """Maps 0-based data rows to 1-based physical lines (quoted newlines and blank lines counted)."""
    wanted, out = set(int(r) for r in rows), {}
    for i, (line, _) in enumerate(_csv_records(path)):
        if i in wanted:
            out[i] = line
            if len(out) == len(wanted):
                break
    for r in wanted - out.keys():  # not reached by the scan: fall back to the simple count
        out[r] = r + 2
    return out


def _csv_header(path: Path, strip: bool = True) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return [h.strip() if strip else h for h in next(csv.reader(f), [])]


def _categorical(column: pa.ChunkedArray) -> pd.Categorical:
    """A dictionary-encoded Arrow column as a pandas Categorical, without materialising its values."""
    column = column.unify_dictionaries()
    if column.num_chunks == 0:
        return pd.Categorical.from_codes(np.zeros(0, np.int32), categories=pd.Index([], dtype=object))
    codes = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks])
    categories = pd.Index(column.chunk(0).dictionary.to_numpy(zero_copy_only=False), dtype=object)
    return pd.Categorical.from_codes(codes, categories=categories)


def _read_csv_categorical(path: Path, integers: Sequence[str] = ()) -> pd.DataFrame:
    """Every field as a string, dictionary-encoded while Arrow parses (on all cores): columns come
    back as Categoricals, so validation and reordering touch each distinct value once.

    Columns named in ``integers`` (many distinct values, such as StudentID) are parsed as int64
    instead; if any of their fields is not a plain integer, the file is read again all as strings,
    so that the validators can name the bad field.
    """
    names = _csv_header(path, strip=False)
    as_int = [n for n in names if n.strip() in integers]
    types = {n: pa.int64() if n in as_int else pa.dictionary(pa.int32(), pa.string()) for n in names}
    read = pa_csv.ReadOptions(column_names=names, skip_rows=1)
    try:
        table = pa_csv.read_csv(
            path, read_options=read, convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False)
        )
        if any(table.column(n).null_count for n in as_int):
            raise pa.ArrowInvalid("missing integers")
    except pa.ArrowInvalid:
        if not as_int:
            raise
        return _read_csv_categorical(path)
    columns = {
        i: table.column(i).to_numpy() if name in as_int else _categorical(table.column(i)) for i, name in enumerate(names)
    }
    frame = pd.DataFrame(columns)
    frame.columns = names
    return frame


def _diagnose_csv(path: Path, exc: Exception) -> DataError:
    """Turns a parser failure into a DataError that points at a line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return DataError(path, f"is not valid UTF-8 (byte {data[e.start]:#04x}); re-save the file as UTF-8", line=line)
    width = len(_csv_header(path))
    for line, fields in _csv_records(path):
        if len(fields) != width:
            return DataError(
                path,
                f"this row has {len(fields)} fields but the header has {width}; "
                "quote fields that contain commas, and use one delimiter throughout",
                line=line,
            )
    return DataError(path, f"cannot be parsed as CSV: {exc}")


def _read_table(
    path: str | os.PathLike, required: Sequence[str], integers: Sequence[str] = (), optional: Sequence[str] = ()
) -> _Table:
    """Reads one file (CSV fields as strings, but ``integers`` columns as int64 when they all are); checks existence, emptiness and columns.

    ``optional`` names columns that are read when present, so that they must not be duplicated either.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, f"file not found (resolved to {path.resolve()})")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a CSV or Parquet file")
    if path.stat().st_size == 0:
        raise DataError(path, f"file is empty (0 bytes); expected a header line '{','.join(required)}' and data rows")
    is_csv = path.suffix.lower() not in _PARQUET_SUFFIXES
    try:
        if is_csv:
            _check_unique_columns(path, _csv_header(path, strip=False), (*required, *optional), is_csv)
            frame = _read_csv_categorical(path, integers)
        else:
            _check_unique_columns(path, pq.read_schema(path).names, (*required, *optional), is_csv)
            frame = pd.read_parquet(path)
    except DataError:
        raise
    except Exception as e:
        if not is_csv:
            raise DataError(path, f"cannot be read as Parquet: {e}") from e
        # a wrong delimiter or header explains a parse failure best, so check the header first
        _check_columns(path, _csv_header(path), required, is_csv)
        raise _diagnose_csv(path, e) from e
    frame.columns = [str(c).strip().lstrip("\ufeff") for c in frame.columns]
    _check_columns(path, list(frame.columns), required, is_csv)
    if len(frame) == 0:
        raise DataError(path, "has a header but no data rows", line=1 if is_csv else None)
    return _Table(path, frame, is_csv)


def _check_unique_columns(path: Path, raw_names: Sequence[str], used: Sequence[str], is_csv: bool) -> None:
    """Raises when a column the loader reads is named twice, or twice up to case (which one is meant?).

    Names are compared without surrounding spaces, as they are read; repeats among the columns that are
    not read (such as the empty names of trailing commas) are harmless and allowed.
    """
    names = [str(n).strip().lstrip("\ufeff") for n in raw_names]
    for column in used:
        positions = [i for i, n in enumerate(names) if n.casefold() == column.casefold()]
        if len(positions) < 2 or column not in (names[i] for i in positions):
            continue
        listed = " and ".join(f"{raw_names[i]!r} (column {i + 1})" for i in positions)
        source = "header" if is_csv else "schema"
        if len({names[i] for i in positions}) > 1:
            what = f"the {source} has {listed}, which differ only by case, so it is unclear which one holds '{column}'"
        else:
            times = "twice" if len(positions) == 2 else f"{len(positions)} times"
            what = f"the {source} names column '{column}' {times}: {listed}"
            if len({raw_names[i] for i in positions}) > 1:
                what += " (surrounding spaces are ignored)"
        raise DataError(
            path,
            f"{what}; rename or remove the extra column(s) so that '{column}' appears once",
            line=1 if is_csv else None,
            column=column,
        )


def _check_columns(path: Path, found: list[str], required: Sequence[str], is_csv: bool) -> None:
    """Raises when a required column is missing, with a hint for a wrong delimiter or case."""
    missing = [c for c in required if c not in found]
    if not missing:
        return
    hint = ""
    if len(found) == 1:
        for sep, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
            if sep in found[0]:
                hint = f"; the header looks {name}-separated: save the file with commas as separators"
                break
    lower = {c.lower(): c for c in found}
    renames = [f"'{lower[c.lower()]}' -> '{c}'" for c in missing if c.lower() in lower]
    if renames:
        hint += f"; column names are case-sensitive: rename {', '.join(renames)}"
    names = ", ".join(f"'{c}'" for c in missing)
    raise DataError(
        path,
        f"missing required column(s) {names}; found columns {found}{hint}",
        line=1 if is_csv else None,
        column=missing[0],
    )


# --- column parsers: each returns values and the first problem, or None --------------------------


def _first(mask: np.ndarray, column: str, what) -> _Problem | None:
    """The first True row of ``mask`` as a problem; ``what(row)`` describes it."""
    bad = np.flatnonzero(mask)
    if len(bad) == 0:
        return None
    return _Problem(int(bad[0]), column, what(int(bad[0])), len(bad))


def _as_strings(series: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Factorised values: (codes, unique values as strings); a missing value gets code -1.

    A Categorical is used as it is (unused categories are harmless: no row points at them).
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy(), pd.Series(np.asarray(series.cat.categories), dtype=str)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    return codes, pd.Series(np.asarray(uniques), dtype=str)


def _parse_ids(series: pd.Series, column: str, what: str = "id") -> tuple[np.ndarray, _Problem | None]:
    """Non-negative int64 ids from strings (no float round trip) or from an integer column."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return np.zeros(len(series), np.int64), _Problem(0, column, f"expected integer {what}s, found booleans")
    if pd.api.types.is_integer_dtype(series.dtype) and not series.isna().any():
        values = series.to_numpy()
        if values.dtype.kind == "u" and len(values) and values.max() > np.iinfo(np.int64).max:
            p = _first(values > np.iinfo(np.int64).max, column, lambda r: f"{what} {values[r]} is larger than 2^63-1")
            return np.zeros(len(values), np.int64), p
        values = values.astype(np.int64)
        negative = _first(values < 0, column, lambda r: f"{what} {values[r]} is negative; expected a non-negative integer")
        return values, negative
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(values) | (values != np.floor(values)) | (values < 0) | (values >= 2.0**63)
        out = np.where(bad, 0, values).astype(np.int64)
        return out, _first(bad, column, lambda r: f"{what} {float(values[r])} is missing or not a non-negative integer")
    codes, uniques = _as_strings(series)
    text = uniques.str.strip()
    digits = text.str.lstrip("0")
    is_num = text.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool, na_value=False)
    too_big = is_num & ((digits.str.len() > 19) | ((digits.str.len() == 19) & (digits > _INT64_MAX))).to_numpy(bool)
    good = is_num & ~too_big
    numbers = np.zeros(len(uniques), np.int64)
    if good.any():
        numbers[good] = pd.to_numeric(pd.Series(np.asarray(text[good], dtype=object))).to_numpy(np.int64)
    # a trailing -1 slot catches missing values (code -1)
    bad_unique = np.append(~good, True)
    values = np.append(numbers, 0)[codes]

    def describe(row: int) -> str:
        code = codes[row]
        raw = "" if code < 0 else uniques[code]
        if code < 0 or raw.strip() == "":
            return f"missing {what}: every row needs an integer {what}"
        if too_big[code]:
            return f"{what} {raw!r} is larger than 2^63-1"
        if raw.strip().startswith("-") and raw.strip()[1:].isdigit():
            return f"{what} {raw!r} is negative; expected a non-negative integer"
        return f"cannot parse {raw!r} as an integer {what} (expected digits only, e.g. 101)"

    return values, _first(bad_unique[codes], column, describe)


def _parse_titles(series: pd.Series, column: str) -> tuple[pd.Series, _Problem | None]:
    """Titles stay strings exactly as written ('007' stays '007'), as a Categorical; empty means missing."""
    codes, uniques = _as_strings(series)
    blank = np.append(uniques.str.strip().to_numpy() == "", True)
    problem = _first(blank[codes], column, lambda r: "missing title: every row needs a SHLF_NUM")
    values = uniques.to_numpy(dtype=object)
    if uniques.is_unique:
        titles = pd.Categorical.from_codes(codes, categories=pd.Index(values, dtype=object))
    else:  # distinct raw values that print alike (1 and '1' in a Parquet object column)
        titles = pd.Categorical(values[codes])
    return pd.Series(titles), problem


def _seconds_of(parsed: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Seconds since 1970 (floored), whatever the datetime64 unit."""
    values = np.asarray(parsed.tz_convert(None) if parsed.tz is not None else parsed, dtype="datetime64")
    unit, _ = np.datetime_data(values.dtype)
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    return values.astype(np.int64) // per_second


def _parse_dates(series: pd.Series, column: str) -> tuple[np.ndarray, _Problem | None]:
    """int64 seconds since 1970 UTC; a plain date is midnight UTC, aware datetimes convert to UTC."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        uniques = pd.DatetimeIndex(series)
        codes = np.arange(len(series))
        raw = uniques.astype(str)
        missing = np.asarray(uniques.isna())
        parsed = uniques.tz_localize("UTC") if uniques.tz is None else uniques.tz_convert("UTC")
    else:
        codes, raw = _as_strings(series)
        raw = raw.str.strip()
        missing = np.asarray(raw == "")
        parsed = pd.DatetimeIndex(pd.to_datetime(raw, format="ISO8601", utc=True, errors="coerce"))
    unparsed = np.asarray(parsed.isna()) & ~missing
    out_of_range = ~np.asarray(parsed.isna()) & np.asarray((parsed < _MIN_DATE) | (parsed >= _END_DATE))
    seconds = np.zeros(len(parsed) + 1, np.int64)
    ok = ~np.asarray(parsed.isna()) & ~out_of_range
    seconds[:-1][ok] = _seconds_of(parsed[ok])
    bad_unique = np.append(missing | unparsed | out_of_range, True)

    def describe(row: int) -> str:
        code = codes[row]
        if code < 0 or missing[code]:
            return f"missing date ({_DATE_HELP})"
        if unparsed[code]:
            return f"cannot parse {raw[code]!r} as a date ({_DATE_HELP})"
        return f"date {raw[code]!r} is out of range (years 1900 to 2200 are accepted); check the year"

    return seconds[codes], _first(bad_unique[codes], column, describe)


def _parse_numbers(series: pd.Series, column: str) -> tuple[pd.Series, _Problem | None]:
    """A numeric column where empty is allowed (NaN); int64 when every value is a whole number."""
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = pd.to_numeric(series)
        bad = np.zeros(len(series), bool)
    else:
        codes, raw = _as_strings(series)
        numbers = pd.to_numeric(pd.Series(raw.str.strip()), errors="coerce").to_numpy(np.float64)
        blank = np.asarray(raw.str.strip() == "")
        bad = np.append(np.isnan(numbers) & ~blank, False)[codes]
        values = pd.Series(np.append(numbers, np.nan)[codes])
        problem = _first(bad, column, lambda r: f"cannot parse {raw[codes[r]]!r} as a number")
        if problem:
            return values, problem
    arr = values.to_numpy(np.float64, na_value=np.nan)
    if not np.isnan(arr).any() and np.all(arr == np.floor(arr)):
        return pd.Series(arr.astype(np.int64)), None
    return pd.Series(arr), None


def _parse_grades(series: pd.Series, column: str) -> tuple[pd.Series | pd.api.extensions.ExtensionArray, _Problem | None]:
    """Nullable Int64 grades: empty is <NA>, whole-number floats like '3.0' are accepted."""
    values, problem = _parse_numbers(series, column)
    if problem:
        problem.what = problem.what.replace("as a number", "as a grade number (expected an integer such as 3)")
        return values, problem
    arr = values.to_numpy(np.float64, na_value=np.nan)
    frac = ~np.isnan(arr) & (arr != np.floor(arr))
    problem = _first(frac, column, lambda r: f"grade {float(arr[r])} is not a whole number")
    return pd.array(np.where(frac, np.nan, arr), dtype="Float64").astype("Int64"), problem


# --- public loaders ----------------------------------------------------------------------------------


def _load_activity_file(path: str | os.PathLike) -> pd.DataFrame:
    return _activity_table(path)[1]


def _activity_table(path: str | os.PathLike) -> tuple[_Table, pd.DataFrame]:
    """One activity file, raw (to point at lines) and validated, rows in file order."""
    table = _read_table(path, ACTIVITY_COLUMNS, integers=("StudentID",), optional=(SECONDS_READ,))
    frame = table.frame
    ids, p_id = _parse_ids(frame["StudentID"], "StudentID", "StudentID")
    titles, p_title = _parse_titles(frame["SHLF_NUM"], "SHLF_NUM")
    seconds, p_date = _parse_dates(frame["Date"], "Date")
    problems = [p_id, p_title, p_date]
    out = {"StudentID": ids, "SHLF_NUM": titles, "timestamp": seconds}
    if SECONDS_READ in frame.columns:
        read, p_read = _parse_numbers(frame[SECONDS_READ], SECONDS_READ)
        problems.append(p_read)
        out[SECONDS_READ] = read
    _raise_first(table, problems)
    return table, pd.DataFrame(out)


def load_activity(*paths: str | os.PathLike) -> pd.DataFrame:
    """Loads and validates student-activity files (CSV or Parquet), concatenated in argument order.

    Returns:
        A new frame with ``StudentID`` (int64), ``SHLF_NUM`` (a Categorical of str), ``timestamp`` (int64 seconds
        since 1970 UTC) and ``Seconds Read`` when any file has it, stably sorted by
        ``(StudentID, timestamp)`` so that same-time rows keep their file order. ``attrs["source_files"]``
        lists the paths, so that a later check can point at a file and line (see :func:`dates_outside`).
    """
    if not paths:
        raise TypeError("load_activity() needs at least one path")
    frames = [_load_activity_file(p) for p in paths]
    if len(frames) > 1 and any(SECONDS_READ in f for f in frames) and not all(SECONDS_READ in f for f in frames):
        without = [str(p) for p, f in zip(paths, frames) if SECONDS_READ not in f]
        logger.warning(
            "%d file(s) have no '%s' column (%s): their rows get NaN", len(without), SECONDS_READ, ", ".join(without)
        )
    activity = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(frames) > 1:  # concat turns categoricals with different categories into objects
        activity["SHLF_NUM"] = union_categoricals([f["SHLF_NUM"] for f in frames], ignore_order=True)
    order = student_time_order(activity["StudentID"].to_numpy(), activity["timestamp"].to_numpy())
    if order is not None:
        activity = activity.iloc[order].reset_index(drop=True)
    activity.attrs[SOURCE_FILES] = tuple(str(p) for p in paths)
    return activity


def time_window(origin: int) -> tuple[int, int]:
    """The first and last second the model can represent: int32 offsets from ``origin`` (±68 years)."""
    return origin + int(_INT32.min), origin + int(_INT32.max)


def moment_text(seconds: int) -> str:
    """``YYYY-MM-DD``, with the time of day (UTC) when it is not midnight."""
    stamp = pd.Timestamp(int(seconds), unit="s", tz="UTC")
    return stamp.strftime("%Y-%m-%d") if int(seconds) % 86400 == 0 else stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def dates_outside(
    activity: pd.DataFrame, lo: int, hi: int, describe: Callable[[str, int], str], *, before: int | None = None
) -> ValueError | None:
    """The error for the first row, in file order, dated outside ``[lo, hi]``, or None when there is none.

    Only rows before ``before`` count when it is given. ``describe(date, count)`` words the problem for
    a row's date as written, ``count`` rows being outside. The row is found again in the files
    ``load_activity`` read (``attrs["source_files"]``), on this error path only, to name its line; a
    frame built in memory gets its row label instead.
    """
    stamps = activity["timestamp"].to_numpy(np.int64)
    outside = (stamps < lo) | (stamps > hi)
    if before is not None:
        outside &= stamps < before
    count = int(outside.sum())
    if not count:
        return None
    bad_rows = _row_keys(activity.loc[outside])  # a file row is named only if the frame still holds it
    for path in activity.attrs.get(SOURCE_FILES, ()):
        table, frame = _activity_table(path)
        bad = np.flatnonzero(_row_keys(frame).isin(bad_rows))
        if len(bad):
            raw = str(table.frame["Date"].iloc[int(bad[0])]).strip()
            return table.error(int(bad[0]), "Date", describe(raw, count))
    row = int(np.flatnonzero(outside)[0])
    student, stamp = activity["StudentID"].iloc[row], int(activity["timestamp"].iloc[row])
    return ValueError(
        f"activity row {activity.index[row]} (StudentID {student}): column 'Date': {describe(moment_text(stamp), count)}"
    )


def _row_keys(activity: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([activity["StudentID"].to_numpy(), activity["timestamp"].to_numpy()])


def student_time_order(students: np.ndarray, times: np.ndarray) -> np.ndarray | None:
    """The stable order by ``(students, times)``, or None when the rows already are in it."""
    if len(students) < 2:
        return None
    step = np.diff(students)
    if np.all((step > 0) | ((step == 0) & (np.diff(times) >= 0))):
        return None
    t0, span = int(times.min()), int(times.max()) - int(times.min()) + 1
    s0 = int(students.min())
    if int(students.max()) - s0 < (1 << 62) // span:  # one int64 key sorts twice as fast as lexsort
        return np.argsort((students - s0) * span + (times - t0), kind="stable")
    return np.lexsort((times, students))


def _same(a, b) -> bool:
    return bool((pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and a == b))


def _dedupe(table: _Table, frame: pd.DataFrame, key: str, thing: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Collapses exact duplicate rows (counted in a warning and ``attrs``); returns them and the kept mask."""
    dup = frame.duplicated(keep="first").to_numpy()
    n = int(dup.sum())
    if n:
        logger.warning(
            "%s: %d exact duplicate row(s) for %d %s(s) collapsed (first at %s)",
            table.path, n, frame.loc[dup, key].nunique(), thing, table.where(int(np.flatnonzero(dup)[0])),
        )
    kept = frame.loc[~dup].reset_index(drop=True)
    kept.attrs["duplicate_rows"] = n
    return kept, ~dup


def load_student_info(path: str | os.PathLike) -> pd.DataFrame:
    """Loads ``StudentID`` (int64, unique), ``OrgnID`` (int64) and ``GRADE_LVL_NBR`` (nullable Int64).

    Exact duplicate rows are collapsed and counted (``frame.attrs["duplicate_rows"]`` and a
    warning); one student with two different schools or grades raises DataError naming both lines.
    """
    table = _read_table(path, STUDENT_INFO_COLUMNS)
    ids, p_id = _parse_ids(table.frame["StudentID"], "StudentID", "StudentID")
    schools, p_school = _parse_ids(table.frame["OrgnID"], "OrgnID", "school id")
    grades, p_grade = _parse_grades(table.frame["GRADE_LVL_NBR"], "GRADE_LVL_NBR")
    _raise_first(table, [p_id, p_school, p_grade])
    frame = pd.DataFrame({"StudentID": ids, "OrgnID": schools, "GRADE_LVL_NBR": grades})
    kept, mask = _dedupe(table, frame, "StudentID", "student")
    _conflict_in(table, frame.loc[mask], "StudentID", ("OrgnID", "GRADE_LVL_NBR"), "student")
    return kept


def load_school_info(path: str | os.PathLike) -> pd.DataFrame:
    """Loads ``OrgnID`` (int64, unique) and ``Parent_Building_ID`` (int64, the district)."""
    table = _read_table(path, SCHOOL_INFO_COLUMNS)
    schools, p_school = _parse_ids(table.frame["OrgnID"], "OrgnID", "school id")
    parents, p_parent = _parse_ids(table.frame["Parent_Building_ID"], "Parent_Building_ID", "district id")
    _raise_first(table, [p_school, p_parent])
    frame = pd.DataFrame({"OrgnID": schools, "Parent_Building_ID": parents})
    kept, mask = _dedupe(table, frame, "OrgnID", "school")
    _conflict_in(table, frame.loc[mask], "OrgnID", ("Parent_Building_ID",), "school")
    return kept


def _conflict_in(table: _Table, rows: pd.DataFrame, key: str, columns: Sequence[str], thing: str) -> None:
    """Raises for the first ``key`` listed twice with different values, naming both lines.

    ``rows`` is a subset whose index still holds the original 0-based row numbers.
    """
    repeated = rows[key].duplicated(keep="first").to_numpy()
    if not repeated.any():
        return
    second_label = rows.index[int(np.flatnonzero(repeated)[0])]
    value = rows.at[second_label, key]
    first_label = rows.index[int(np.flatnonzero(rows[key].to_numpy() == value)[0])]
    differ = next(c for c in columns if not _same(rows.at[first_label, c], rows.at[second_label, c]))
    a, b = rows.at[first_label, differ], rows.at[second_label, differ]
    raise table.error(
        int(second_label),
        differ,
        f"{thing} {value} is listed again with {differ}={b}, but {table.where(int(first_label))} says "
        f"{differ}={a}; keep one row per {thing}",
    )


def check_students(
    activity: pd.DataFrame,
    student_info: pd.DataFrame,
    *,
    activity_path: str | os.PathLike,
    info_path: str | os.PathLike,
) -> int:
    """Warns once about students with activity but no info (they are kept); returns their count.

    Raises DataError when no student of the activity appears in the info file (likely the wrong file).
    """
    ids = activity["StudentID"].to_numpy()
    known = np.isin(ids, student_info["StudentID"].to_numpy())
    if not known.any():
        raise DataError(
            activity_path,
            f"none of its {len(np.unique(ids))} students appear in {info_path} "
            f"({len(student_info)} students there); is that the student_info file for this activity?",
            column="StudentID",
        )
    n_missing = len(np.unique(ids[~known]))
    if n_missing:
        logger.warning(
            "%d activity rows belong to %d students missing from %s: each gets its own classroom",
            int((~known).sum()), n_missing, info_path,
        )
    return n_missing


def check_schools(
    student_info: pd.DataFrame,
    school_info: pd.DataFrame,
    *,
    info_path: str | os.PathLike,
    school_path: str | os.PathLike,
) -> int:
    """Warns once about students whose school is missing from school_info; returns their count."""
    unknown = ~np.isin(student_info["OrgnID"].to_numpy(), school_info["OrgnID"].to_numpy())
    n = int(unknown.sum())
    if n:
        logger.warning(
            "%d students in %s belong to %d schools missing from %s: their district is unknown",
            n, info_path, len(np.unique(student_info["OrgnID"].to_numpy()[unknown])), school_path,
        )
    return n
