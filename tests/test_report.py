"""experiments.report: hits@n curves and a Markdown table for several runs."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from experiments import report as cli
from studyrec.evaluate.metrics import SUBSETS, aggregate_table

NS = (1, 3, 5, 10, 20)


def _run(path, model, level, wandb_mode=None):
    """A run directory with an aggregate.csv whose hits@n is ``level * n / 20`` on every subset."""
    path.mkdir(parents=True)
    rows = [
        {"Student_ID": s, "Evaluation_Type": subset, "N_Recommendations": n, "Hits_at_N": level * n / 20 + 0.01 * s,
         "NDCG_at_N": level / 2, "MRR": level / 3}
        for n in NS for subset in SUBSETS for s in (1, 2)
    ]
    aggregate_table(pd.DataFrame(rows)).to_csv(path / "aggregate.csv", index=False)
    config = {"model": model}
    if wandb_mode:
        config["config"] = {"wandb": {"mode": wandb_mode, "project": "p"}}
        (path / "wandb_id.txt").write_text("abc123")
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_report_draws_and_tabulates_every_run(tmp_path, capsys):
    study = _run(tmp_path / "study", "study", 0.6)
    knn = _run(tmp_path / "knn", "baseline:knn", 0.3)
    twin = _run(tmp_path / "other" / "study", "study", 0.2)  # same name: labelled apart
    out = tmp_path / "report"
    cli.main([str(study), str(knn), str(twin), "--out", str(out)])

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2.5 * height  # one panel per subset, side by side

    md = (out / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| run | subset | hits@1 | hits@3 | hits@5 | hits@10 | hits@20 | MRR |"
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert len(body) == 3 * len(SUBSETS)
    assert [row[1] for row in body[:3]] == ["all"] * 3 and [row[1] for row in body[-3:]] == ["non_history"] * 3
    labels = {row[0] for row in body}
    assert labels == {"study (study)", "knn (baseline:knn)", "study (study) #2"}
    first = next(row for row in body if row[0] == "study (study)")
    expected = [0.6 * n / 20 + 0.015 for n in NS] + [0.2]
    np.testing.assert_allclose([float(x) for x in first[2:]], expected, atol=5e-5)
    assert "| run | subset |" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))


def test_missing_aggregate_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main([str(tmp_path / "unfinished"), "--out", str(tmp_path / "r")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no aggregate.csv" in err[-1]


def test_wandb_logging_is_optional_and_follows_the_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data):
            calls.append(("log", sorted(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or FakeRun(),
        Table=lambda dataframe: ("table", len(dataframe)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logged = _run(tmp_path / "logged", "study", 0.5, wandb_mode="offline")
    off = _run(tmp_path / "off", "study", 0.5, wandb_mode="disabled")
    plain = _run(tmp_path / "plain", "study", 0.5)

    monkeypatch.setenv("WANDB_MODE", "disabled")  # disabled everywhere: nothing is logged
    cli.main([str(logged), str(off), str(plain), "--out", str(tmp_path / "r1")])
    assert calls == []

    monkeypatch.delenv("WANDB_MODE")
    cli.main([str(logged), str(off), str(plain), "--out", str(tmp_path / "r2")])
    assert [c[0] for c in calls] == ["init", "log", "finish"]  # only the run that was logged offline
    init = calls[0][1]
    assert init["id"] == "abc123" and init["mode"] == "offline" and init["dir"] == str(logged) and init["project"] == "p"
    assert calls[1] == ("log", ["report/comparison"])

    calls.clear()
    cli.main([str(logged), "--out", str(tmp_path / "r3"), "--no-wandb"])
    assert calls == []
