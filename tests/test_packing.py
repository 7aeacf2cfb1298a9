import dataclasses

import numpy as np
import pandas as pd
import pytest

from studyrec.data import Chunks, ClassroomPacker, Interactions, Vocabulary, make_chunks, pack_histories
from studyrec.data.packing import Placements, compose, local_rows
from studyrec.data.pipeline import eval_batches, training_batches

SEP = 50
# The reference's sampler fixture (spec §10): 11 chunks, 7 students in two classrooms.
OWNERS = np.array([1, 1, 2, 3, 4, 5, 5, 6, 6, 6, 7])
LENGTHS = np.array([2, 4, 3, 3, 2, 4, 3, 2, 4, 3, 2])
CLASSROOM_OF_STUDENT = {1: 0, 2: 0, 4: 0, 7: 0, 3: 1, 5: 1, 6: 1}


def test_aligned_rows_take_each_classmates_chunk_at_one_moment():
    packer = fixture_packer(seq_len=40)
    ch = packer.chunks
    start_time = packer.data.timestamps[ch.start]
    end_time = packer.data.timestamps[ch.start + ch.length - 1]

    def chunk_at(owner, moment):
        mine = np.flatnonzero(ch.owner == owner)
        before = mine[start_time[mine] <= moment]
        return before[-1] if len(before) else mine[0]

    sample, source = packer.compose(64, packer.random_placements(0, np.arange(64)))
    for b in range(64):
        chunks = np.unique(chunk_of(packer, source[b][source[b] >= 0]))
        assert any(
            all(chunk_at(ch.owner[c], moment) == c for c in chunks) for moment in np.unique(end_time)
        ), f"row {b} mixes chunks from different moments: {chunks}"


def fixture_packer(seq_len=10) -> ClassroomPacker:
    """Chunk c is filled with the value c (titles and timestamps)."""
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    values = np.repeat(np.arange(11), LENGTHS)
    counts = np.bincount(OWNERS - 1, weights=LENGTHS).astype(np.int64)
    data = Interactions(
        titles=values.astype(np.int32),
        title_codes=values.astype(np.int64),
        timestamps=values.astype(np.int64),
        scored=np.ones(len(values), bool),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        students=np.arange(1, 8),
        classroom=np.array([CLASSROOM_OF_STUDENT[s] for s in range(1, 8)]),
        grade=np.array([3, 3, 4, 3, 4, 4, 3], np.int32),
    )
    per_student = np.bincount(OWNERS - 1)
    first = np.concatenate([[0], np.cumsum(per_student)[:-1]])
    chunks = Chunks(
        start=starts, length=LENGTHS, owner=OWNERS - 1, rank=np.arange(11) - first[OWNERS - 1],
        first_chunk=first, num_chunks=per_student, size=4,
    )
    return ClassroomPacker(data, chunks, seq_len, SEP, time_origin=0)


def test_composition_matches_the_reference_layout():
    packer = fixture_packer()
    where = Placements.of_chunks(packer.chunks, row=[0, 0, 0], col=[0, 4, 7], slot=[1, 2, 3], chunk=[2, 4, 10])
    sample, source = packer.compose(1, where)
    np.testing.assert_array_equal(sample.titles[0], [2, 2, 2, SEP, 4, 4, SEP, 10, 10, 0])
    np.testing.assert_array_equal(sample.timestamps[0], [2, 2, 2, 0, 4, 4, 0, 10, 10, 0])
    np.testing.assert_array_equal(sample.segments[0], [1, 1, 1, 0, 2, 2, 0, 3, 3, 0])
    np.testing.assert_array_equal(sample.positions[0], [0, 1, 2, 0, 0, 1, 0, 0, 1, 0])
    assert sample.grade_level[0] == 3  # the first student's grade
    assert (source[0] >= 0).sum() == 7


def chunk_of(packer, source):
    return np.searchsorted(packer.chunks.start, source, side="right") - 1


def check_rows(packer, sample, source, seq_len):
    for b in range(sample.titles.shape[0]):
        real = source[b] >= 0
        if not real.any():
            continue
        chunks = np.unique(chunk_of(packer, source[b][real]))
        owners = packer.chunks.owner[chunks]
        assert len(np.unique(packer.data.classroom[owners])) == 1, "a row mixes classrooms"
        assert len(np.unique(owners)) == len(owners), "a student appears twice in a row"
        used = packer.chunks.length[chunks].sum() + len(chunks) - 1
        assert used <= seq_len
        # Each chunk is whole and contiguous, under one segment.
        for c in chunks:
            cols = np.flatnonzero(chunk_of(packer, np.where(real, source[b], -1)) == c)
            cols = cols[real[cols]]
            assert len(cols) == packer.chunks.length[c] and np.all(np.diff(cols) == 1)
            assert len(np.unique(sample.segments[b][cols])) == 1


@pytest.mark.parametrize("aligned", [True, False])
def test_random_rows_respect_classrooms_and_length(aligned):
    packer = fixture_packer()
    packer.aligned = aligned
    rows = np.arange(40)
    where = packer.random_placements(7, rows)
    sample, source = packer.compose(len(rows), where)
    check_rows(packer, sample, source, 10)
    assert (sample.segments.max(axis=1) >= 1).all(), "every training row holds someone"
    # More rows than chunks: sampling is with replacement.
    assert len(rows) > len(LENGTHS)


def test_random_rows_are_a_pure_function_of_seed_and_index():
    packer = fixture_packer()
    a = packer.random_rows(3, np.arange(0, 16))
    b = packer.random_rows(3, np.arange(8, 24))
    np.testing.assert_array_equal(a.titles[8:], b.titles[:8])
    c = packer.random_rows(4, np.arange(0, 16))
    assert not np.array_equal(a.titles, c.titles)


def test_eval_layout_covers_every_interaction_once_in_order():
    packer = fixture_packer()
    layout = packer.eval_layout()
    sample, source = layout.batch(0, layout.num_rows)
    check_rows(packer, sample, source, 10)
    covered = np.sort(source[source >= 0])
    np.testing.assert_array_equal(covered, np.arange(LENGTHS.sum()))
    # A student's chunks come out earliest first.
    chunk = np.searchsorted(packer.chunks.start, layout.placements.start)
    row_of_chunk = dict(zip(chunk.tolist(), layout.placements.row.tolist()))
    for s in range(7):
        mine = [row_of_chunk[c] for c in np.flatnonzero(OWNERS - 1 == s)]
        assert mine == sorted(mine) and len(set(mine)) == len(mine)


def _reads_without_their_predecessor(packer, sample, source) -> int:
    """Scored reads (not a student's first) whose row token just before is not their previous read."""
    titles, segments = np.asarray(sample.titles), np.asarray(sample.segments)
    firsts = set(packer.data.offsets[:-1].tolist())
    missing = 0
    for r, c in zip(*np.nonzero(source >= 0)):
        i = source[r, c]
        if i not in firsts:
            missing += not (c > 0 and segments[r, c - 1] == segments[r, c] and titles[r, c - 1] == packer.data.titles[i - 1])
    return missing


def test_eval_layout_with_lead_shows_every_scored_read_the_one_before_it():
    packer = fixture_packer()
    plain = packer.eval_layout()
    assert _reads_without_their_predecessor(packer, *plain.batch(0, plain.num_rows)) > 0
    layout = packer.eval_layout(lead=True)
    sample, source = layout.batch(0, layout.num_rows)
    check_rows(packer, sample, source, 10)
    np.testing.assert_array_equal(np.sort(source[source >= 0]), np.arange(LENGTHS.sum()))  # each scored once
    assert _reads_without_their_predecessor(packer, sample, source) == 0
    # The extra tokens are the leads: one per chunk after a student's first, context only.
    assert (np.asarray(sample.segments) > 0).sum() == LENGTHS.sum() + (packer.chunks.rank > 0).sum()
    with pytest.raises(ValueError, match="does not fit seq_len 4"):
        fixture_packer(seq_len=4).eval_layout(lead=True)


def test_eval_batches_pad_the_last_batch():
    packer = fixture_packer()
    layout = packer.eval_layout()
    batches = list(eval_batches(layout, global_batch=4))
    assert len(batches) == -(-layout.num_rows // 4)
    total = sum((src >= 0).sum() for _, src in batches)
    assert total == LENGTHS.sum()


def test_chunk_size_larger_than_seq_len_is_refused():
    packer = fixture_packer()
    with pytest.raises(ValueError, match="chunk size"):
        ClassroomPacker(packer.data, packer.chunks, 3, SEP, 0)


def reference_preprocess_frame():
    day = lambda d: int(pd.Timestamp(d, tz="UTC").timestamp())  # noqa: E731
    rows = [
        (1, "A", "2023-01-18"), (1, "B", "2023-01-19"), (1, "A", "2023-01-22"), (1, "A", "2023-01-23"),
        (3, "C", "2023-01-10"), (3, "C", "2023-01-23"), (3, "A", "2023-01-30"),
        (2, "C", "2023-04-10"), (2, "B", "2023-04-10"),
    ]
    return pd.DataFrame({"StudentID": [r[0] for r in rows], "SHLF_NUM": [r[1] for r in rows], "timestamp": [day(r[2]) for r in rows]})


def test_reference_preprocessing_fixture():
    vocab = Vocabulary({"A": 1, "B": 2, "C": 3, "<SEP>": 4}, oov=5)
    info = pd.DataFrame({"StudentID": [1, 2, 3], "OrgnID": [1, 1, 6], "GRADE_LVL_NBR": pd.array([2, 2, 2], dtype="Int64")})
    data = Interactions.from_frame(reference_preprocess_frame(), vocab, info, grouping="school_grade")
    chunks = make_chunks(data, 3)
    split = lambda arr: [arr[s : s + n].tolist() for s, n in zip(chunks.start, chunks.length)]  # noqa: E731
    assert split(data.titles) == [[1, 2, 1], [1], [3, 2], [3, 3, 1]]  # same-day order kept
    assert split(data.timestamps) == [
        [1674000000, 1674086400, 1674345600], [1674432000], [1681084800, 1681084800],
        [1673308800, 1674432000, 1675036800],
    ]
    assert data.students[chunks.owner].tolist() == [1, 1, 2, 3]
    assert data.classroom.tolist() == [0, 0, 1]  # (school 1, grade 2) for students 1 and 2


def test_end_aligned_chunks_keep_the_latest_history_whole():
    vocab = Vocabulary({"A": 1, "B": 2, "C": 3, "<SEP>": 4}, oov=5)
    data = Interactions.from_frame(reference_preprocess_frame(), vocab)
    chunks = make_chunks(data, 3, align="end")
    assert chunks.length.tolist() == [1, 3, 2, 3]
    assert (chunks.start + chunks.length).tolist() == [1, 4, 6, 9]


def test_process_shards_are_disjoint_and_cover_the_global_batch():
    rows = [local_rows(5, 16, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), 80 + np.arange(16))
    packer = fixture_packer()
    whole = training_batches(packer, seed=1, global_batch=8, num_steps=3)[2]
    halves = [training_batches(packer, seed=1, global_batch=8, num_steps=3, process_index=p, process_count=2)[2] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.titles for h in halves]), whole.titles)


def test_training_batches_are_deterministic_and_resumable():
    packer = fixture_packer()
    ds = training_batches(packer, seed=0, global_batch=4, num_steps=10)
    from studyrec.data.pipeline import prefetching

    it = prefetching(ds)
    first = [next(it).titles for _ in range(3)]
    state = it.get_state()
    later = next(it).titles
    again = prefetching(ds)
    again.set_state(state)
    np.testing.assert_array_equal(next(again).titles, later)
    np.testing.assert_array_equal(first[1], ds[1].titles)


def test_pack_histories_composes_one_row():
    vocab = Vocabulary.build(["a", "b", "c"])
    from datetime import datetime

    sample = pack_histories(
        [(1001, ["a", "b"], [datetime(2021, 1, 1), datetime(2021, 1, 2)]), (5, ["c", "zzz"], [10, 20])], vocab, seq_len=8
    )
    assert sample.titles.tolist() == [1, 2, vocab.sep, 3, vocab.oov, 0, 0, 0]
    assert sample.segments.tolist() == [1, 1, 0, 2, 2, 0, 0, 0]
    assert sample.positions.tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    assert sample.timestamps.tolist()[:2] == [1609459200, 1609545600]
    with pytest.raises(ValueError, match="seq_len"):
        pack_histories([(1, ["a"] * 9, list(range(9)))], vocab, seq_len=8)


def focus_packer(seq_len: int, context: int = 2) -> ClassroomPacker:
    """The fixture with coarser clocks, so classmates read at the same time as the student."""
    base = fixture_packer()
    data = dataclasses.replace(base.data, timestamps=base.data.timestamps // 3)
    return ClassroomPacker(data, base.chunks, seq_len, SEP, time_origin=0, context_size=context)


def check_focus_rows(packer: ClassroomPacker, where: Placements, everyone_fits: bool) -> None:
    data, ch = packer.data, packer.chunks
    student_of = np.repeat(np.arange(data.num_students), np.diff(data.offsets))
    for r in np.unique(where.row):
        p = where.take(where.row == r)
        p = p.take(np.argsort(p.slot))
        np.testing.assert_array_equal(p.slot, np.arange(1, len(p.slot) + 1))
        chunk = np.searchsorted(ch.start, p.start[0])
        assert ch.start[chunk] == p.start[0] and ch.length[chunk] == p.length[0], "slot 1 is a whole chunk"
        assert p.scored[0] or not p.scored.any()
        moment = data.timestamps[p.start[0] + p.length[0] - 1]
        assert len(set(p.student.tolist())) == len(p.student), "a student appears twice in a row"
        assert (data.classroom[p.student] == data.classroom[p.student[0]]).all(), "a row mixes classrooms"
        assert p.length.sum() + len(p.row) - 1 <= packer.seq_len
        latest = []
        for s, start, n in zip(p.student[1:], p.start[1:], p.length[1:]):
            end = start + n
            assert 1 <= n <= packer.context_size and (student_of[start:end] == s).all()
            assert data.timestamps[end - 1] < moment, "a classmate's read at or after the student's last"
            assert end == data.offsets[s + 1] or data.timestamps[end] >= moment, "not the latest reads before it"
            latest.append(int(data.timestamps[end - 1]))
        assert latest == sorted(latest, reverse=True), "classmates are not the most recent first"
        if everyone_fits:
            mates = np.flatnonzero((data.classroom == data.classroom[p.student[0]]) & (np.arange(data.num_students) != p.student[0]))
            active = [s for s in mates if data.timestamps[data.offsets[s]] < moment]
            assert sorted(p.student[1:].tolist()) == sorted(active)


@pytest.mark.parametrize("seq_len", [10, 40])
def test_focus_rows_hold_one_chunk_and_each_classmates_latest_reads_before_it(seq_len):
    packer = focus_packer(seq_len)
    where = packer.random_placements(3, np.arange(60))
    assert len(np.unique(where.row)) == 60
    check_focus_rows(packer, where, everyone_fits=seq_len == 40)
    sample, _ = packer.compose(60, where)
    assert (sample.segments[:, 0] == 1).all()


def test_focus_eval_layout_scores_each_chunk_once_in_its_own_row():
    packer = focus_packer(12)
    layout = packer.eval_layout()
    assert layout.num_rows == len(LENGTHS)
    check_focus_rows(packer, layout.placements, everyone_fits=False)
    sample, source = layout.batch(0, layout.num_rows)
    np.testing.assert_array_equal(np.sort(source[source >= 0]), np.arange(LENGTHS.sum()))
    np.testing.assert_array_equal(chunk_of(packer, source[:, 0]), np.arange(len(LENGTHS)))
    assert (source[sample.segments > 1] == -1).all(), "classmates' reads are context, never scored"
    some = packer.eval_layout(np.isin(np.arange(len(LENGTHS)), [3, 8]))
    _, source = some.batch(0, some.num_rows)
    np.testing.assert_array_equal(chunk_of(packer, source[:, 0]), [3, 8])


def test_focus_rows_need_room_for_a_classmate():
    with pytest.raises(ValueError, match="classmate chunk size 6 leaves no room"):
        focus_packer(10, context=6)


def test_compose_ends_a_placement_with_its_trailing_token():
    """A trailing token (a query or carrier slot) continues its run: title 0, same slot, next position."""
    titles, times, grades = np.array([5, 6, 7, 8], np.int32), np.array([10, 20, 30, 40], np.int32), np.array([1, 2], np.int32)
    where = Placements(
        row=np.array([0, 0, 1]), col=np.array([0, 4, 0]), slot=np.array([1, 2, 1]), start=np.array([0, 2, 3]),
        length=np.array([2, 1, 0]), student=np.array([0, 1, 1]), scored=np.array([True, False, True]),
        lead=np.zeros(3, np.int64),
    )
    trailing = (np.array([0, 2]), np.array([25, 99], np.int32))
    sample, source = compose(2, where, titles, times, grades, SEP, 6, trailing)
    assert sample.titles.tolist() == [[5, 6, 0, SEP, 7, 0], [0] * 6]
    assert sample.segments.tolist() == [[1, 1, 1, 0, 2, 0], [1, 0, 0, 0, 0, 0]]
    assert sample.timestamps.tolist() == [[10, 20, 25, 0, 30, 0], [99, 0, 0, 0, 0, 0]]
    assert sample.positions.tolist() == [[0, 1, 2, 0, 0, 0], [0] * 6]
    assert sample.grade_level.tolist() == [1, 2]
    assert source.tolist() == [[0, 1, -1, -1, -1, -1], [-1] * 6]
    plain, plain_source = compose(2, where, titles, times, grades, SEP, 6)
    assert plain.titles.tolist() == sample.titles.tolist() and plain.segments[1].tolist() == [0] * 6
    np.testing.assert_array_equal(plain_source, source)
