"""The classroom memory: what it holds, that it holds only the strictly earlier past, and that the
model reads nothing else through it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from studyrec.data import make_chunks
from studyrec.data.interactions import Interactions
from studyrec.data.memory import DAY, ClassroomMemory
from studyrec.data.packing import ClassroomPacker
from studyrec.models import ModelConfig, Study, build
from studyrec.models.decoder import DistinctTitles, distinct_titles, slot_affinity

SEP = 40
TINY = dict(vocab_size=41, num_layers=2, d_model=32, qkv_dim=32, num_heads=2, mlp_dim=32, max_len=64)


def reads(rng, n=600, rooms=3, titles=30, days=20):
    """Random reads: classroom, time (whole hours, so ties happen) and title."""
    return rng.integers(0, rooms, n), rng.integers(0, days * 24, n) * 3600, rng.integers(1, titles, n)


def brute_force(classroom, times, titles, room, moment, size, days, max_reads):
    """The same summary by pandas, one query at a time."""
    frame = pd.DataFrame({"room": classroom, "time": times, "title": titles})
    frame = frame[(frame.room == room) & (frame.time < moment) & (frame.time >= moment - days * DAY) & (frame.title > 0)]
    frame = frame.sort_values("time", kind="stable").tail(max_reads)
    table = frame.groupby("title").agg(reads=("time", "size"), latest=("time", "max")).reset_index()
    table = table.sort_values(["reads", "latest", "title"], ascending=[False, False, True]).head(size)
    return table["title"].tolist(), table["reads"].tolist(), table["latest"].tolist()


@pytest.mark.parametrize(("size", "days", "max_reads"), [(5, 2.0, 1000), (8, 1.5, 20), (3, 30.0, 7)])
def test_lookup_matches_a_brute_force_count(size, days, max_reads):
    rng = np.random.default_rng(size)
    classroom, times, titles = reads(rng)
    titles[::17] = 0  # padding never counts
    memory = ClassroomMemory(classroom, times, titles, size=size, days=days, max_reads=max_reads)
    q_room = rng.integers(0, 4, 200)  # classroom 3 has no reads
    q_time = np.concatenate([rng.choice(times, 150), rng.integers(-5 * DAY, 25 * DAY, 50)])
    got = memory.lookup(q_room, q_time)
    for i in range(len(q_room)):
        want = brute_force(classroom, times, titles, q_room[i], q_time[i], size, days, max_reads)
        k = len(want[0])
        for g, w in zip(got, want):
            assert g[i, :k].tolist() == w, (i, q_room[i], q_time[i])
            assert not g[i, k:].any()


def packer_with_memory(seq_len=24, chunk=4, context=None) -> ClassroomPacker:
    rng = np.random.default_rng(0)
    students, per = 12, 10
    titles = rng.integers(1, 30, students * per).astype(np.int32)
    times = np.sort(rng.integers(0, 10, (students, per)) * DAY // 2, axis=1).ravel().astype(np.int64)
    data = Interactions(
        titles=titles, title_codes=titles.astype(np.int64), timestamps=times, scored=np.ones(len(titles), bool),
        offsets=np.arange(0, students * per + 1, per), students=np.arange(1, students + 1),
        classroom=np.arange(students) % 2, grade=np.zeros(students, np.int32),
    )
    memory = ClassroomMemory.of(data, 0, size=6, days=2.0, max_reads=100)
    return ClassroomPacker(data, make_chunks(data, chunk), seq_len, SEP, 0, context_size=context, memory=memory)


@pytest.mark.parametrize("layout", ["training", "evaluation", "focus"])
def test_every_token_remembers_only_its_classrooms_strictly_earlier_reads(layout):
    packer = packer_with_memory(context=3 if layout == "focus" else None)
    if layout == "evaluation":
        sample, source = packer.eval_layout().batch(0, 64)
    else:
        sample, source = packer.compose(64, packer.random_placements(1, np.arange(64)))
    data = packer.data
    room_of = np.repeat(data.classroom, np.diff(data.offsets))
    checked = 0
    for b, t in zip(*np.nonzero(sample.segments > 0)):
        titles, count, latest = sample.memory_titles[b, t], sample.memory_reads[b, t], sample.memory_times[b, t]
        real = titles > 0
        assert np.all(latest[real] < sample.timestamps[b, t]), "a memory read is not strictly earlier"
        if source[b, t] < 0:
            continue
        room, now = room_of[source[b, t]], sample.timestamps[b, t]
        window = (room_of == room) & (data.timestamps < now) & (data.timestamps >= now - 2 * DAY)
        for title, n, last in zip(titles[real], count[real], latest[real]):
            mine = window & (data.titles == title)
            assert n == mine.sum() and last == data.timestamps[mine].max()
        checked += 1
    assert checked > 100
    assert (sample.memory_titles[sample.segments == 0] == 0).all(), "separators and padding remember nothing"


def model(**overrides):
    return eqx.nn.inference_mode(build("study", ModelConfig(**TINY, memory_size=6, copy_head=True, **overrides), key=jax.random.key(0)))


def test_the_memory_head_reads_only_earlier_entries_and_changes_the_scores():
    packer = packer_with_memory()
    sample, _ = packer.compose(4, packer.random_placements(2, np.arange(4)))
    sample = jax.tree.map(jnp.asarray, sample)
    m = model()
    with_memory = jax.vmap(m)(sample)
    empty = jax.vmap(m)(sample._replace(memory_titles=None, memory_reads=None, memory_times=None))
    remembers = np.asarray((sample.memory_titles > 0).any(-1))
    assert remembers.sum() > 10
    moved = np.asarray(jnp.abs(with_memory - empty).max(-1) > 1e-6)
    np.testing.assert_array_equal(moved, remembers)  # the head acts exactly where there is a memory
    # A (corrupted) entry at or after the token's own time is ignored by the model as well.
    late = sample._replace(memory_times=jnp.where(sample.memory_titles > 0, sample.timestamps[..., None], 0))
    np.testing.assert_allclose(jax.vmap(m)(late), empty, atol=1e-6)


def test_the_memory_adds_no_dependency_on_the_rows_titles():
    """The dependency map of the row's titles through every layer is the one without a memory."""
    from test_study import assert_exact, influence

    packer = packer_with_memory()
    sample, _ = packer.compose(3, packer.random_placements(5, np.arange(3)))
    sample = jax.tree.map(jnp.asarray, sample)
    diffs = np.asarray(influence(model(gap_embedding=True), sample))
    for b in range(3):
        assert_exact(diffs[b], jax.tree.map(lambda x: x[b], sample))


def test_only_models_that_read_classmates_take_a_memory():
    assert Study.reads_memory and not build("individual", ModelConfig(**TINY), key=jax.random.key(0)).reads_memory
    with pytest.raises(ValueError, match="reads no classroom memory"):
        build("individual", ModelConfig(**TINY, memory_size=4), key=jax.random.key(0))
    with pytest.raises(ValueError, match="memory_days"):
        ModelConfig(**TINY, memory_days=0.0)


@pytest.mark.parametrize("wide", [False, True])
def test_titles_rank_by_reads_then_latest_then_id(wide):
    """The packed-key sort and the lexsort it falls back to for wide keys give the same order."""
    from studyrec.data.memory import _rank_titles

    rng = np.random.default_rng(1)
    summary = np.sort(rng.integers(0, 50, 2000))
    reads = rng.integers(1, 4, 2000)
    last = rng.integers(0, 2**61 if wide else 1000, 2000)  # 61 bits of time: too wide to pack
    expected = np.lexsort((np.arange(2000), -last, -reads, summary))
    np.testing.assert_array_equal(_rank_titles(summary, reads, last), expected)


def test_each_rows_distinct_memory_titles_hold_every_slots_title_once():
    packer = packer_with_memory()
    sample, _ = packer.compose(8, packer.random_placements(3, np.arange(8)))
    titles = jnp.asarray(sample.memory_titles)
    counts = [len(np.unique(row[row > 0])) for row in sample.memory_titles]
    assert max(counts) > 6, "rows whose slots repeat titles"
    distinct = distinct_titles(titles, 40, max(counts))
    assert bool(distinct.fits)
    for row, found, count in zip(sample.memory_titles, np.asarray(distinct.titles), counts):
        np.testing.assert_array_equal(found[:count], np.unique(row[row > 0]))  # each once, in order
        assert (found[count:] == 0).all()
    at_slots = jnp.take_along_axis(distinct.titles, distinct.slots.reshape(8, -1), 1).reshape(titles.shape)
    np.testing.assert_array_equal(np.where(titles > 0, at_slots, 0), titles)
    assert not bool(distinct_titles(titles, 40, max(counts) - 1).fits)


@pytest.mark.parametrize("fits", [True, False])
def test_slot_affinity_scores_distinct_titles_once_or_else_each_slot(fits):
    rng = np.random.default_rng(1)
    q, table = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
    titles = jnp.asarray(rng.integers(0, 40, (1, 5, 6)), jnp.int32)
    one_by_one = slot_affinity(q, table, titles[0], dense=False)
    distinct = distinct_titles(titles, 40, 30)
    row = DistinctTitles(distinct.titles[0], distinct.slots[0], jnp.asarray(fits))
    np.testing.assert_allclose(slot_affinity(q, table, titles[0], dense=False, distinct=row), one_by_one, rtol=1e-5, atol=1e-6)
    # Wrong distinct titles tell which form ran: the slots read them only where they fit.
    wrong = slot_affinity(q, table, titles[0], dense=False, distinct=row._replace(titles=row.titles[::-1]))
    assert bool(jnp.any(wrong != one_by_one)) == fits


@pytest.mark.parametrize("fits", [True, False])
def test_a_batch_scores_each_rows_distinct_memory_titles_once_with_the_same_scores_and_gradients(fits, monkeypatch):
    from studyrec.models import batched_scores, decoder

    packer = packer_with_memory()
    sample, _ = packer.compose(4, packer.random_placements(2, np.arange(4)))
    sample = jax.tree.map(jnp.asarray, sample)
    if not fits:
        monkeypatch.setattr(decoder, "DISTINCT_PER_SLOT", 1)  # 6 distinct titles a row: fewer than its rows hold
    m = model()
    assert bool(m.distinct_memory(sample).fits) == fits

    static = eqx.filter(m, eqx.is_inexact_array, inverse=True)

    def loss(params):
        scores = batched_scores(eqx.combine(params, static), sample)
        return jnp.sum(jnp.where(sample.segments > 0, scores.at(sample.titles), 0.0)), scores

    params = eqx.filter(m, eqx.is_inexact_array)
    (value, scores), grads = jax.value_and_grad(loss, has_aux=True)(params)
    with monkeypatch.context() as patch:
        patch.setattr(Study, "distinct_memory", lambda self, batch: None)  # every slot scored one by one
        (value_1, scores_1), grads_1 = jax.value_and_grad(loss, has_aux=True)(params)
    same = (lambda a, b: np.testing.assert_array_equal(a, b)) if not fits else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    )
    same(value, value_1)
    jax.tree.map(same, scores, scores_1)
    jax.tree.map(same, grads, grads_1)
