"""experiments.baselines: a baseline scored like a model, written as a run directory."""

import json

import pandas as pd
import pytest

from experiments import baselines as cli
from studyrec.data.generate import sample_data_paths
from studyrec.data.io import load_activity
from studyrec.evaluate.metrics import AGGREGATE_COLUMNS, PER_STUDENT_COLUMNS, aggregate_table, score_recommendations


@pytest.fixture(scope="module")
def own_last(tmp_path_factory):
    """own_last in both evaluation contexts, and popularity, on the bundled sample."""
    root = tmp_path_factory.mktemp("baselines")
    for name, extra in (("own_valid", []), ("own_history", ["--eval-context", "history"]), ("popularity", [])):
        baseline = "popularity" if name == "popularity" else "own_last"
        cli.main(["--baseline", baseline, "--output-dir", str(root / name), *extra])
    return root


def _valid_titles() -> dict[int, list[str]]:
    valid = load_activity(sample_data_paths()["valid"])
    return {int(s): list(g["SHLF_NUM"]) for s, g in valid.groupby("StudentID", sort=True)}


def test_writes_a_run_directory_like_a_trained_model(own_last):
    run = own_last / "own_valid"
    assert {p.name for p in run.iterdir()} >= {"config.json", "vocab.json", "per_student.csv", "aggregate.csv", "recommendations.json"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "baseline:own_last" and config["eval_context"] == "valid-only"
    assert config["config"]["data"]["n_recommendations"] == [1, 3, 5, 10, 20]
    per_student = pd.read_csv(run / "per_student.csv")
    aggregate = pd.read_csv(run / "aggregate.csv")
    assert list(per_student.columns) == PER_STUDENT_COLUMNS and list(aggregate.columns) == AGGREGATE_COLUMNS
    pd.testing.assert_frame_equal(aggregate, aggregate_table(per_student))
    assert aggregate["Hits_at_N"].between(0, 1).all() and aggregate["Hits_at_N"].max() > 0.1


def test_scores_agree_with_the_reference_scoring_of_its_recommendations(own_last):
    """Re-scoring recommendations.json with the reference's string-based scorer gives per_student.csv."""
    run = own_last / "own_valid"
    reference = _valid_titles()
    recommendations = {int(s): recs for s, recs in json.loads((run / "recommendations.json").read_text()).items()}
    assert {s: len(r) for s, r in recommendations.items()} == {s: len(t) for s, t in reference.items()}
    assert all(len(rec) == 20 for recs in recommendations.values() for rec in recs)
    expected = score_recommendations(reference, recommendations, [1, 3, 5, 10, 20])
    got = pd.read_csv(run / "per_student.csv")
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_eval_context_decides_what_counts_as_history(own_last):
    """valid-only: a student's first validation read has no history (popularity fills in);
    history: it is preceded by the student's training reads."""
    recs = {name: json.loads((own_last / name / "recommendations.json").read_text()) for name in ("own_valid", "own_history", "popularity")}
    train = load_activity(sample_data_paths()["train"])
    last_train = train.groupby("StudentID")["SHLF_NUM"].last()
    vocab = json.loads((own_last / "own_history" / "vocab.json").read_text())["vocab"]
    firsts_match_train = 0
    for student, lists in recs["own_valid"].items():
        assert lists[0] == recs["popularity"][student][0]
        title = last_train.get(int(student))
        if title in vocab:
            assert recs["own_history"][student][0][0] == title
            firsts_match_train += 1
    assert firsts_match_train > 100
    hits = {name: pd.read_csv(own_last / name / "aggregate.csv").set_index(["Evaluation_Type", "N_Recommendations"]) for name in recs}
    assert hits["own_history"].loc[("all", 20), "Hits_at_N"] > hits["own_valid"].loc[("all", 20), "Hits_at_N"]


@pytest.mark.parametrize("baseline", ["popularity_by_grade", "knn", "classmates_recent"])
def test_other_baselines_run(baseline, tmp_path):
    cli.main(["--baseline", baseline, "--output-dir", str(tmp_path / "{baseline}"), "--n-recommendations", "1", "5"])
    run = tmp_path / baseline
    assert json.loads((run / "config.json").read_text())["model"] == f"baseline:{baseline}"
    aggregate = pd.read_csv(run / "aggregate.csv")
    assert sorted(aggregate["N_Recommendations"].unique()) == [1, 5]
    assert aggregate["Hits_at_N"].between(0, 1).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--baseline", "own_last", "--train-data", "nope.csv"], "nope.csv"),
        (["--baseline", "own_last", "--n-recommendations", "0"], "must be positive"),
        (["--baseline", "magic"], "magic"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--output-dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()
