"""Hits@n, NDCG@n, MRR and the reference's evaluation numbers (spec §8, §10 evaluations_test)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from studyrec.evaluate import (
    AGGREGATE_COLUMNS,
    PER_STUDENT_COLUMNS,
    StudentStats,
    aggregate_table,
    hits_at_n,
    per_student_table,
    score_recommendations,
    score_stats,
    subset_masks,
    target_ranks,
    top_titles,
    write_tables,
)

READS = {1: list("ABA"), 2: list("BBC"), 3: list("ABCCAD")}
RECS = {
    1: [list("CD"), list("CD"), list("AB")],
    2: [list("BD"), list("AB"), list("CD")],
    3: [list("GK"), list("CK"), list("AB"), list("DK")],
}


def _by_student(stats, values):
    return {int(s): int(v) for s, v in zip(stats.student_ids, values)}


def test_reference_counts_and_hits():
    stats = score_stats(READS, RECS, [2])
    expected_counts = {"all": {1: 3, 2: 3, 3: 4}, "non_continuation": {1: 3, 2: 2, 3: 3}, "non_history": {1: 2, 2: 2, 3: 2}}
    expected_hits = {"all": {1: 1, 2: 3, 3: 3}, "non_continuation": {1: 1, 2: 2, 3: 2}, "non_history": {1: 0, 2: 2, 3: 1}}
    hits = stats.hits_sum(2)
    for j, subset in enumerate(stats.subsets):
        assert _by_student(stats, stats.counts[:, j]) == expected_counts[subset]
        assert _by_student(stats, hits[:, j]) == expected_hits[subset]


def test_reference_aggregate_is_bit_exact():
    assert hits_at_n(READS, RECS, 2) == 0.6944444444444443
    table = score_recommendations(READS, RECS, [2])
    aggregate = aggregate_table(table)
    value = aggregate.loc[aggregate["Evaluation_Type"] == "all", "Hits_at_N"].item()
    assert value == pytest.approx(0.6944444444444443, rel=1e-15, abs=0)  # pandas' grouped mean, as the reference
    assert hits_at_n(READS, RECS, 2, subset="non_history") == pytest.approx((0 + 1 + 0.5) / 3)


def test_no_students_gives_none():
    assert hits_at_n({}, {}, 2) is None
    assert hits_at_n(READS, {}, 2) is None
    assert hits_at_n(READS, {9: [list("AB")]}, 2) is None


def test_reference_dataframe_order():
    table = score_recommendations(READS, RECS, [1, 2])
    assert list(table.columns) == PER_STUDENT_COLUMNS
    assert len(table) == 18
    expected = [(n, t, s) for n in (1, 2) for t in ("all", "non_continuation", "non_history") for s in (1, 2, 3)]
    assert list(zip(table["N_Recommendations"], table["Evaluation_Type"], table["Student_ID"])) == expected
    n2 = table[(table["N_Recommendations"] == 2) & (table["Evaluation_Type"] == "all")]
    assert n2["Hits_at_N"].tolist() == [1 / 3, 1.0, 3 / 4]
    n1 = table[(table["N_Recommendations"] == 1) & (table["Evaluation_Type"] == "non_history")]
    assert n1["Hits_at_N"].tolist() == [0.0, 1.0, 0.5]


def test_alignment_extra_recommendations_ignored_and_order_given():
    # Extra lists beyond the reads are dropped from the end; n order is kept as given.
    table = score_recommendations({5: list("AB")}, {5: [list("A"), list("B"), list("ZZ")]}, [2, 1])
    assert table["N_Recommendations"].tolist()[0] == 2
    assert table.loc[table["Evaluation_Type"] == "all", "Hits_at_N"].tolist() == [1.0, 1.0]


def _brute_masks(students, titles):
    nc, nh = [], []
    for i, (s, t) in enumerate(zip(students, titles)):
        earlier = [titles[j] for j in range(i) if students[j] == s]
        nc.append(not earlier or earlier[-1] != t)
        nh.append(t not in earlier)
    return np.array(nc), np.array(nh)


def test_subset_masks_small_case():
    masks = subset_masks(np.array([1, 1, 1, 1, 2, 2]), np.array([5, 5, 6, 5, 5, 5]))
    assert masks["all"].all()
    assert masks["non_continuation"].tolist() == [True, False, True, True, True, False]
    assert masks["non_history"].tolist() == [True, False, True, False, True, False]


def test_subset_masks_match_definition_on_random_data():
    rng = np.random.default_rng(0)
    students = np.sort(rng.integers(0, 15, 300))
    titles = rng.integers(0, 6, 300)
    masks = subset_masks(students, titles)
    nc, nh = _brute_masks(students.tolist(), titles.tolist())
    np.testing.assert_array_equal(masks["non_continuation"], nc)
    np.testing.assert_array_equal(masks["non_history"], nh)


def test_target_ranks():
    topk = np.array([[3, 1, 2], [4, 5, 6], [7, 7, 8]])
    np.testing.assert_array_equal(target_ranks(topk, np.array([2, 9, 7])), [2, 3, 0])
    assert target_ranks(topk, np.array([2, 9, 7])).dtype == np.int32


def test_ndcg_and_mrr_hand_case():
    ranks = np.array([0, 1, 3, 5])  # k = 5, so the last is a miss
    stats = StudentStats.from_ranks(np.full(4, 7), ranks, {"all": np.ones(4, bool)}, [2, 5], k=5)
    table = per_student_table(stats)
    n2, n5 = table.iloc[0], table.iloc[1]
    assert n2["Hits_at_N"] == 0.5 and n5["Hits_at_N"] == 0.75
    assert n2["NDCG_at_N"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert n5["NDCG_at_N"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert n2["MRR"] == n5["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 4)


def _random_shard_inputs(seed, n=400):
    rng = np.random.default_rng(seed)
    students = np.sort(rng.integers(0, 40, n))
    targets = rng.integers(1, 8, n)
    ranks = rng.integers(0, 11, n)  # k = 10: rank 10 is a miss
    return students, ranks, subset_masks(students, targets)


def test_merge_of_shards_equals_whole():
    students, ranks, masks = _random_shard_inputs(1)
    whole = StudentStats.from_ranks(students, ranks, masks, [1, 5, 10], k=10)
    cuts = [0, 97, 250, len(ranks)]  # cuts fall inside students
    shards = [
        StudentStats.from_ranks(students[a:b], ranks[a:b], {s: m[a:b] for s, m in masks.items()}, [1, 5, 10], k=10)
        for a, b in zip(cuts[:-1], cuts[1:])
    ]
    empty = StudentStats.empty([1, 5, 10], k=10)
    left = shards[0].merge(shards[1]).merge(shards[2])
    right = shards[2].merge(empty.merge(shards[1].merge(shards[0])))
    for merged in (left, right):
        np.testing.assert_array_equal(merged.student_ids, whole.student_ids)
        np.testing.assert_array_equal(merged.counts, whole.counts)
        np.testing.assert_array_equal(merged.rank_counts, whole.rank_counts)
        pd.testing.assert_frame_equal(per_student_table(merged), per_student_table(whole))
    with pytest.raises(ValueError):
        whole.merge(StudentStats.empty([1], k=3))


def test_tables_and_files(tmp_path):
    students, ranks, masks = _random_shard_inputs(2)
    stats = StudentStats.from_ranks(students, ranks, masks, [1, 5], k=10)
    per_student = per_student_table(stats)
    assert (per_student["Hits_at_N"].between(0, 1)).all()
    aggregate = aggregate_table(per_student)
    assert list(aggregate.columns) == AGGREGATE_COLUMNS
    assert list(zip(aggregate["Evaluation_Type"], aggregate["N_Recommendations"])) == [
        (t, n) for t in ("all", "non_continuation", "non_history") for n in (1, 5)
    ]
    first = per_student[(per_student["Evaluation_Type"] == "all") & (per_student["N_Recommendations"] == 1)]
    assert aggregate["Hits_at_N"].iloc[0] == pytest.approx(first["Hits_at_N"].mean())
    write_tables(tmp_path / "out", per_student, aggregate)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "aggregate.csv"), aggregate)
    assert pd.read_csv(tmp_path / "out" / "per_student.csv").columns.tolist() == PER_STUDENT_COLUMNS


def test_device_top_titles_skip_non_titles_and_excluded_and_agree_with_numpy():
    num_titles, k = 12, 5
    logits = np.array(jax.random.normal(jax.random.key(0), (2, 3, num_titles + 3)))
    logits[..., 0] = logits[..., -1] = logits[..., -2] = 100.0  # pad, SEP and OOV would win
    exclude = np.zeros((2, 3, 2), np.int32)
    exclude[0, 0] = np.argmax(logits[0, 0, 1 : num_titles + 1]) + 1, 0  # the best title, then padding
    masked = np.full_like(logits, -np.inf)
    masked[..., 1 : num_titles + 1] = logits[..., 1 : num_titles + 1]
    masked[0, 0, exclude[0, 0, 0]] = -np.inf
    expected = np.argsort(-masked, axis=-1, kind="stable")[..., :k]
    targets = np.array([[expected[0, 0, 2], 0, num_titles + 2], [expected[1, 0, 0], expected[1, 1, 4], 1]])
    topk, scores = top_titles(jnp.asarray(logits), k, num_titles, jnp.asarray(exclude))
    topk, scores = np.asarray(topk), np.asarray(scores)
    np.testing.assert_array_equal(topk, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(masked, expected, -1))
    assert exclude[0, 0, 0] not in topk[0, 0]
    ranks = target_ranks(topk.reshape(-1, k), targets.ravel()).reshape(2, 3)
    assert ranks[0].tolist() == [2, k, k] and ranks[1, :2].tolist() == [0, 4]
