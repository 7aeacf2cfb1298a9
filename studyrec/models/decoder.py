"""The shared transformer decoder (pre-LayerNorm, the reference's WMT-style layout, spec §5.1)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, UInt

from studyrec.models.config import ModelConfig
from studyrec.models.mixture import CopyPointer, MemoryPointer, Scores, mixture


@jax.custom_vjp
def matmul_rows(x: Float[Array, "*rows d"], kernel: Float[Array, "d out"]) -> Float[Array, "*rows out"]:
    """``x @ kernel`` (the output layer), whose kernel gradient ``x.T @ g`` transposes the narrow
    ``x``: differentiated by default, XLA transposed the ``[rows, vocab]`` output gradient instead
    (about 3% of the op time of a ``cpu-small`` step). Call it on a whole batch: under ``vmap`` the custom
    gradient is computed row by row and then summed."""
    return x @ kernel


def _matmul_rows_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_rows_bwd(residuals, g):
    x, kernel = residuals
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return (g @ kernel.T).astype(x.dtype), (flat_x.T @ flat_g).astype(kernel.dtype)


matmul_rows.defvjp(_matmul_rows_fwd, _matmul_rows_bwd)


@functools.cache
def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The reference's table: sin and cos halves concatenated, divisor ``d/2 - 1``."""
    half = d_model // 2
    div = np.exp(-np.arange(half) * math.log(10000.0) / max(half - 1, 1))
    angles = np.arange(max_len)[:, None] * div[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _xavier(key: PRNGKeyArray, fan_in: int, fan_out: int) -> Float[Array, "i o"]:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), minval=-limit, maxval=limit)


def recency_gap(timestamps: Int[ArrayLike, " seq"], key_times: Int[ArrayLike, " seq"] | None = None) -> Float[Array, "seq seq"]:
    """``log(1 + days)`` from each key's time (default: its interaction) to each query's (0 for keys not earlier)."""
    key_times = timestamps if key_times is None else key_times
    seconds = (timestamps[:, None] - key_times[None, :]).astype(jnp.float32)
    return jnp.log1p(jnp.maximum(seconds, 0.0) / 86400.0)


GAP_BUCKETS = 32


def gap_buckets(timestamps: Int[ArrayLike, " seq"], segments: Int[ArrayLike, " seq"]) -> Int[Array, " seq"]:
    """Time since the same student's previous position, in half-octaves of hours (0: a student's first position).

    Bucket ``1 + floor(2 log2(1 + hours))``, capped at ``GAP_BUCKETS - 1`` (about 13 months).
    """
    hours = (timestamps[1:] - timestamps[:-1]).astype(jnp.float32) / 3600.0
    bucket = 1 + jnp.floor(2 * jnp.log2(1 + jnp.maximum(hours, 0.0))).astype(jnp.int32)
    bucket = jnp.minimum(bucket, GAP_BUCKETS - 1)
    same_student = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.where(same_student, bucket, 0)])


def mix32(x: UInt[Array, "*s"]) -> UInt[Array, "*s"]:
    """Wellons' ``lowbias32``: an invertible 32-bit mixer whose every output bit depends on every input bit (uint32)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform_bits(key: PRNGKeyArray, shape: tuple[int, ...]) -> UInt[Array, "*shape"]:
    """uint32 draws for ``shape``: two words from ``key``, then ``mix32`` twice over each element's
    index, keyed by them. Elementwise, so XLA fuses the draws into whatever reads them and none is
    stored; a keyed permutation of the indices, so an array's draws never repeat."""
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"{size} draws: more than 2**32 elements would repeat their indices")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return mix32(mix32(index ^ seed[0]) ^ seed[1])


class Dropout(eqx.Module):
    """``eqx.nn.Dropout`` with its keep/drop draws from :func:`hashed_uniform_bits` (the rate rounded to
    a multiple of ``2**-32``). Threefry's bits for every dropout of a ``cpu-small`` STUDY step took
    25 ms on this project's 2-core CPU, about a tenth of the step; the hash costs a few integer
    operations per element inside the fused multiply."""

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(self, x: Float[Array, "*s"], *, key: PRNGKeyArray | None = None, inference: bool | None = None) -> Float[Array, "*s"]:
        inference = self.inference if inference is None else inference
        if inference or self.p == 0:
            return x
        if key is None:
            raise RuntimeError("Dropout needs a key in training mode (or use eqx.nn.inference_mode)")
        dropped = min(round(self.p * 2**32), 2**32 - 1)
        keep = hashed_uniform_bits(key, x.shape) >= jnp.uint32(dropped)
        return jnp.where(keep, x * jnp.asarray(2**32 / (2**32 - dropped), x.dtype), jnp.zeros((), x.dtype))


class LayerNorm(eqx.Module):
    scale: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True, default=1e-6)

    def __init__(self, d: int):
        self.scale, self.bias = jnp.ones(d), jnp.zeros(d)

    def __call__(self, x: Float[Array, "*rows d"]) -> Float[Array, "*rows d"]:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.bias).astype(x.dtype)


# The own-student biases are stored divided by this, so Adam (whose steps are about the learning
# rate per parameter) moves them by whole logits within a few hundred steps.
OWN_BIAS_GAIN = 10.0


class Attention(eqx.Module):
    """Multi-head self-attention without biases."""

    wq: Float[Array, "d qkv"]
    wk: Float[Array, "d qkv"]
    wv: Float[Array, "d qkv"]
    wo: Float[Array, "qkv d"]
    weight_dropout: Dropout
    recency: Float[Array, " heads"] | None
    own: Float[Array, " heads"] | None
    num_heads: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, qkv = config.d_model, config.qkv_dim
        self.wq, self.wk, self.wv = _xavier(kq, d, qkv), _xavier(kk, d, qkv), _xavier(kv, d, qkv)
        self.wo = _xavier(ko, qkv, d)
        self.weight_dropout = Dropout(config.attention_dropout)
        self.recency = jnp.zeros(config.num_heads) if config.recency_bias else None
        self.own = None if config.own_bias is None else jnp.full(config.num_heads, config.own_bias / OWN_BIAS_GAIN, jnp.float32)
        self.num_heads = config.num_heads

    def score_bias(
        self,
        dtype,
        log_gap: Float[Array, "q k"] | None = None,
        same_student: Bool[ArrayLike, "q k"] | None = None,
    ) -> Float[Array, "heads q k"] | None:
        """What the learned biases add to the attention scores: the recency term and the own-student term."""
        bias = None
        if self.recency is not None and log_gap is not None:
            bias = -self.recency[:, None, None] * log_gap[None]
        if self.own is not None and same_student is not None:
            own = OWN_BIAS_GAIN * self.own[:, None, None] * same_student[None].astype(self.own.dtype)
            bias = own if bias is None else bias + own
        return None if bias is None else bias.astype(dtype)

    def _heads(self, x: Float[Array, "n d"], w: Float[Array, "d qkv"]) -> Float[Array, "n heads dh"]:
        return (x @ w.astype(x.dtype)).reshape(x.shape[0], self.num_heads, -1)

    def _weights(
        self,
        q: Float[Array, "q heads dh"],
        k: Float[Array, "k heads dh"],
        mask: Bool[Array, "q k"],
        bias: Float[Array, "heads q k"] | None,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "heads q k"]:
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        return self.weight_dropout(jax.nn.softmax(scores, axis=-1), key=key)

    def weights(
        self, queries: Float[Array, "q d"], keys: Float[Array, "k d"], mask: Bool[Array, "q k"], **bias_inputs
    ) -> Float[Array, "heads q k"]:
        """The attention weights of ``queries`` over ``keys`` per head (float32; the explanations read them)."""
        bias = self.score_bias(queries.dtype, **bias_inputs)
        return self._weights(self._heads(queries, self.wq), self._heads(keys, self.wk), mask, bias, None)

    def attend(
        self,
        queries: Float[Array, "q d"],
        keys: Float[Array, "k d"],
        mask: Bool[Array, "q k"],
        *,
        key: PRNGKeyArray | None,
        **bias_inputs,
    ) -> Float[Array, "q d"]:
        """Attention of ``queries`` over ``keys`` (which also give the values); ``bias_inputs`` feed :meth:`score_bias`."""
        dt = queries.dtype
        q, k, v = self._heads(queries, self.wq), self._heads(keys, self.wk), self._heads(keys, self.wv)
        bias = self.score_bias(dt, **bias_inputs)
        if self.weight_dropout.inference or self.weight_dropout.p == 0:
            with jax.numpy_dtype_promotion("standard"):  # JAX promotes bfloat16 with float32 inside, as Equinox allows
                out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[None])
        else:  # dropout on the attention weights needs them materialised
            weights = self._weights(q, k, mask, bias, key).astype(dt)
            out = jnp.einsum("hqk,khd->qhd", weights, v)
        return out.reshape(queries.shape[0], -1) @ self.wo.astype(dt)

    def __call__(
        self, x: Float[Array, "seq d"], mask: Bool[Array, "seq seq"], *, key: PRNGKeyArray | None, **bias_inputs
    ) -> Float[Array, "seq d"]:
        """Self-attention: ``attend(x, x, mask)``."""
        return self.attend(x, x, mask, key=key, **bias_inputs)


class MLP(eqx.Module):
    w1: Float[Array, "d mlp"]
    b1: Float[Array, " mlp"]
    w2: Float[Array, "mlp d"]
    b2: Float[Array, " d"]
    dropout: Dropout

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.w1, self.w2 = _xavier(k1, config.d_model, config.mlp_dim), _xavier(k2, config.mlp_dim, config.d_model)
        self.b1 = 1e-6 * jax.random.normal(k3, (config.mlp_dim,))
        self.b2 = 1e-6 * jax.random.normal(k4, (config.d_model,))
        self.dropout = Dropout(config.dropout)

    def __call__(self, x: Float[Array, "seq d"], *, key: PRNGKeyArray | None) -> Float[Array, "seq d"]:
        dt = x.dtype
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        h = jax.nn.relu(x @ self.w1.astype(dt) + self.b1.astype(dt))
        h = self.dropout(h, key=k1)
        return self.dropout(h @ self.w2.astype(dt) + self.b2.astype(dt), key=k2)


class Block(eqx.Module):
    """``x + Dropout(Attn(LN(x)))``, then ``x + MLP(LN(x))``."""

    ln1: LayerNorm
    attention: Attention
    ln2: LayerNorm
    mlp: MLP
    dropout: Dropout

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        self.ln1, self.ln2 = LayerNorm(config.d_model), LayerNorm(config.d_model)
        self.attention = Attention(config, key=ka)
        self.mlp = MLP(config, key=km)
        self.dropout = Dropout(config.dropout)

    def __call__(
        self,
        x: Float[Array, "rows d"],
        mask: Bool[Array, "out seq"],
        *,
        key: PRNGKeyArray | None,
        attend: Callable | None = None,
        **bias_inputs,
    ) -> Float[Array, "out d"]:
        """``bias_inputs``: ``Attention``'s ``log_gap`` and ``same_student``, where the model has those biases.

        ``attend(attention, h, mask, key=..., **bias_inputs)`` replaces self-attention (the two-stream
        model's queries read only the content stream). It may return fewer rows than ``x``, the last
        ones: only those go on (the other rows then served only as keys and values).
        """
        ka, kd, km = (None, None, None) if key is None else jax.random.split(key, 3)
        h = self.ln1(x)
        attend = type(self.attention).__call__ if attend is None else attend
        attended = attend(self.attention, h, mask, key=ka, **bias_inputs)
        x = x[x.shape[0] - attended.shape[0] :] + self.dropout(attended, key=kd)
        return x + self.mlp(self.ln2(x), key=km)


def _pointer_weights(scores: Float[Array, "n m"], visible: Bool[ArrayLike, "n m"]) -> Float[Array, "n m"]:
    """A softmax over the visible entries of each row (all zero where none is)."""
    weights = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return weights * visible.astype(jnp.float32)


class CopyHead(eqx.Module):
    """A pointer over the titles a position may see, as in pointer-generator networks.

    The output is ``g * softmax(logits) + (1 - g) * copy``: ``copy`` spreads one attention
    distribution (with a learned recency bias) over the titles carried by the visible keys, and the
    gate ``g`` depends on the query. Copying a title seen in context (the student's last read, a
    classmate's recent one) then needs no title-specific weights, so it carries over to unseen weeks.
    """

    wq: Float[Array, "d d"]
    wk: Float[Array, "d d"]
    gate: Float[Array, " d"]
    gate_bias: Float[Array, ""]
    recency: Float[Array, ""]
    own: Float[Array, ""] | None
    order: Float[Array, ""] | None
    seen: Float[Array, ""] | None
    gain: float = eqx.field(static=True)

    def __init__(
        self, d_model: int, *, own_bias: bool = False, order_bias: bool = False, seen_bias: bool = False, gain: float,
        key: PRNGKeyArray,
    ):
        kq, kk = jax.random.split(key)
        self.gain = gain
        self.wq, self.wk = _xavier(kq, d_model, d_model), _xavier(kk, d_model, d_model)
        self.gate, self.gate_bias, self.recency = jnp.zeros(d_model), jnp.zeros(()), jnp.zeros(())
        self.own = jnp.zeros(()) if own_bias else None
        self.order = jnp.zeros(()) if order_bias else None
        self.seen = jnp.zeros(()) if seen_bias else None

    def pointer(
        self,
        queries: Float[Array, "n d"],
        keys: Float[Array, "m d"],
        carried: Int[ArrayLike, " m"],
        mask: Bool[Array, "n m"],
        log_gap: Float[Array, "n m"],
        same_student: Bool[ArrayLike, "n m"] | None = None,
    ) -> CopyPointer:
        """The pointer and gate at each query (``studyrec.models.mixture`` mixes them into the output)."""
        q, k = queries.astype(jnp.float32), keys.astype(jnp.float32)
        visible = mask & (carried > 0)[None, :]
        scores = (q @ self.wq) @ (k @ self.wk).T / math.sqrt(q.shape[-1]) - self.gain * self.recency * log_gap
        if self.own is not None and same_student is not None:
            scores = scores + OWN_BIAS_GAIN * self.own * same_student.astype(self.own.dtype)
        own = None if same_student is None else visible & same_student
        if self.order is not None and own is not None:
            # How many of the student's own visible titles come after each one: 0 for the latest read,
            # which same-day reads (equal ages) cannot tell apart by recency alone.
            own_f = own.astype(jnp.float32)
            later = jnp.cumsum(own_f[:, ::-1], axis=1)[:, ::-1] - own_f
            scores = scores - self.gain * self.order * own_f * jnp.log1p(later)
        # One learned logit for every title the student's own keys in view carry: read again
        # (re-reading, positive) or not (ratings are never repeated, negative).
        seen = self.seen is not None and own is not None
        return CopyPointer(
            jnp.asarray(carried), _pointer_weights(scores, visible), q @ self.gate + self.gain * self.gate_bias,
            visible.any(-1), own if seen else None, self.gain * self.seen if seen else None,
        )


# Distinct titles a row's memory may hold, per memory slot, to be scored once each: a generated
# classroom's row of 65 positions holds about 80 in its 65 * 32 slots (at most 109 in 3,200 rows).
DISTINCT_PER_SLOT = 4


class DistinctTitles(NamedTuple):
    """The titles of a row's memory slots, each once, so that a query scores each title once."""

    titles: Int[Array, "*rows size"]  # the row's distinct titles (0: unused)
    slots: Int[Array, "*rows n k"]  # each slot's title's place among them
    fits: Bool[Array, ""]  # every row's distinct titles fit in ``size`` (else the slots are scored one by one)


def distinct_titles(titles: Int[ArrayLike, "rows n k"], vocab: int, size: int) -> DistinctTitles:
    """Each row's distinct titles (0 excluded) in increasing order, from a table over the vocabulary."""
    titles = jnp.asarray(titles)
    rows = jnp.arange(titles.shape[0])[:, None]
    flat = titles.reshape(titles.shape[0], -1)
    present = jnp.zeros((titles.shape[0], vocab), jnp.int32).at[rows, flat].max(1).at[:, 0].set(0)
    place = jnp.cumsum(present, axis=1) - 1
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), place.shape)
    distinct = jnp.zeros((titles.shape[0], size), jnp.int32).at[rows, jnp.where(present > 0, place, size)].set(ids, mode="drop")
    slots = jnp.take_along_axis(place, flat, axis=1, mode="clip").reshape(titles.shape)
    return DistinctTitles(distinct, jnp.clip(slots, 0, size - 1), jnp.all(place[:, -1] < size))


def scores_every_title() -> bool:
    """Whether ``slot_affinity`` takes its dense form here: on an accelerator, not on a CPU (the
    same numbers either way, up to rounding)."""
    return jax.default_backend() != "cpu"


def slot_affinity(
    q: Float[Array, "n d"],
    embeddings: Float[Array, "vocab d"],
    titles: Int[Array, "n k"],
    *,
    dense: bool,
    distinct: DistinctTitles | None = None,
) -> Float[Array, "n k"]:
    """``q[i] . embeddings[titles[i, j]]`` in float32. ``dense`` scores every title by one product and
    keeps the slots' columns: on a GPU the gathered form's gradient, a scatter-add of a row per slot,
    took a third of a `paper` step. On a CPU, with the row's ``distinct`` titles (one row's, with the
    batch's ``fits``), each query scores each distinct title once and the slots read their column:
    a row's 2,080 slots hold about 80 titles, and gathering a table row per slot, and scattering its
    gradient back, cost 5.5-7.3% of a ``cpu-small`` step. Else (or where they do not fit) the slots are
    scored one by one."""
    table = embeddings.astype(jnp.float32)
    if dense:
        return jnp.take_along_axis(q @ table.T, titles, axis=-1, mode="clip")
    one_by_one = lambda q, table: jnp.einsum("nd,nkd->nk", q, table[titles])  # noqa: E731
    if distinct is None:
        return one_by_one(q, table)
    by_title = lambda q, table: jnp.take_along_axis(q @ table[distinct.titles].T, distinct.slots, axis=-1)  # noqa: E731
    # Rematerialised: a differentiated ``cond`` keeps the residuals of both branches, and the one by
    # one form's are the gathered ``[n, k, d]`` rows.
    return jax.lax.cond(distinct.fits, jax.checkpoint(by_title), jax.checkpoint(one_by_one), q, table)


class MemoryHead(eqx.Module):
    """A pointer over the classroom memory (``studyrec.data.memory``): the titles a position's classroom
    read most in the days strictly before it, however many classmates that is.

    A slot's score is ``q W e_title / sqrt(d) + a log(reads) - r log(1 + days since its latest read)``,
    so at the start (``a = 1``, ``r = 0``) the pointer spreads over the titles in proportion to their
    reads, as the classmates heuristic ranks them, and learns from there whom to follow. The output
    is ``g * memory + (1 - g) * p``, ``p`` the distribution it is given and ``g`` a gate on the query.
    """

    wq: Float[Array, "d d"]
    reads: Float[Array, ""]
    recency: Float[Array, ""]
    gate: Float[Array, " d"]
    gate_bias: Float[Array, ""]
    gain: float = eqx.field(static=True)

    def __init__(self, d_model: int, *, gain: float, key: PRNGKeyArray):
        self.gain = gain
        self.wq = _xavier(key, d_model, d_model)
        self.reads = jnp.full((), 1.0 / gain, jnp.float32)
        self.recency, self.gate, self.gate_bias = jnp.zeros(()), jnp.zeros(d_model), jnp.zeros(())

    def pointer(
        self,
        queries: Float[Array, "n d"],
        embeddings: Float[Array, "vocab d"],
        titles: Int[ArrayLike, "n k"],
        reads: Int[ArrayLike, "n k"],
        log_gap: Float[Array, "n k"],
        visible: Bool[ArrayLike, "n k"],
        distinct: DistinctTitles | None = None,
    ) -> MemoryPointer:
        """The pointer and gate at each query; a query with an empty memory keeps what precedes it.
        ``distinct``: the row's titles, each once (``slot_affinity``)."""
        q = queries.astype(jnp.float32)
        affinity = slot_affinity(q @ self.wq, embeddings, jnp.asarray(titles), dense=scores_every_title(), distinct=distinct)
        affinity = affinity / math.sqrt(q.shape[-1])
        count = jnp.log(jnp.maximum(reads, 1).astype(jnp.float32))
        scores = affinity + self.gain * (self.reads * count - self.recency * log_gap)
        gate = q @ self.gate + self.gain * self.gate_bias
        return MemoryPointer(jnp.asarray(titles), _pointer_weights(scores, visible), gate, jnp.asarray(visible).any(-1))


class Decoder(eqx.Module):
    """Embeddings, a scanned stack of blocks, final LayerNorm and the output layer."""

    embedding: Float[Array, "vocab d"]
    blocks: Block  # stacked: every array has a leading ``layers`` axis
    final_ln: LayerNorm
    out_kernel: Float[Array, "d vocab"] | None
    out_bias: Float[Array, " vocab"]
    grade_bias: Float[Array, "grades vocab"] | None
    gap_embedding: Float[Array, "buckets d"] | None
    copy: CopyHead | None
    memory: MemoryHead | None
    embed_dropout: Dropout
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        ke, kb, ko, kg, kbias = jax.random.split(key, 5)
        V, d = config.vocab_size, config.d_model
        # Tied tables double as output weights, so they start at the scale of a dense kernel.
        scale = 1.0 / math.sqrt(d) if config.tie_embeddings else 1.0
        self.embedding = scale * jax.random.normal(ke, (V, d))
        self.blocks = eqx.filter_vmap(lambda k: Block(config, key=k))(jax.random.split(kb, config.num_layers))
        self.final_ln = LayerNorm(d)
        self.out_kernel = None if config.tie_embeddings else _xavier(ko, d, V)
        self.out_bias = 1e-6 * jax.random.normal(kbias, (V,))
        self.grade_bias = (
            None if config.num_grade_levels is None else 0.01 * jax.random.normal(kg, (config.num_grade_levels + 1, V))
        )
        self.gap_embedding = jnp.zeros((GAP_BUCKETS, d)) if config.gap_embedding else None
        self.copy = (
            CopyHead(
                d, own_bias=config.own_bias is not None, order_bias=config.copy_order_bias,
                seen_bias=config.copy_seen_bias, gain=config.copy_bias_gain, key=jax.random.fold_in(key, 1),
            )
            if config.copy_head
            else None
        )
        self.memory = MemoryHead(d, gain=config.copy_bias_gain, key=jax.random.fold_in(key, 2)) if config.memory_size else None
        self.embed_dropout = Dropout(config.dropout)
        self.config = config

    def embed(
        self,
        tokens: Int[ArrayLike, " seq"],
        positions: Int[ArrayLike, " seq"],
        gaps: Int[ArrayLike, " seq"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d"]:
        """Title embeddings plus sinusoidal positions (plus the ``gap_buckets`` embedding), after dropout, in the compute dtype."""
        x = self.embedding[tokens]
        if self.config.tie_embeddings:
            x = x * math.sqrt(self.config.d_model)
        x = x + jnp.asarray(sinusoidal_table(self.config.max_len, self.config.d_model))[positions]
        if self.gap_embedding is not None:
            if gaps is None:
                raise ValueError("this model embeds the time since each student's previous read: pass gaps")
            x = x + self.gap_embedding[gaps]
        return self.embed_dropout(x, key=key).astype(self.config.dtype)

    def transform(
        self,
        x: Float[Array, "rows d"],
        block_fn: Callable[[Block, Float[Array, "rows d"], PRNGKeyArray | None], Float[Array, "rows d"]],
        *,
        key: PRNGKeyArray | None = None,
        layers: int | None = None,
        last_fn: Callable[[Block, Float[Array, "rows d"], PRNGKeyArray | None], Float[Array, "out d"]] | None = None,
    ) -> Float[Array, "out d"]:
        """The first ``layers`` blocks (default: all), one after another; ``block_fn(block, x, key)`` applies one.

        ``last_fn``, when given, applies the last of them instead (it may return fewer rows)."""
        layers = self.config.num_layers if layers is None else layers
        params, static = eqx.partition(self.blocks, eqx.is_array)
        layer_keys = None if key is None else jax.random.split(key, self.config.num_layers)
        scanned = layers - (last_fn is not None)

        def layer(x, xs):
            block_params, layer_key = xs
            return block_fn(eqx.combine(block_params, static), x, layer_key), None

        take = lambda a, n: None if a is None else jax.tree.map(lambda leaf: leaf[:n], a)  # noqa: E731
        # Unrolled: a rolled scan stacks every layer's activations for the gradient (a zeroed buffer,
        # a copy in and a copy out per layer), about 8% of a small model's CPU step in a profile.
        x, _ = jax.lax.scan(layer, x, (take(params, scanned), take(layer_keys, scanned)), unroll=max(scanned, 1))
        if last_fn is None:
            return x
        last = eqx.combine(jax.tree.map(lambda leaf: leaf[scanned], params), static)
        return last_fn(last, x, None if layer_keys is None else layer_keys[scanned])

    def bias_inputs(self, timestamps: Int[ArrayLike, " seq"] | None, segments: Int[ArrayLike, " seq"] | None) -> dict:
        """``Attention.score_bias``'s inputs for this model: ``log_gap`` (recency bias), ``same_student`` (own bias)."""
        extra = {}
        if self.config.recency_bias and timestamps is not None:
            extra["log_gap"] = recency_gap(timestamps)
        if self.config.own_bias is not None and segments is not None:
            extra["same_student"] = segments[:, None] == segments[None, :]
        return extra

    def attention_inputs(
        self,
        mask: Bool[Array, "seq seq"],
        timestamps: Int[ArrayLike, " seq"] | None,
        segments: Int[ArrayLike, " seq"] | None = None,
    ) -> tuple[Bool[Array, "seq seq"], dict]:
        """The mask every block applies and its keyword arguments (``bias_inputs``)."""
        # A query that sees nothing (padding) attends to itself, so no softmax row is empty.
        mask = mask | jnp.eye(mask.shape[0], dtype=bool)
        return mask, self.bias_inputs(timestamps, segments)

    def hidden(
        self,
        inputs: Int[ArrayLike, " seq"],
        positions: Int[ArrayLike, " seq"],
        mask: Bool[Array, "seq seq"],
        *,
        timestamps: Int[ArrayLike, " seq"] | None = None,
        segments: Int[ArrayLike, " seq"] | None = None,
        gaps: Int[ArrayLike, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        layers: int | None = None,
    ) -> Float[Array, "seq d"]:
        """The residual stream after the first ``layers`` blocks (default: all), before the final LayerNorm."""
        ke, kb = (None, None) if key is None else jax.random.split(key)
        mask, extra = self.attention_inputs(mask, timestamps, segments)
        block_fn = lambda block, x, k: block(x, mask, key=k, **extra)  # noqa: E731
        return self.transform(self.embed(inputs, positions, gaps, key=ke), block_fn, key=kb, layers=layers)

    def readout(self, h: Float[Array, "*rows d"], grade_level: Int[ArrayLike, ""]) -> Float[Array, "*rows vocab"]:
        """Float32 logits from hidden states: final LayerNorm, output layer and the grade bias."""
        return self.project(self.final_ln(h), grade_level)

    def project(self, normed: Float[Array, "*rows d"], grade_level: Int[ArrayLike, "*batch"]) -> Float[Array, "*rows vocab"]:
        """The output layer and the grade bias, on states after the final LayerNorm: one row's
        ``[seq, d]`` with its grade, or a batch's ``[batch, seq, d]`` with one grade per row."""
        dt = jnp.dtype(self.config.dtype)
        kernel = self.embedding.T if self.out_kernel is None else self.out_kernel
        logits = matmul_rows(normed, kernel.astype(dt)).astype(jnp.float32) + self.out_bias
        if self.grade_bias is not None:
            levels = self.grade_bias.shape[0] - 1
            grade = jnp.where((grade_level > 0) & (grade_level <= levels), grade_level, 0)
            bias = self.grade_bias[grade]  # [*batch, vocab]
            if normed.ndim > jnp.ndim(grade) + 1:  # each grade applies to a row of positions
                bias = bias[..., None, :]
            logits = logits + bias
        return logits


class DecoderModel(eqx.Module):
    """A recommender over one shared ``Decoder``: subclasses say what the hidden states see.

    A subclass declares what it needs and sees in the class variables below, implements
    :meth:`mask` and :meth:`hidden` (and :meth:`copy_sources` for the copy head), and registers
    itself with :func:`studyrec.models.register`; training, evaluation, recommendation and the
    memory estimate read the declarations, never the class.
    """

    reads_classmates: ClassVar[bool] = True
    """Whether a prediction may attend to other students of the row (Individual: no). Recommendation
    packs classmates into a query's row only for such models."""
    keys_carry_previous_title: ClassVar[bool] = True
    """Whether key k carries the title *before* it (the input shift; then a classmate's latest read is
    carried by a trailing slot at its time) rather than its own title."""
    streams: ClassVar[int] = 1
    """Sequences of the row's length each block processes (2 for a two-stream model): the memory
    estimate scales activations by it."""
    default_own_bias: ClassVar[float | None] = None
    """``ModelConfig.own_bias`` when the training flag is ``auto``."""
    default_chunk_size: ClassVar[int | None] = None
    """Training's ``--student-chunk-size`` when not given (None: the whole row)."""
    reads_memory: ClassVar[bool] = False
    """Whether the model reads the classroom memory (``ModelConfig.memory_size`` titles per position):
    its rows are then packed with one. Only a model that reads classmates may."""

    decoder: Decoder

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        self.decoder = Decoder(config, key=key)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    def hidden(self, sample, *, key: PRNGKeyArray | None = None, layers: int | None = None) -> Float[Array, "seq d"]:
        """States before the readout: position p's state predicts ``sample.titles[p]``."""
        raise NotImplementedError

    def last_block_input(
        self, sample
    ) -> tuple[Float[Array, "rows d"], Bool[Array, "rows seq"], dict, Callable | None]:
        """What the last block receives: ``(x, mask, bias inputs, attend)`` (``Block``'s arguments).

        The last ``seq`` rows of ``x`` are the states that predict (one stream: all of them)."""
        decoder = self.decoder
        x = self.hidden(sample, layers=decoder.config.num_layers - 1)
        mask, extra = decoder.attention_inputs(self.mask(sample), sample.timestamps, sample.segments)
        return x, mask, extra, None

    def distinct_memory(self, batch) -> DistinctTitles | None:
        """Each row's memory titles, each once (``slot_affinity``), where scoring them so is the cheaper
        form: a memory head on a CPU, with more slots in a row than the distinct titles allowed."""
        decoder = self.decoder
        if decoder.memory is None or batch.memory_titles is None or scores_every_title():
            return None
        *_, n, k = batch.memory_titles.shape
        size = DISTINCT_PER_SLOT * k
        return None if n * k <= size else distinct_titles(batch.memory_titles, decoder.embedding.shape[0], size)

    def input_gaps(self, sample) -> Int[Array, " seq"] | None:
        """``gap_buckets`` of the row when the decoder embeds them (``Decoder.embed``'s ``gaps``), else None."""
        return gap_buckets(sample.timestamps, sample.segments) if self.decoder.gap_embedding is not None else None

    def copy_sources(self, sample) -> tuple[Int[ArrayLike, " seq"], Int[ArrayLike, " seq"], Bool[Array, "seq seq"]]:
        """For the copy head: the title each position carries, when it was read, and which positions each query may copy from."""
        raise NotImplementedError(f"{type(self).__name__} has no copy head")

    def scores_at(self, sample, hidden: Float[Array, "seq d"], rows: Int[Array, " n"] | None = None) -> Scores:
        """The output distribution at ``rows`` (default: every position) from ``hidden(sample)``, factored
        (:class:`studyrec.models.mixture.Scores`): training reads the targets' log-probabilities from it
        without writing out the vocabulary."""
        queries, copy, memory = self.readout_inputs(sample, hidden, rows)
        return mixture(self.decoder.project(queries, sample.grade_level), copy, memory)

    def readout_inputs(
        self,
        sample,
        hidden: Float[Array, "seq d"],
        rows: Int[Array, " n"] | None = None,
        distinct: DistinctTitles | None = None,
    ) -> tuple[Float[Array, "n d"], CopyPointer | None, MemoryPointer | None]:
        """What :meth:`scores_at` reads out at ``rows``: the normalised states (``Decoder.project``
        gives their logits) and the copy and memory heads' pointers (``distinct``: the row's memory
        titles, each once, from :func:`distinct_titles` over the batch)."""
        decoder = self.decoder
        if decoder.copy is None and decoder.memory is None:
            return decoder.final_ln(hidden if rows is None else hidden[rows]), None, None
        keys = decoder.final_ln(hidden)  # normalised once: the copy head's keys, and the queries at rows
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])  # noqa: E731
        queries = pick(keys)
        copy = memory = None
        if decoder.copy is not None:
            carried, read_at, mask = self.copy_sources(sample)
            gap = recency_gap(sample.timestamps, read_at)  # the age of each carried read at each query
            same = sample.segments[:, None] == sample.segments[None, :]
            copy = decoder.copy.pointer(queries, keys, carried, pick(mask), pick(gap), pick(same))
        if decoder.memory is not None and sample.memory_titles is not None:  # no memory given: an empty one
            titles, times = pick(sample.memory_titles), pick(sample.memory_times)
            now = pick(sample.timestamps)[:, None]
            # Packing puts only strictly earlier reads in a token's memory; the mask says so again.
            visible = (titles > 0) & (times < now)
            gap = jnp.log1p(jnp.maximum(now - times, 0).astype(jnp.float32) / 86400.0)
            if distinct is not None:
                distinct = distinct._replace(slots=pick(distinct.slots))
            memory = decoder.memory.pointer(
                queries, decoder.embedding, titles, pick(sample.memory_reads), gap, visible, distinct
            )
        return queries, copy, memory

    def logits_at(
        self, sample, hidden: Float[Array, "seq d"], rows: Int[Array, " n"] | None = None
    ) -> Float[Array, "n vocab"]:
        """Scores of the titles at ``rows`` (default: every position) from ``hidden(sample)``: logits, or
        log-probabilities with a copy or memory head (either way, softmax gives the probabilities)."""
        scores = self.scores_at(sample, hidden, rows)
        return scores.logits if self.decoder.copy is None and self.decoder.memory is None else scores.log_probs()

    def scores(self, sample, *, key: PRNGKeyArray | None = None) -> Scores:
        """:meth:`scores_at` every position of one packed row (dropout with ``key``)."""
        return self.scores_at(sample, self.hidden(sample, key=key))

    def __call__(self, sample, *, key: PRNGKeyArray | None = None) -> Float[Array, "seq vocab"]:
        """Scores at every position of one packed row (a ``studyrec.data.packing.Sample``)."""
        return self.logits_at(sample, self.hidden(sample, key=key))
