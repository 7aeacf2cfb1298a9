import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from studyrec.data import Sample
from studyrec.models import ModelConfig, build, individual_mask, study_mask
from studyrec.models.decoder import GAP_BUCKETS, Dropout, gap_buckets, hashed_uniform_bits, mix32

SEP = 99
TINY = dict(vocab_size=100, num_layers=2, d_model=32, qkv_dim=32, num_heads=2, mlp_dim=32, max_len=15)


def model(name, **overrides):
    """An inference-mode model, jitted (eager execution of the scanned blocks is slow)."""
    return eqx.filter_jit(eqx.nn.inference_mode(awake(build(name, ModelConfig(**{**TINY, **overrides}), key=jax.random.key(0)))))


def awake(m):
    """``m`` with its copy head's order and seen biases away from their neutral start, where it has
    them, so that a leak through them would show."""
    copy = m.decoder.copy
    if copy is not None and copy.order is not None:
        m = eqx.tree_at(lambda t: t.decoder.copy.order, m, jnp.float32(0.3))
    if copy is not None and copy.seen is not None:
        m = eqx.tree_at(lambda t: t.decoder.copy.seen, m, jnp.float32(-0.4))
    return m


def row(titles, segments, timestamps=None, positions=None, grade=0):
    n = len(titles)
    timestamps = timestamps if timestamps is not None else [0] * n
    if positions is None:
        positions, count = [], {}
        for s in segments:
            positions.append(count.get(s, 0) if s else 0)
            count[s] = count.get(s, 0) + 1
    arr = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return Sample(arr(titles), arr(segments), arr(timestamps), arr(positions), jnp.int32(grade))


# The reference's STUDY fixture (spec §10), with segments in place of raw student ids.
FIXTURE = row([1, 2, 3, 4, 5, SEP, 7, 8, 9, 10], [1, 1, 1, 1, 1, 0, 2, 2, 2, 2], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("name", ["individual", "study-reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grades", [None, 5])
def test_shapes(name, dtype, grades):
    m = model(name, dtype=dtype, num_grade_levels=grades)
    assert m(FIXTURE).shape == (10, 100)
    assert m(FIXTURE).dtype == jnp.float32
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), FIXTURE)
    out = jax.jit(jax.vmap(m))(batch)
    assert out.shape == (2, 10, 100)
    assert jnp.all(jnp.isfinite(out))


@eqx.filter_jit
def influence(m, sample: Sample, new_title: int = 42):
    """bool [i, j]: does replacing the title at i change the logits at j? (one batched pass)"""
    n = sample.titles.shape[0]
    perturbed = jax.vmap(lambda i: sample._replace(titles=sample.titles.at[i].set(new_title)))(jnp.arange(n))
    base = m(sample)
    return jnp.any(jnp.abs(jax.vmap(m)(perturbed) - base) > 1e-5, axis=-1)


@pytest.mark.parametrize("options", [{}, {"copy_head": True, "copy_order_bias": True, "copy_seen_bias": True}],
                         ids=["plain", "copy-order-seen"])
def test_individual_is_causal_within_student(options):
    m = model("individual", **options)
    s = row(list(range(1, 11)), [1] * 10)
    diffs = np.asarray(influence(m, s))
    for i in range(10):
        diff = diffs[i]
        assert not diff[: i + 1].any(), f"output before or at {i} saw title {i}"
        assert diff[i + 1 :].all(), f"outputs after {i} did not see title {i}"


@pytest.mark.parametrize("options", [{}, {"copy_head": True, "copy_order_bias": True, "copy_seen_bias": True}],
                         ids=["plain", "copy-order-seen"])
def test_individual_packed_equals_separate(options):
    m = model("individual", **options)
    packed = row([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    first = row([1, 2, 3, 4, 5], [1] * 5)
    second = row([6, 7, 8, 9, 10], [1] * 5)
    out = m(packed)
    np.testing.assert_allclose(out[:5], m(first), atol=1e-4)
    np.testing.assert_allclose(out[5:], m(second), atol=1e-4)


def lagged_dependencies(sample: Sample) -> np.ndarray:
    """D[i, j]: may the title at i reach the output at j (STUDY with the reference's one-step lag)?

    Own earlier titles always; a classmate's title i only through their next interaction i+1 in the
    row, and only when that one is strictly earlier than j.
    """
    seg, ts = np.asarray(sample.segments), np.asarray(sample.timestamps)
    n = len(seg)
    deps = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if not (seg[i] and seg[j]):
                continue
            own = seg[i] == seg[j] and i < j
            carried = i + 1 < n and seg[i + 1] == seg[i] and seg[i] != seg[j] and ts[i + 1] < ts[j]
            deps[i, j] = own or carried
    return deps


def assert_dependency_map(m, sample):
    deps = lagged_dependencies(sample)
    real = np.asarray(sample.segments) > 0
    diffs = np.asarray(influence(m, sample))
    for i in np.flatnonzero(real):
        np.testing.assert_array_equal(diffs[i][real], deps[i][real], err_msg=f"title {i}")


def test_study_dependency_map_on_reference_fixture():
    m = model("study-reference")
    deps = lagged_dependencies(FIXTURE)
    # Same-day classmates stay hidden: student 2's first read (t=3) never sees student 1's t=3 read.
    assert not deps[3, 6] and not deps[2, 6]
    # The reference's allowed map forbids any leak from the future.
    ts, seg = np.asarray(FIXTURE.timestamps), np.asarray(FIXTURE.segments)
    for i in range(10):
        for j in range(10):
            if deps[i, j] and seg[i] != seg[j]:
                assert ts[i] < ts[j]
    assert_dependency_map(m, FIXTURE)


@pytest.mark.parametrize(
    "options",
    [{}, {"recency_bias": True}, {"copy_head": True, "gap_embedding": True},
     {"copy_head": True, "copy_order_bias": True, "copy_seen_bias": True}],
    ids=["plain", "recency-bias", "copy-head-gaps", "copy-order-seen"],
)
def test_study_dependency_map_on_random_rows(options):
    rng = np.random.default_rng(0)
    m = model("study-reference", **options)
    for _ in range(3):
        lengths = rng.integers(1, 5, size=3)
        titles, segs, times = [], [], []
        for slot, n in enumerate(lengths, start=1):
            if titles:
                titles.append(SEP), segs.append(0), times.append(0)
            titles += list(rng.integers(1, 90, n))
            segs += [slot] * n
            times += sorted(rng.integers(0, 6, n).tolist())
        pad = 14 - len(titles)
        s = row(titles + [0] * pad, segs + [0] * pad, times + [0] * pad)
        assert_dependency_map(m, s)


def test_masks_never_see_padding_or_separators():
    seg = jnp.asarray([1, 1, 0, 2, 2, 0, 0])
    ts = jnp.asarray([0, 5, 0, 1, 9, 0, 0])
    for mask in (individual_mask(seg), study_mask(seg, ts)):
        assert not mask[:, jnp.asarray(seg) == 0].any()
        assert not mask[jnp.asarray(seg) == 0].any()
    assert study_mask(seg, ts)[4, 1] and not study_mask(seg, ts)[3, 1]


def test_dropout_needs_key_and_inference_mode_is_deterministic():
    trainable = build("study-reference", ModelConfig(**TINY), key=jax.random.key(0))
    call = eqx.filter_jit(lambda m, k: m(FIXTURE, key=k))
    a, b = call(trainable, jax.random.key(1)), call(trainable, jax.random.key(2))
    assert not jnp.allclose(a, b)
    frozen = eqx.filter_jit(eqx.nn.inference_mode(trainable))
    np.testing.assert_array_equal(frozen(FIXTURE), frozen(FIXTURE))


def test_mix32_is_lowbias32_in_wrapping_uint32_and_a_bijection():
    def lowbias32(x: int) -> int:  # Wellons' C, with Python integers reduced mod 2**32
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    x = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    x[:3] = [0, 1, 2**32 - 1]
    np.testing.assert_array_equal(np.asarray(mix32(jnp.asarray(x))), [lowbias32(int(v)) for v in x])
    sample = jnp.arange(2**20, dtype=jnp.uint32) * jnp.uint32(4099)
    assert len(np.unique(np.asarray(mix32(sample)))) == 2**20


def test_hashed_draws_are_uniform_and_independent_across_elements_and_keys():
    n = 1 << 20
    a = np.asarray(hashed_uniform_bits(jax.random.key(0), (1024, 1024))).ravel().astype(np.float64) / 2**32
    b = np.asarray(hashed_uniform_bits(jax.random.key(1), (1024, 1024))).ravel().astype(np.float64) / 2**32
    step = np.asarray(hashed_uniform_bits(jax.random.fold_in(jax.random.key(0), 1), (1024, 1024))).ravel() / 2**32
    counts = np.bincount((a * 256).astype(int), minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 400, chi2  # 255 degrees of freedom: 400 is about 7 standard deviations
    bound = 6 / np.sqrt(n)  # correlation of independent uniforms: standard deviation 1/sqrt(n)
    for name, x, y in [("next element", a[:-1], a[1:]), ("next row", a[:-1024], a[1024:]), ("another key", a, b),
                       ("the next step's key", a, step)]:
        assert abs(np.corrcoef(x, y)[0, 1]) < bound, name
    assert not np.array_equal(a, b)


def test_dropout_drops_its_rate_and_rescales_the_rest():
    x = jnp.ones((512, 1024))
    out = np.asarray(Dropout(0.1)(x, key=jax.random.key(3)))
    dropped = (out == 0).mean()
    assert abs(dropped - 0.1) < 6 * np.sqrt(0.09 / out.size), dropped
    np.testing.assert_allclose(out[out != 0], 1 / 0.9, rtol=1e-6)
    np.testing.assert_array_equal(out, np.asarray(Dropout(0.1)(x, key=jax.random.key(3))))


def test_gradients_reach_every_parameter():
    m = build("study-reference", ModelConfig(**TINY, num_grade_levels=3, recency_bias=True), key=jax.random.key(0))
    m = eqx.tree_at(lambda m: m.decoder.blocks.attention.recency, m, jnp.full((2, 2), 0.5))
    s = FIXTURE._replace(grade_level=jnp.int32(2))

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(m):
        logits = m(s, key=jax.random.key(3))
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(10), s.titles])

    grads = grad(m)
    for path, g in jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array)):
        assert jnp.all(jnp.isfinite(g)), path
        assert jnp.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_tied_embeddings_share_the_table():
    m = build("study-reference", ModelConfig(**TINY, tie_embeddings=True), key=jax.random.key(0))
    assert m.decoder.out_kernel is None
    m = eqx.filter_jit(eqx.nn.inference_mode(m))
    assert m(FIXTURE).shape == (10, 100)


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model"):
        build("knn", ModelConfig(**TINY), key=jax.random.key(0))


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_readout_of_one_hidden_state_is_that_positions_logits(name):
    """The recommendation path reads out only the query slot; it must agree with the full pass."""
    m = eqx.nn.inference_mode(build(name, ModelConfig(**TINY, num_grade_levels=5, recency_bias=True), key=jax.random.key(1)))
    sample = FIXTURE._replace(grade_level=jnp.int32(3))
    full = eqx.filter_jit(m)(sample)
    hidden = eqx.filter_jit(m.hidden)(sample)
    assert hidden.shape == (10, TINY["d_model"])
    np.testing.assert_allclose(m.decoder.readout(hidden[7], sample.grade_level), full[7], rtol=1e-5, atol=1e-5)
    # No blocks at all: the embeddings themselves (the residual stream before the first block).
    first = eqx.filter_jit(lambda s: m.hidden(s, layers=0))(sample)
    assert not np.allclose(first, hidden)


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_copy_order_and_seen_biases_weigh_the_students_own_titles(name):
    config = ModelConfig(**TINY, copy_head=True, copy_order_bias=True, copy_seen_bias=True)
    m = build(name, config, key=jax.random.key(2))
    # Always copy, equal attention; reads 5, 7, 9 on one day, then the position predicting 4.
    m = eqx.tree_at(lambda t: (t.decoder.copy.gate_bias, t.decoder.copy.wq), m, (jnp.float32(-50.0), jnp.zeros((32, 32))))
    sample = row([5, 7, 9, 4], [1, 1, 1, 1], [0, 0, 0, 1])
    probs = lambda m: np.exp(np.asarray(eqx.filter_jit(eqx.nn.inference_mode(m))(sample)))[3]  # noqa: E731
    np.testing.assert_allclose(probs(m)[[5, 7, 9]], 1 / 3, atol=1e-5)  # both biases start neutral
    # The order bias prefers the latest of same-day reads: 9, then 7, then 5.
    ordered = probs(eqx.tree_at(lambda t: t.decoder.copy.order, m, jnp.float32(0.2)))[[9, 7, 5]]
    assert ordered[0] > ordered[1] > ordered[2]
    # The seen bias moves every title the student read by the same logit, against the others.
    gate_open = eqx.tree_at(lambda t: t.decoder.copy.gate_bias, m, jnp.float32(0.0))
    seen = eqx.tree_at(lambda t: t.decoder.copy.seen, gate_open, jnp.float32(-0.3))
    shift = np.log(probs(seen)) - np.log(probs(gate_open))
    np.testing.assert_allclose(shift[[5, 7, 9]] - shift[[1, 2, 3]].mean(), -3.0, atol=1e-4)
    np.testing.assert_allclose(shift[[1, 2, 3, 4, 50]] - shift[1], 0.0, atol=1e-4)


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_copy_head_gives_log_probabilities_and_copies_what_is_in_view(name):
    m = build(name, ModelConfig(**TINY, copy_head=True), key=jax.random.key(2))
    # A gate that always copies, with equal attention: the output is the titles in view, by count.
    m = eqx.tree_at(lambda t: (t.decoder.copy.gate_bias, t.decoder.copy.wq), m, (jnp.float32(-50.0), jnp.zeros((32, 32))))
    m = eqx.nn.inference_mode(m)
    sample = row([5, 5, 7, 9], [1, 1, 1, 1], [0, 1, 2, 3])
    scores = eqx.filter_jit(m)(sample)
    probs = np.exp(np.asarray(scores))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # Position 3 (predicting 9) sees the carried titles 5, 5, 7 (the BOS carries nothing).
    np.testing.assert_allclose(probs[3, [5, 7]], [2 / 3, 1 / 3], atol=1e-5)
    assert probs[3, 9] < 1e-5  # the target itself is never in view
    # The first read has nothing to copy: it keeps the output layer's distribution.
    np.testing.assert_allclose(scores[0], jax.nn.log_softmax(m.decoder.readout(m.hidden(sample)[0], sample.grade_level)), atol=1e-5)
    hidden = m.hidden(sample)
    np.testing.assert_allclose(m.logits_at(sample, hidden, jnp.array([2, 3])), scores[2:], rtol=1e-5, atol=1e-5)



def test_gap_buckets_count_half_octaves_of_hours_within_each_student():
    hour = 3600
    times = jnp.asarray([0, 0, hour, 25 * hour, 0, 10**9, 5, 0])
    segments = jnp.asarray([1, 1, 1, 1, 0, 2, 2, 0])
    np.testing.assert_array_equal(gap_buckets(times, segments), [0, 1, 3, 10, 0, 0, 1, 0])
    assert int(gap_buckets(jnp.asarray([0, 10**9]), jnp.asarray([1, 1]))[1]) == GAP_BUCKETS - 1


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_gap_embedding_tells_how_long_ago_the_previous_read_was(name):
    m = build(name, ModelConfig(**TINY, gap_embedding=True), key=jax.random.key(3))
    m = eqx.nn.inference_mode(eqx.tree_at(lambda t: t.decoder.gap_embedding, m, jax.random.normal(jax.random.key(4), (GAP_BUCKETS, 32))))
    day = 86400
    soon, late = (row([5, 7, 9], [1, 1, 1], [0, day, t]) for t in (2 * day, 30 * day))
    a, b = np.asarray(eqx.filter_jit(m)(soon)), np.asarray(eqx.filter_jit(m)(late))
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-5, atol=1e-5)  # earlier positions do not see the later time
    assert not np.allclose(a[2], b[2], atol=1e-3)


@pytest.mark.parametrize("gain", [1.0, 10.0])
@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_copy_recency_measures_the_age_of_each_carried_read(name, gain):
    m = build(name, ModelConfig(**TINY, copy_head=True, copy_bias_gain=gain), key=jax.random.key(2))
    m = eqx.tree_at(
        lambda t: (t.decoder.copy.gate_bias, t.decoder.copy.wq, t.decoder.copy.recency),
        m,
        (jnp.float32(-50.0), jnp.zeros((32, 32)), jnp.float32(2.0 / gain)),  # a recency of 2 logits per log-day
    )
    day = 86400
    probs = np.exp(np.asarray(eqx.filter_jit(eqx.nn.inference_mode(m))(row([5, 7, 9], [1, 1, 1], [0, 10 * day, 11 * day]))))
    # Predicting 9 at day 11: title 5 was read 11 days before, title 7 one day before.
    expected = np.exp(-2.0 * np.log1p(np.array([11.0, 1.0])))
    np.testing.assert_allclose(probs[2, [5, 7]], expected / expected.sum(), rtol=1e-4)


@pytest.mark.parametrize("name", ["study-reference", "study"])
def test_own_bias_starts_neutral(name):
    config = ModelConfig(**TINY, copy_head=True, gap_embedding=True)
    plain = eqx.nn.inference_mode(build(name, config, key=jax.random.key(5)))
    own = eqx.nn.inference_mode(build(name, dataclasses.replace(config, own_bias=0.0), key=jax.random.key(5)))
    np.testing.assert_allclose(eqx.filter_jit(own)(FIXTURE), eqx.filter_jit(plain)(FIXTURE), rtol=1e-5, atol=1e-5)


def test_own_bias_can_shut_classmates_out():
    m = eqx.nn.inference_mode(build("study-reference", ModelConfig(**TINY, copy_head=True, gap_embedding=True, own_bias=0.0), key=jax.random.key(5)))
    later_reads = np.asarray([7, 8, 9])  # student 2 after its first read: it has a past of its own
    sees_classmate = lambda m: np.asarray(influence(m, FIXTURE))[:5][:, later_reads].any()  # noqa: E731
    assert sees_classmate(m)
    shut = eqx.tree_at(lambda t: (t.decoder.blocks.attention.own, t.decoder.copy.own), m, (jnp.full((2, 2), 6.0), jnp.float32(6.0)))
    assert not sees_classmate(shut)


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_no_parameter_is_weakly_typed(name):
    """A weak-typed parameter comes back strongly typed from the first update, and the train step compiles twice."""
    config = ModelConfig(**TINY, own_bias=3.0, recency_bias=True, copy_head=True, gap_embedding=True, num_grade_levels=5)
    model = build(name, config, key=jax.random.key(0))
    weak = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(model)
            if isinstance(leaf, jax.Array) and leaf.weak_type]
    assert not weak, weak
