import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from studyrec.data import Sample
from studyrec.models import ModelConfig, build
from studyrec.models.study import Study, content_mask, query_mask, two_stream_mask

SEP = 99
TINY = dict(vocab_size=100, num_layers=2, d_model=32, qkv_dim=32, num_heads=2, mlp_dim=32, max_len=24)


def model(**overrides):
    """An inference-mode model (copy-head biases away from their neutral start: see test_models.awake)."""
    from test_models import awake

    return eqx.nn.inference_mode(awake(Study(ModelConfig(**{**TINY, **overrides}), key=jax.random.key(0))))


def row(titles, segments, timestamps, grade=0):
    positions, count = [], {}
    for s in segments:
        positions.append(count.get(s, 0) if s else 0)
        count[s] = count.get(s, 0) + 1
    arr = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return Sample(arr(titles), arr(segments), arr(timestamps), arr(positions), jnp.int32(grade))


def random_row(rng, length=24):
    """2-4 students with 1-5 reads each, sorted times with ties, separators, right padding."""
    titles, segs, times = [], [], []
    for slot, n in enumerate(rng.integers(1, 6, size=rng.integers(2, 5)), start=1):
        if titles:
            titles.append(SEP), segs.append(0), times.append(0)
        titles += rng.integers(1, 90, n).tolist()
        segs += [slot] * n
        times += sorted(rng.integers(0, 5, n).tolist())
    pad = length - len(titles)
    return row(titles + [0] * pad, segs + [0] * pad, times + [0] * pad)


# The reference's STUDY fixture (spec §10), with segments in place of raw student ids.
FIXTURE = row([1, 2, 3, 4, 5, SEP, 7, 8, 9, 10], [1, 1, 1, 1, 1, 0, 2, 2, 2, 2], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])


def exact_dependencies(sample: Sample) -> np.ndarray:
    """D[i, j]: may the title at i reach the output at j? Own earlier titles, or a classmate's strictly earlier."""
    seg, ts = np.asarray(sample.segments), np.asarray(sample.timestamps)
    idx = np.arange(len(seg))
    real = (seg > 0)[:, None] & (seg > 0)[None, :]
    same = seg[:, None] == seg[None, :]
    return real & ((same & (idx[:, None] < idx[None, :])) | (~same & (ts[:, None] < ts[None, :])))


@eqx.filter_jit
def influence(m, samples: Sample):
    """bool [row, i, j]: does replacing the title at i change the logits at j? (one batched pass)"""
    n = samples.titles.shape[-1]

    def one_row(sample):
        swap = lambda i: sample.titles.at[i].set(sample.titles[i] % 89 + 1)  # noqa: E731  a different title
        titles = jnp.concatenate([jax.vmap(swap)(jnp.arange(n)), sample.titles[None]])
        out = jax.vmap(lambda t: m(sample._replace(titles=t)))(titles)
        return jnp.any(jnp.abs(out[:n] - out[n]) > 1e-5, axis=-1)

    return jax.vmap(one_row)(samples)


def assert_exact(diffs, sample):
    deps = exact_dependencies(sample)
    real = np.asarray(sample.segments) > 0
    for i in np.flatnonzero(real):
        np.testing.assert_array_equal(diffs[i][real], deps[i][real], err_msg=f"title {i}")


def test_reference_fixture_sees_what_study_lags():
    deps = exact_dependencies(FIXTURE)
    # StudyReference's one-step lag hides titles 2, 3, 4, 4 from outputs 6, 7, 8, 9; here they are visible,
    # and so is student 1's last title (4, at t=4) from outputs 8 and 9.
    assert deps[2, 6] and deps[3, 7] and deps[4, 8] and deps[4, 9]
    assert not deps[3, 6] and not deps[4, 7]  # same-day classmates stay hidden


@pytest.mark.parametrize("copy_head", [False, True], ids=["plain", "copy-head-gaps-order-seen"])
def test_dependency_map_is_exact_through_all_layers(copy_head):
    """The fixture and six random rows, in one batched pass through a 2-layer model."""
    fixture = FIXTURE._replace(
        **{f: jnp.pad(getattr(FIXTURE, f), (0, 14)) for f in ("titles", "segments", "timestamps", "positions")}
    )
    rows = [fixture] + [random_row(np.random.default_rng(seed)) for seed in range(6)]
    m = model(copy_head=copy_head, gap_embedding=copy_head, copy_order_bias=copy_head, copy_seen_bias=copy_head)
    diffs = np.asarray(influence(m, jax.tree.map(lambda *x: jnp.stack(x), *rows)))
    for d, s in zip(diffs, rows):
        assert_exact(d, s)


def test_masks():
    seg = jnp.asarray([1, 1, 0, 2, 2, 0, 0])
    ts = jnp.asarray([0, 5, 0, 1, 9, 0, 0])
    pad = np.asarray(seg) == 0
    c, q = np.asarray(content_mask(seg, ts)), np.asarray(query_mask(seg, ts))
    for mask in (c, q):
        assert not mask[:, pad].any() and not mask[pad].any()
    np.testing.assert_array_equal(np.diag(c), ~pad)
    assert not np.diag(q).any()
    assert c[4, 0] and not c[3, 1] and not c[0, 3]
    np.testing.assert_array_equal(two_stream_mask(seg, ts), np.concatenate([c, q]))
    assert not q[0].any() and q[3, 0], "the earliest read sees nothing; the next student's sees it"


@pytest.mark.parametrize(("dtype", "grades", "tied"), [("float32", None, True), ("bfloat16", 5, False)])
def test_shapes_jit_and_vmap(dtype, grades, tied):
    m = model(dtype=dtype, num_grade_levels=grades, tie_embeddings=tied)
    s = FIXTURE._replace(grade_level=jnp.int32(3))
    outs = jax.jit(jax.vmap(m))(jax.tree.map(lambda x: jnp.stack([x, x]), s))
    assert outs.shape == (2, 10, 100) and outs.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(outs))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_same_parameters_as_study():
    config = ModelConfig(**TINY, num_grade_levels=3)
    lagfree = Study(config, key=jax.random.key(0))
    study = build("study-reference", config, key=jax.random.key(0))
    leaves = lambda m: jax.tree_util.tree_leaves_with_path(eqx.filter(m, eqx.is_array))  # noqa: E731
    assert [jax.tree_util.keystr(p) for p, _ in leaves(lagfree)] == [jax.tree_util.keystr(p) for p, _ in leaves(study)]
    for (path, a), (_, b) in zip(leaves(lagfree), leaves(study)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert lagfree.config == config


def test_gradients_reach_every_parameter_and_dropout_uses_the_key():
    m = Study(ModelConfig(**TINY, num_grade_levels=3, recency_bias=True), key=jax.random.key(0))
    s = FIXTURE._replace(grade_level=jnp.int32(2))

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss_and_grad(m, key):
        logits = m(s, key=key)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(10), s.titles])

    loss, grads = loss_and_grad(m, jax.random.key(3))
    for path, g in jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array)):
        assert jnp.all(jnp.isfinite(g)), path
        assert jnp.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert loss != loss_and_grad(m, jax.random.key(4))[0], "dropout ignores the key"


def test_build_by_name():
    m = build("study", ModelConfig(**TINY), key=jax.random.key(0))
    assert isinstance(m, Study)
    assert eqx.filter_jit(eqx.nn.inference_mode(m))(FIXTURE).shape == (10, 100)
