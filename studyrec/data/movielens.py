"""MovieLens-100k in the reference schema, read from the RecBole 1.2.1 wheel's bundled copy.

Users become students, movies become titles (strings), ratings become interactions at their
timestamp (a full ISO datetime, UTC). A user's "school" is the first character of their zip code
and their "grade" an age band, so classrooms group users by region and age; every school is in
district 1. The last weeks of the log form the validation split.

The MovieLens licence forbids redistribution: the converted files must never be committed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from studyrec.data.generate import GeneratedData

RECBOLE = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
AGE_EDGES = (18, 25, 35, 45, 50, 56)
"""Grade = 1 + number of edges <= age: 1 is under 18, 2 is 18-24, ..., 7 is 56 and over."""
SECONDS_PER_WEEK = 7 * 24 * 3600


def cache_dir() -> Path:
    """Where the downloaded wheel is kept: ``$XDG_CACHE_HOME/studyrec`` or ``~/.cache/studyrec``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "studyrec"


def download_wheel(cache: str | os.PathLike | None = None) -> Path:
    """The RecBole wheel, from the cache or downloaded once with ``pip download --no-deps``.

    Raises:
        RuntimeError: pip could not download it (no network, no index).
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / WHEEL_NAME
    if target.is_file() and zipfile.is_zipfile(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", RECBOLE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if result.returncode != 0 or not wheels:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not download {RECBOLE} with pip (needed for MovieLens-100k); is the network "
                f"or a package index reachable? You can also put {WHEEL_NAME} into {cache}.\n{tail}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        tmp_target = cache / f".{WHEEL_NAME}.part"
        shutil.copyfile(wheels[0], tmp_target)
        os.replace(tmp_target, target)
    return target


def read_atomic(text: str) -> pd.DataFrame:
    """Parses a RecBole atomic file: tab-separated, header fields ``name:type``; all values as strings."""
    frame = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [str(c).split(":", 1)[0] for c in frame.columns]
    return frame


def read_wheel(wheel: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reads only ``ml-100k.inter`` and ``ml-100k.user`` from the wheel (other members untouched)."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        found = {}
        for kind in ("inter", "user"):
            member = f"{MEMBER_DIR}ml-100k.{kind}"
            if member not in names:
                raise RuntimeError(f"{wheel} has no member {member}; is it the {RECBOLE} wheel?")
            found[kind] = read_atomic(zf.read(member).decode("utf-8"))
    return found["inter"], found["user"]


def _auto_valid_weeks(timestamps: np.ndarray, low: float = 0.10, high: float = 0.20) -> int:
    """The fewest whole weeks at the end of the log holding at least ``low`` of the interactions."""
    end = timestamps.max()
    for weeks in range(1, int((end - timestamps.min()) // SECONDS_PER_WEEK) + 1):
        if (timestamps > end - weeks * SECONDS_PER_WEEK).mean() >= low:
            return weeks
    raise ValueError(f"the log is too short to hold out {low:.0%} of it in whole weeks (at most {high:.0%} wanted)")


def convert(inter: pd.DataFrame, users: pd.DataFrame, valid_weeks: int | None = None) -> GeneratedData:
    """Maps MovieLens tables onto the reference schema.

    Arguments:
        inter: columns ``user_id, item_id, timestamp`` (strings or numbers).
        users: columns ``user_id, age, zip_code``.
        valid_weeks: the last weeks of the log that form the validation split; by default the
            fewest weeks holding at least 10% of the interactions.
    """
    ts = pd.to_numeric(inter["timestamp"]).to_numpy(np.float64).astype(np.int64)
    weeks = valid_weeks if valid_weeks is not None else _auto_valid_weeks(ts)
    dates = pd.to_datetime(ts, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    activity = pd.DataFrame(
        {
            "StudentID": pd.to_numeric(inter["user_id"]).to_numpy(np.int64),
            "SHLF_NUM": inter["item_id"].astype(str).to_numpy(dtype=object),
            "Date": np.asarray(dates, dtype=object),
        }
    )
    order = np.argsort(ts, kind="stable")
    activity, ts = activity.iloc[order].reset_index(drop=True), ts[order]
    is_valid = ts > ts.max() - weeks * SECONDS_PER_WEEK

    zips = users["zip_code"].astype(str).str.strip().str.upper()
    first = zips.str[:1].where(zips.str.len() > 0, "?")
    regions = np.sort(first.unique())
    school = np.searchsorted(regions, first.to_numpy()) + 1
    age = pd.to_numeric(users["age"]).to_numpy()
    student_info = pd.DataFrame(
        {
            "StudentID": pd.to_numeric(users["user_id"]).to_numpy(np.int64),
            "OrgnID": school.astype(np.int64),
            "GRADE_LVL_NBR": (np.searchsorted(np.asarray(AGE_EDGES), age, side="right") + 1).astype(np.int64),
        }
    )
    school_info = pd.DataFrame({"OrgnID": np.arange(1, len(regions) + 1, dtype=np.int64), "Parent_Building_ID": 1})
    return GeneratedData(
        train=activity[~is_valid].reset_index(drop=True),
        valid=activity[is_valid].reset_index(drop=True),
        student_info=student_info,
        school_info=school_info,
    )


def movielens_100k(valid_weeks: int | None = None, cache: str | os.PathLike | None = None) -> GeneratedData:
    """Downloads (once) and converts MovieLens-100k; see :func:`convert`."""
    return convert(*read_wheel(download_wheel(cache)), valid_weeks=valid_weeks)
