"""The factored output distribution equals the heads' mixture written out over the vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from studyrec.models.decoder import _pointer_weights
from studyrec.models.mixture import CopyPointer, MemoryPointer, Scores, mixture

N, V, M, K = 9, 13, 7, 4


def dense_reference(logits, copy: CopyPointer | None, memory: MemoryPointer | None):
    """The mixture as the module docstring writes it, one vocabulary-wide array at a time."""
    rows = jnp.arange(logits.shape[0])[:, None]
    p = jax.nn.softmax(logits, -1)
    if copy is not None:
        pointer = jnp.zeros_like(p).at[:, copy.titles].add(copy.weights)
        g = jax.nn.sigmoid(copy.gate)[:, None]
        p = jnp.where(copy.present[:, None], g * p + (1 - g) * pointer, p)
        if copy.seen_bias is not None:
            seen = jnp.zeros_like(p).at[:, copy.titles].max(copy.own.astype(p.dtype))
            p = p * jnp.exp(copy.seen_bias * seen)
            p = p / p.sum(-1, keepdims=True)
    if memory is not None:
        pointer = jnp.zeros_like(p).at[rows, memory.titles].add(memory.weights)
        g = jax.nn.sigmoid(memory.gate)[:, None]
        p = jnp.where(memory.present[:, None], g * pointer + (1 - g) * p, p)
    return jnp.log(p)


def pointers(seed: int, seen_bias: float | None):
    """Random pointers with repeated titles, title 0 (nothing), overlaps between copy and memory, and
    positions where a pointer sees nothing."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 6, M)  # few titles: repeats and zeros
    visible = (rng.random((N, M)) < 0.6) & (c > 0)[None]
    visible[0] = False
    scores = rng.normal(size=(N, M))
    w = np.where(visible, np.exp(scores), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    own = visible & (rng.random((N, M)) < 0.5)
    copy = CopyPointer(
        jnp.asarray(c, jnp.int32), jnp.asarray(w, jnp.float32), jnp.asarray(rng.normal(size=N), jnp.float32),
        jnp.asarray(visible.any(-1)), jnp.asarray(own) if seen_bias is not None else None,
        None if seen_bias is None else jnp.float32(seen_bias),
    )
    mt = rng.integers(0, 9, (N, K))
    mvisible = (mt > 0) & (rng.random((N, K)) < 0.8)
    mvisible[1] = False
    mw = np.where(mvisible, np.exp(rng.normal(size=(N, K))), 0.0)
    mw = mw / np.maximum(mw.sum(-1, keepdims=True), 1e-30)
    memory = MemoryPointer(jnp.asarray(mt, jnp.int32), jnp.asarray(mw, jnp.float32), jnp.asarray(rng.normal(size=N), jnp.float32), jnp.asarray(mvisible.any(-1)))
    logits = jnp.asarray(rng.normal(size=(N, V)) * 2, jnp.float32)
    return logits, copy, memory


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seen_bias", [None, -2.5, 1.7])
@pytest.mark.parametrize("heads", ["copy", "memory", "both", "none"])
def test_factored_equals_dense(seed, seen_bias, heads):
    logits, copy, memory = pointers(seed, seen_bias)
    copy = copy if heads in ("copy", "both") else None
    memory = memory if heads in ("memory", "both") else None
    want = dense_reference(logits, copy, memory)
    scores = mixture(logits, copy, memory)
    got = scores.log_probs()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.exp(got).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(scores.max(), got.max(-1))  # to the last bit
    targets = jnp.asarray(np.random.default_rng(seed).integers(0, V, N), jnp.int32)
    np.testing.assert_allclose(scores.at(targets), jnp.take_along_axis(want, targets[:, None], -1)[:, 0], rtol=1e-5, atol=1e-5)
    # Every title appears once among the slots in use.
    for row in np.asarray(scores.titles):
        used = row[row < V]
        assert len(used) == len(set(used.tolist()))


def test_gradients_match_and_are_finite():
    """Through the pointers' softmax, as the heads compute them (the factored form assumes weights summing to 1)."""
    logits, copy, memory = pointers(7, -1.3)
    targets = jnp.arange(N) % V
    rng = np.random.default_rng(8)
    copy_scores, memory_scores = jnp.asarray(rng.normal(size=(N, M)), jnp.float32), jnp.asarray(rng.normal(size=(N, K)), jnp.float32)
    copy_visible, memory_visible = copy.weights > 0, memory.weights > 0

    def loss(fn, logits, copy_scores, memory_scores, copy_gate, memory_gate):
        c = copy._replace(weights=_pointer_weights(copy_scores, copy_visible), gate=copy_gate)
        m = memory._replace(weights=_pointer_weights(memory_scores, memory_visible), gate=memory_gate)
        return -jnp.take_along_axis(fn(logits, c, m), targets[:, None], -1).sum()

    factored = lambda lg, c, m: mixture(lg, c, m).at(targets)[:, None] + jnp.zeros((N, V))  # noqa: E731
    args = (logits, copy_scores, memory_scores, copy.gate, memory.gate)
    got = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(factored, *args)
    want = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(dense_reference, *args)
    for g, w in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_matmul_rows_gradients_are_the_matmuls():
    from studyrec.models.decoder import matmul_rows

    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    kernel = jax.random.normal(jax.random.key(1), (4, 6))
    g = jax.random.normal(jax.random.key(2), (3, 5, 6))
    ours = jax.grad(lambda x, k: jnp.sum(matmul_rows(x, k) * g), argnums=(0, 1))(x, kernel)
    plain = jax.grad(lambda x, k: jnp.sum((x @ k) * g), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_slot_affinity_dense_is_the_gathered_dot_and_gradient():
    """The GPU's form (every title, then the slots' columns) gives the CPU's gathered dot products and
    their gradients, with a title repeated across slots and rows, and title 0."""
    from studyrec.models.decoder import slot_affinity

    q = jax.random.normal(jax.random.key(0), (7, 4))
    table = jax.random.normal(jax.random.key(1), (9, 4))
    titles = jnp.asarray([[0, 3, 3], [8, 1, 3], [2, 2, 2], [5, 0, 7], [3, 3, 8], [1, 4, 6], [0, 0, 0]], jnp.int32)
    g = jax.random.normal(jax.random.key(2), titles.shape)

    def run(dense):
        value = slot_affinity(q, table, titles, dense=dense)
        return value, jax.grad(lambda q, t: jnp.sum(slot_affinity(q, t, titles, dense=dense) * g), argnums=(0, 1))(q, table)

    (gathered, grads), (dense, dense_grads) = run(False), run(True)
    expected = np.take_along_axis(np.asarray(q) @ np.asarray(table).T, np.asarray(titles), axis=-1)
    np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, gathered, rtol=1e-5, atol=1e-5)
    for a, b in zip(dense_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[1][0]).sum()) > 0  # title 0's row gets its gradient too


@pytest.mark.parametrize("name", ["individual", "study-reference", "study"])
def test_batched_scores_read_out_every_row_like_the_model(name):
    """The batch's output layer at once (``batched_scores``) gives each row's ``model.scores``, and the
    same gradients, on real packed rows with a classroom memory and grade levels."""
    import equinox as eqx

    from studyrec.models import ModelConfig, batched_scores, build
    from test_memory import packer_with_memory
    from test_models import TINY, awake

    batch = packer_with_memory().random_rows(0, np.arange(4))
    batch = batch._replace(grade_level=jnp.asarray([0, 1, 2, 3], jnp.int32))
    config = ModelConfig(**{**TINY, "max_len": 24}, num_grade_levels=3, copy_head=True, copy_seen_bias=True,
                         copy_order_bias=True, tie_embeddings=name == "study",
                         memory_size=6 if name == "study" else 0)
    model = eqx.nn.inference_mode(awake(build(name, config, key=jax.random.key(0))))
    model = eqx.tree_at(lambda m: m.decoder.grade_bias, model, jax.random.normal(jax.random.key(5), model.decoder.grade_bias.shape))
    targets = jnp.asarray(batch.titles)

    def together(m):
        return batched_scores(m, batch).at(targets).sum()

    def row_by_row(m):
        return jax.vmap(lambda s, t: m.scores(s).at(t))(batch, targets).sum()

    np.testing.assert_allclose(
        batched_scores(model, batch).log_probs(), jax.vmap(lambda s: model.scores(s).log_probs())(batch), rtol=1e-5, atol=1e-5
    )
    ours, theirs = eqx.filter_grad(together)(model), eqx.filter_grad(row_by_row)(model)
    for a, b in zip(jax.tree.leaves(eqx.filter(ours, eqx.is_array)), jax.tree.leaves(eqx.filter(theirs, eqx.is_array))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_max_ignores_the_logits_at_slot_titles():
    # The logits peak at a slot's title whose value is lower (a negative seen bias): the maximum is elsewhere.
    logits = jnp.asarray([[0.0, 9.0, 1.0, 2.0]])
    scores = Scores(logits, jnp.asarray([-0.5]), jnp.asarray([[1, 4]]), jnp.asarray([[-3.0, 7.0]]))
    assert float(scores.max()[0]) == 1.5 == float(scores.log_probs().max())
    lifted = scores._replace(values=jnp.asarray([[4.0, 7.0]]))
    assert float(lifted.max()[0]) == 4.0 == float(lifted.log_probs().max())
