"""Run.recommend and experiments.recommend: next titles as of a moment, from a trained run."""

import dataclasses
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from test_run import tiny_run_dir

from experiments import recommend as recommend_cli
from studyrec.data.generate import sample_data_paths
from studyrec.data.io import load_activity, load_student_info
from studyrec.data.packing import pack_histories
from studyrec.data.query_rows import QueryHistory, compose_queries, layout_queries
from studyrec.data.memory import ClassroomMemory
from studyrec.models import Individual, Study, StudyReference, memory_options
from studyrec.recommend import as_seconds, last_block, last_block_input, last_layer_attention, load_run

AS_OF = "2023-05-08"
DAY = 86_400
BATCH = 64  # one batch shape for most calls: one compilation


@pytest.fixture(scope="module")
def run():
    return load_run(tiny_run_dir())


@pytest.fixture(scope="module")
def sample():
    paths = sample_data_paths()
    return load_activity(paths["train"], paths["valid"]), load_student_info(paths["student_info"])


def _rows(student, titles, days, start="2023-03-01"):
    t0 = as_seconds(start)
    return pd.DataFrame(
        {"StudentID": np.int64(student), "SHLF_NUM": list(titles), "timestamp": [t0 + d * DAY for d in days]}
    )


def _three_classmates(run):
    """Activity and info of three students of one classroom: titles 1-3 on days 0-2, 4-5 on days 1
    and 3, 6-7 on days 2 and 4 (from 2023-03-01)."""
    titles = [run.vocab.decode(i) for i in range(1, 8)]
    activity = pd.concat(
        [_rows(1, titles[:3], [0, 1, 2]), _rows(2, titles[3:5], [1, 3]), _rows(3, titles[5:7], [2, 4])],
        ignore_index=True,
    )
    info = pd.DataFrame({"StudentID": [1, 2, 3], "OrgnID": [7, 7, 7], "GRADE_LVL_NBR": pd.array([3, 3, 3], "Int64")})
    return activity, info


def test_every_student_gets_k_ranked_titles(run, sample):
    activity, info = sample
    out = run.recommend(activity, info, k=5, as_of=AS_OF, batch_size=BATCH)
    assert list(out.columns) == ["StudentID", "rank", "title", "score"]
    before = activity[activity["timestamp"] < as_seconds(AS_OF)]
    assert sorted(out["StudentID"].unique()) == sorted(before["StudentID"].unique())
    for _, group in out.groupby("StudentID"):
        assert group["rank"].tolist() == [1, 2, 3, 4, 5]
        assert group["title"].nunique() == 5
        assert np.all(np.diff(group["score"].to_numpy()) <= 0)
    ids = run.vocab.encode_many(out["title"])
    assert np.all((ids >= 1) & (ids <= run.vocab.num_titles))
    assert np.all(np.isfinite(out["score"])) and np.all(out["score"] < 0)
    assert out.attrs["as_of"] == "2023-05-08T00:00:00+00:00" and out.attrs["score"] == "log_probability"


def test_a_lone_student_is_scored_as_a_hand_packed_row(run, sample):
    """The query slot at as_of after the student's latest chunk_size-1 reads predicts the next title."""
    activity, _ = sample
    student = int(activity["StudentID"].iloc[0])
    mine = activity[(activity["StudentID"] == student) & (activity["timestamp"] < as_seconds(AS_OF))]
    out = run.recommend(mine, None, k=4, as_of=AS_OF, batch_size=BATCH)
    keep = run.config.chunk_size - 1
    titles = mine["SHLF_NUM"].tolist()[-keep:] + ["placeholder"]
    times = mine["timestamp"].tolist()[-keep:] + [as_seconds(AS_OF)]
    row = pack_histories([(student, titles, times)], run.vocab, run.config.seq_len, time_origin=run.time_origin)
    # Alone, the student is their own classroom: the memory holds their own recent reads.
    memory = ClassroomMemory(
        np.zeros(len(mine), np.int64), mine["timestamp"].to_numpy() - run.time_origin, run.vocab.encode_many(mine["SHLF_NUM"]),
        **memory_options(run.model_name, run.model_config),
    )
    row = memory.attach(row, np.where(row.segments > 0, 0, -1))
    logp = jax.nn.log_softmax(eqx.filter_jit(run.model)(row)[len(titles) - 1])
    allowed = np.asarray(logp)[1 : run.vocab.num_titles + 1]
    best = np.argsort(-allowed, kind="stable")[:4]
    assert out["title"].tolist() == run.vocab.decode_many(best + 1).tolist()
    np.testing.assert_allclose(out["score"], allowed[best], rtol=1e-5)


def test_classmates_are_visible_to_the_query(run):
    """STUDY rows: the query at as_of sees every classmate read, through keys strictly earlier."""
    activity, info = _three_classmates(run)
    ids, rows, query = run.query_rows(activity, info, as_of="2023-03-10")
    assert ids.tolist() == [1, 2, 3]
    for r in range(3):
        sample = jax.tree.map(lambda x: x[r], rows)
        # The titles the keys carry (the model's own account), where the query's mask sees them.
        carried, _, seen = run.model.copy_sources(jax.tree.map(jnp.asarray, sample))
        visible = set(np.asarray(carried)[np.asarray(seen)[query[r]]].tolist()) - {0}
        everyone = set(run.vocab.encode_many(activity["SHLF_NUM"]).tolist())
        assert visible == everyone  # own reads and all classmates' reads, including each latest one
        assert sample.titles[query[r]] == 0 and sample.timestamps[query[r]] == as_seconds("2023-03-10") - run.time_origin


def test_the_classroom_memory_is_packed_at_the_query_slot_only(run):
    """The memory is read out at the query slot alone: there it holds the classroom's reads of the
    last ``memory_days`` before as_of; every other token's memory is empty."""
    activity, info = _three_classmates(run)
    as_of = "2023-03-06"
    ids, rows, query = run.query_rows(activity, info, as_of=as_of)
    memory = np.asarray(rows.memory_titles)
    at_query = np.zeros(memory.shape[:2], bool)
    at_query[np.arange(len(ids)), query] = True
    assert not memory[~at_query].any()
    recent = activity["timestamp"] >= as_seconds(as_of) - run.model_config.memory_days * DAY
    expected = set(run.vocab.encode_many(activity["SHLF_NUM"][recent]).tolist())
    assert expected == {5, 7}  # read on days 3 and 4, with as_of on day 5
    for r in range(len(ids)):
        assert set(memory[r, query[r]].tolist()) - {0} == expected


def reference_run(run):
    """``run`` with an (untrained) reference STUDY in place of its model: keys carry the previous title."""
    config = dataclasses.replace(run.model_config, memory_size=0)
    model = eqx.nn.inference_mode(StudyReference(config, key=jax.random.key(3)))
    return dataclasses.replace(run, model=model, model_name="study-reference", model_config=config)


@pytest.mark.parametrize("reference", [False, True], ids=["study", "study-reference"])
def test_focus_runs_give_classmates_their_latest_reads_only(run, reference):
    """With classmate_chunk_size, a classmate brings its latest reads (and, where keys carry the
    previous title, a carrier) in that many slots."""
    run = reference_run(run) if reference else run
    focus = dataclasses.replace(run, config=dataclasses.replace(run.config, classmate_chunk_size=3))
    titles = [run.vocab.decode(i) for i in range(1, 13)]
    activity = pd.concat(
        [_rows(1, titles[:4], [0, 1, 2, 3]), _rows(2, titles[4:8], [1, 2, 3, 4]), _rows(3, titles[8:], [0, 2, 4, 5])],
        ignore_index=True,
    )
    info = pd.DataFrame({"StudentID": [1, 2, 3], "OrgnID": [7, 7, 7], "GRADE_LVL_NBR": pd.array([3, 3, 3], "Int64")})
    _, rows, query = focus.query_rows(activity, info, as_of="2023-03-10")
    reads = 2 if reference else 3
    for r in range(3):
        segments, row_titles = rows.segments[r], rows.titles[r]
        assert (segments == 1).sum() == min(4, run.config.chunk_size - 1) + 1  # own reads and the query slot
        for slot in (2, 3):
            mine = row_titles[segments == slot]
            assert len(mine) == 3 and (mine[-1] == 0) == reference  # the latest reads, then any carrier
        mates = [s for s in (1, 2, 3) if s != r + 1]
        latest = {1: titles[4 - reads:4], 2: titles[8 - reads:8], 3: titles[12 - reads:12]}
        got = {run.vocab.decode(int(t)) for slot in (2, 3) for t in row_titles[segments == slot][:reads]}
        assert got == set(latest[mates[0]]) | set(latest[mates[1]])


def test_as_of_ignores_every_later_row(run, sample):
    activity, info = sample
    base = run.recommend(activity, info, k=5, as_of=AS_OF, batch_size=BATCH)
    rng = np.random.default_rng(0)
    students = rng.choice(activity["StudentID"].unique(), 40, replace=False)
    known = [run.vocab.decode(i) for i in range(1, run.vocab.num_titles + 1)]
    at = as_seconds(AS_OF)
    junk = pd.DataFrame(
        {
            "StudentID": np.concatenate([students, students, [999_999, 999_999]]).astype(np.int64),
            "SHLF_NUM": list(rng.choice(known, 80)) + ["NEVER-SEEN", "NEVER-SEEN-2"],
            "timestamp": np.concatenate([np.full(40, at), at + rng.integers(1, 90 * DAY, 40), [at, at + DAY]]),
        }
    )
    noisy = pd.concat([activity, junk], ignore_index=True).sample(frac=1.0, random_state=1)
    out = run.recommend(noisy, info, k=5, as_of=AS_OF, batch_size=BATCH)
    pd.testing.assert_frame_equal(out, base)
    assert out.attrs["ignored_rows"] == base.attrs["ignored_rows"] + len(junk)
    assert out.attrs["unknown_title_rows"] == base.attrs["unknown_title_rows"]
    # ... while rows before as_of do count: a later as_of sees more and answers differently.
    later = run.recommend(activity, info, k=5, as_of="2023-05-15", batch_size=BATCH)
    assert not later["score"].equals(base["score"])


def test_students_without_history_get_recommendations(run, sample):
    activity, info = sample
    someone = int(info["StudentID"].iloc[0])
    newcomer = info[info["StudentID"] == someone].assign(StudentID=900_001)
    info = pd.concat([info, newcomer], ignore_index=True)
    out = run.recommend(activity, info, k=6, as_of=AS_OF, students=[someone, 900_001, 900_002], batch_size=BATCH)
    assert out.groupby("StudentID")["rank"].apply(list).to_dict() == {
        someone: list(range(1, 7)), 900_001: list(range(1, 7)), 900_002: list(range(1, 7))
    }
    # The newcomer's classmates shape their list; the unknown student 900_002 has none.
    with_class = out[out["StudentID"] == 900_001]["score"].to_numpy()
    alone = out[out["StudentID"] == 900_002]["score"].to_numpy()
    assert not np.allclose(with_class, alone)


def test_unknown_titles_are_counted_and_reported(run, sample, caplog):
    activity, info = sample
    student = int(activity["StudentID"].iloc[0])
    base = run.recommend(activity, info, k=5, as_of=AS_OF, batch_size=BATCH)
    extra = _rows(student, ["MYSTERY-1", "MYSTERY-2", "MYSTERY-1"], [0, 1, 2], start="2023-05-02")
    caplog.clear()
    out = run.recommend(pd.concat([activity, extra], ignore_index=True), info, k=5, as_of=AS_OF, batch_size=BATCH)
    assert out.attrs["unknown_title_rows"] == base.attrs["unknown_title_rows"] + 3
    assert out.attrs["unknown_titles"] == base.attrs["unknown_titles"] + 2
    assert f"{out.attrs['unknown_title_rows']} of" in caplog.text and "not in the run's vocabulary" in caplog.text
    assert (out["StudentID"] == student).sum() == 5
    assert not out["title"].str.startswith("MYSTERY").any()


def test_exclude_read_drops_only_titles_already_read(run, sample):
    activity, info = sample
    students = np.sort(activity["StudentID"].unique())[:24]
    everything = run.recommend(activity, info, k=run.vocab.num_titles, as_of=AS_OF, students=students, batch_size=BATCH)
    fresh = run.recommend(activity, info, k=8, as_of=AS_OF, students=students, exclude_read=True, batch_size=BATCH)
    before = activity[activity["timestamp"] < as_seconds(AS_OF)]
    dropped = 0
    for student in students:
        read = set(before.loc[before["StudentID"] == student, "SHLF_NUM"])
        ranked = everything[everything["StudentID"] == student]
        expected = ranked[~ranked["title"].isin(read)].head(8)
        got = fresh[fresh["StudentID"] == student]
        assert got["title"].tolist() == expected["title"].tolist()
        np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5)
        assert got["rank"].tolist() == list(range(1, 9))
        dropped += ranked.head(8)["title"].isin(read).sum()
    assert dropped > 0  # the unfiltered lists did hold read titles


def _small_class(run):
    titles = [run.vocab.decode(i) for i in range(1, 9)]
    activity = pd.concat(
        [
            _rows(1, [titles[0], titles[1]], [0, 5]),
            _rows(2, [titles[2], titles[0], titles[3]], [1, 2, 6]),
            _rows(3, [titles[0], titles[4], titles[2]], [3, 4, 7]),
            _rows(4, [titles[5]], [2]),  # another classroom
        ],
        ignore_index=True,
    )
    info = pd.DataFrame(
        {"StudentID": [1, 2, 3, 4], "OrgnID": [7, 7, 7, 8], "GRADE_LVL_NBR": pd.array([3, 3, 3, 3], "Int64")}
    )
    return activity, info


def test_explanations_count_the_classmates_who_read_each_title(run):
    activity, info = _small_class(run)
    as_of = "2023-03-10"
    out = run.recommend(activity, info, k=run.vocab.num_titles, as_of=as_of, explain=True, batch_size=BATCH)
    room = {1: {2, 3}, 2: {1, 3}, 3: {1, 2}, 4: set()}
    reads = activity.assign(date=pd.to_datetime(activity["timestamp"], unit="s").dt.strftime("%Y-%m-%d"))
    checked = 0
    for row in out.itertuples():
        mates = reads[reads["StudentID"].isin(room[row.StudentID]) & (reads["SHLF_NUM"] == row.title)]
        own = reads[(reads["StudentID"] == row.StudentID) & (reads["SHLF_NUM"] == row.title)]
        text = row.explanation
        if len(mates):
            n = mates["StudentID"].nunique()
            days = int(np.ceil((as_seconds(as_of) - mates["timestamp"].min()) / DAY))
            assert text.startswith(f"{n} classmate{'s' * (n > 1)} read it in the last {days} days")
            assert f"most recently {mates['date'].max()}" in text
            share = int(re.search(r"drew (\d+)% of the model's last-layer attention", text).group(1))
            assert 0 <= share <= 100
            checked += 1
        else:
            assert not re.match(r"\d+ classmate", text)
        if len(own):
            times = "once" if len(own) == 1 else f"{len(own)} times"
            assert f"the student read it {times} before (last on {own['date'].max()})" in text
        if not len(mates) and not len(own):
            assert text.startswith(f"none of the {len(room[row.StudentID])} classmate")
    assert checked >= 8  # every classmate-read title of students 1-3 was explained


@eqx.filter_jit
def _attention_check(model, rows, query):
    """Per row: (rebuilt logits, model logits, weights, query's mask row, weights @ V @ Wo, real attention)."""

    def one(sample, q):
        x, mask, extra, attend = last_block_input(model, sample)
        block = last_block(model)
        n = sample.titles.shape[0]
        row = x.shape[0] - n + q  # the predicting stream's row
        # Finishing the forward pass with the real last block must reproduce the model's logits.
        rebuilt = model.logits_at(sample, block(x, mask, key=None, attend=attend, **extra)[-n:])
        weights = last_layer_attention(model, sample, q)
        normed = block.ln1(x)
        v = (normed[:n] @ block.attention.wv).reshape(n, block.attention.num_heads, -1)
        mixed = jnp.einsum("hk,khd->hd", weights, v).reshape(-1) @ block.attention.wo
        attend = attend or type(block.attention).__call__
        real = attend(block.attention, normed, mask, key=None, **extra)[row]
        return rebuilt, model(sample), weights, mask[row], mixed, real

    return jax.vmap(one)(rows, query)


def test_last_layer_attention_matches_the_model(run):
    activity, info = _small_class(run)
    _, rows, query = run.query_rows(activity, info, as_of="2023-03-10")
    rebuilt, logits, weights, seen, mixed, real = _attention_check(run.model, rows, query)
    np.testing.assert_allclose(rebuilt, logits, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.where(seen[:, None, :], 0.0, jnp.abs(weights)).max()) == 0.0  # nothing outside the mask
    assert int(seen[0].sum()) > int((rows.segments[0] == 1).sum())  # student 1 sees classmates too
    np.testing.assert_allclose(mixed, real, atol=1e-5)  # the weights give the real attention output


def test_individual_runs_have_no_classmates_and_no_explanations(run):
    activity, info = _small_class(run)
    model = eqx.nn.inference_mode(Individual(run.model_config, key=jax.random.key(3)))
    individual = dataclasses.replace(run, model=model, model_name="individual")
    assert not individual.reads_classmates and isinstance(run.model, Study)
    ids, rows, _ = individual.query_rows(activity, info, as_of="2023-03-10")
    assert rows.titles.shape[1] == run.config.chunk_size and rows.segments.max() == 1
    out = individual.recommend(activity, info, k=3, as_of="2023-03-10")
    assert out.groupby("StudentID").size().to_dict() == {1: 3, 2: 3, 3: 3, 4: 3}
    with pytest.raises(ValueError, match="explanations come from STUDY"):
        individual.recommend(activity, info, k=3, explain=True)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    paths = sample_data_paths()
    return [str(tiny_run_dir()), str(paths["train"]), str(paths["valid"]), str(paths["student_info"])]


def test_cli_writes_csv_and_json(run, sample, cli_inputs, tmp_path, capsys):
    run_dir, train, valid, info = cli_inputs
    common = ["--run", run_dir, "--activity", train, valid, "--student-info", info, "--k", "3", "--as-of", AS_OF]
    recommend_cli.main([*common, "--out", str(tmp_path / "recs.csv"), "--batch-size", str(BATCH)])
    recommend_cli.main([*common, "--out", str(tmp_path / "recs.json"), "--exclude-read", "--batch-size", str(BATCH)])
    assert "wrote" in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "recs.csv", dtype={"title": str})
    expected = run.recommend(*sample, k=3, as_of=AS_OF, batch_size=BATCH)
    pd.testing.assert_frame_equal(csv, expected, check_dtype=False, rtol=1e-6)
    records = json.loads((tmp_path / "recs.json").read_text())
    assert set(records[0]) == {"StudentID", "rank", "title", "score"}
    expected = run.recommend(*sample, k=3, as_of=AS_OF, exclude_read=True, batch_size=BATCH)
    pd.testing.assert_frame_equal(pd.DataFrame(records), expected, check_dtype=False, rtol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_cli_all_info_students_includes_students_without_activity(cli_inputs, sample, tmp_path):
    run_dir, train, _, info = cli_inputs
    students = pd.read_csv(info)
    newcomer = students.iloc[[0]].assign(StudentID=900_001)
    pd.concat([students, newcomer]).to_csv(tmp_path / "info.csv", index=False)
    out = tmp_path / "recs.csv"
    argv = ["--run", run_dir, "--activity", train, "--student-info", str(tmp_path / "info.csv"), "--k", "2"]
    recommend_cli.main([*argv, "--out", str(out), "--all-info-students", "--batch-size", str(BATCH)])
    frame = pd.read_csv(out)
    assert set(frame["StudentID"]) == set(students["StudentID"]) | {900_001}
    assert (frame["StudentID"] == 900_001).sum() == 2


def test_cli_explain_adds_a_column(cli_inputs, tmp_path):
    run_dir, train, _, info = cli_inputs
    out = tmp_path / "explained.csv"
    argv = ["--run", run_dir, "--activity", train, "--student-info", info, "--k", "2", "--out", str(out), "--explain"]
    recommend_cli.main([*argv, "--batch-size", str(BATCH)])
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["StudentID", "rank", "title", "score", "explanation"]
    assert frame["explanation"].str.len().min() > 20


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--out": "recs.txt"}, "extension must be .csv or .json"),
        ({"--run": "no-such-run"}, "run directory not found"),
        ({"--as-of": "yesterday-ish"}, "as_of 'yesterday-ish': cannot parse as a date"),
        ({"--activity": "missing.csv"}, "file not found"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(cli_inputs, tmp_path, capsys, change, message):
    run_dir, train, _, info = cli_inputs
    flags = {"--run": run_dir, "--activity": train, "--student-info": info, "--out": "recs.csv"}
    flags.update(change)
    argv = [item for flag, value in flags.items() for item in (flag, value)]
    argv = [str(tmp_path / a) if a in ("recs.csv", "recs.txt", "missing.csv", "no-such-run") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        recommend_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_a_query_row_by_hand():
    """Own latest reads then the query slot at as_of, then each classmate (most recent first) with a
    carrier slot at its last read; every key carries its student's previous title."""
    history = QueryHistory(
        titles=np.array([1, 2, 3, 4, 5, 6], np.int32),
        timestamps=np.array([100, 200, 300, 150, 400, 250], np.int64),
        students=np.array([10, 20, 30]),
        start=np.array([0, 3, 5]),
        count=np.array([3, 2, 1]),
        classroom=np.array([0, 0, 0]),
        grade=np.array([3, 4, 5], np.int32),
        time_origin=50,
    )
    layout = layout_queries(history, np.array([0]), seq_len=12, chunk=3, classmates=True, carriers=True, mate_chunk=3)
    rows = compose_queries(history, layout, np.array([0]), batch=2, as_of=1000, sep=99)
    s = rows.sample
    assert s.titles.tolist() == [[2, 3, 0, 99, 4, 5, 0, 99, 6, 0, 0, 0], [0] * 12]
    assert s.segments.tolist() == [[1, 1, 1, 0, 2, 2, 2, 0, 3, 3, 0, 0], [0] * 12]
    assert s.timestamps.tolist() == [[150, 250, 950, 0, 100, 350, 350, 0, 200, 200, 0, 0], [0] * 12]
    assert s.positions.tolist() == [[0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 0, 0], [0] * 12]
    assert s.grade_level.tolist() == [3, 0] and rows.query_col.tolist() == [2, 0]
    assert rows.carried_title.tolist() == [[0, 2, 3, 0, 0, 4, 5, 0, 0, 6, 0, 0], [0] * 12]
    assert rows.carried_time.tolist() == [[0, 200, 300, 0, 0, 150, 400, 0, 0, 250, 0, 0], [0] * 12]


def test_batches_are_packed_one_ahead_of_the_one_being_read():
    from studyrec.recommend.run import _one_ahead

    events = []

    def made():
        for i in range(3):
            events.append(f"made {i}")
            yield i

    for i in _one_ahead(made()):
        events.append(f"read {i}")
    assert events == ["made 0", "made 1", "read 0", "made 2", "read 1", "read 2"]
    assert list(_one_ahead(iter([]))) == []
