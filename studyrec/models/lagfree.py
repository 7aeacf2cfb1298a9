"""Lag-free STUDY: every strictly earlier classmate interaction is visible, still without leaks.

The reference STUDY (``Study``) shifts titles right within each student and masks on the unshifted
timestamps, so a classmate's title j reaches a query only through key j+1 (spec §5.3, §11.3): a
one-step lag. ``StudyLagFree`` removes the lag with two streams, as XLNet does:

- a **content** stream ``h`` where position k embeds its *own* title (no shift) plus its position;
- a **query** stream ``g`` where position q embeds only the BOS token (id 0) plus its position, and
  reads the content stream of the previous layer without ever reading position q itself.

The logits come from the query stream, so the prediction at q depends on exactly the student's own
earlier titles and every classmate title strictly earlier in time than q's.

Both streams share every parameter and run as one sequence ``[h; g]`` of length ``2 * seq`` through
the unchanged decoder blocks, under a block mask::

    [[content_mask | I,  0],
     [query_mask,        I]]

The parameters are those of ``Study``'s decoder (same tree, same shapes), so the parameter count is
equal and a STUDY checkpoint loads into this model.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models.config import ModelConfig
from studyrec.models.decoder import Decoder, sinusoidal_table
from studyrec.models.masks import own_past, strictly_earlier


def content_mask(segments: Int[Array, " seq"], timestamps: Int[Array, " seq"]) -> Bool[Array, "seq seq"]:
    """Content stream: the student's own positions up to and including the query, plus classmates'
    interactions strictly earlier in time (ties stay hidden)."""
    valid = segments > 0
    classmate = segments[:, None] != segments[None, :]
    return valid[:, None] & valid[None, :] & (own_past(segments) | (classmate & strictly_earlier(timestamps)))


def query_mask(segments: Int[Array, " seq"], timestamps: Int[Array, " seq"]) -> Bool[Array, "seq seq"]:
    """Query stream: the content mask without the position itself, whose title is the target."""
    return content_mask(segments, timestamps) & ~jnp.eye(segments.shape[0], dtype=bool)


def two_stream_mask(segments: Int[Array, " seq"], timestamps: Int[Array, " seq"]) -> Bool[Array, "2*seq 2*seq"]:
    """Both streams as one sequence ``[content; query]``.

    Content rows see content columns (``content_mask``); query rows see content columns
    (``query_mask``) and their own query column. Every row sees itself, so no softmax row is empty
    (separators, padding, and a student's first read when no classmate read earlier); a query
    seeing itself adds no title, since the query stream starts from BOS and position alone.
    Nothing reads another position's query column.
    """
    n = segments.shape[0]
    eye = jnp.eye(n, dtype=bool)
    top = jnp.concatenate([content_mask(segments, timestamps) | eye, jnp.zeros((n, n), bool)], axis=1)
    bottom = jnp.concatenate([query_mask(segments, timestamps), eye], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


class StudyLagFree(eqx.Module):
    """STUDY without the one-step lag: a content and a query stream over the shared decoder.

    The prediction at q depends on exactly the titles in
    ``A(q) = {i : same student and i < q} ∪ {i : other student and τ_i < τ_q}``.

    Proof (assuming each student's timestamps do not decrease along the row, which packing
    guarantees: interactions are sorted by student and time). Let
    ``R(k) = {i : same student and i <= k} ∪ {i : other student and τ_i < τ_k}``.
    If ``content_mask[k, k']`` then ``R(k') ⊆ R(k)``: an own-past step (k' <= k, so τ_k' <= τ_k) only
    goes back; a classmate hop has τ_k' < τ_k, so everything in R(k') has τ <= τ_k' < τ_k, and a
    title of k's own student with τ < τ_k lies before k. By induction over layers the content at k
    depends only on R(k). The query at q starts from BOS + position and reads content at k with
    ``query_mask[q, k]`` (k < q of its own student, or a classmate with τ_k < τ_q), each with
    ``R(k) ⊆ A(q)`` by the same argument, plus its own query state; so by induction it depends only
    on A(q), which excludes the target q. Conversely every i in A(q) is read directly by the query
    at q in the first layer, so nothing in A(q) is hidden.
    """

    decoder: Decoder

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        self.decoder = Decoder(config, key=key)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    def mask(self, sample: Sample) -> Bool[Array, "2*seq 2*seq"]:
        return two_stream_mask(sample.segments, sample.timestamps)

    def __call__(self, sample: Sample, *, key: PRNGKeyArray | None = None) -> Float[Array, "seq vocab"]:
        decoder, config = self.decoder, self.config
        dt = jnp.dtype(config.dtype)
        n = sample.titles.shape[0]
        ke, kb = (None, None) if key is None else jax.random.split(key)

        tokens = jnp.concatenate([sample.titles, jnp.zeros_like(sample.titles)])
        positions = jnp.concatenate([sample.positions, sample.positions])
        x = decoder.embedding[tokens]
        if config.tie_embeddings:
            x = x * math.sqrt(config.d_model)
        x = x + jnp.asarray(sinusoidal_table(config.max_len, config.d_model))[positions]
        x = decoder.embed_dropout(x, key=ke).astype(dt)
        mask = self.mask(sample)

        params, static = eqx.partition(decoder.blocks, eqx.is_array)
        layer_keys = None if kb is None else jax.random.split(kb, config.num_layers)

        def layer(x, xs):
            block_params, layer_key = xs
            return eqx.combine(block_params, static)(x, mask, key=layer_key), None

        x, _ = jax.lax.scan(layer, x, (params, layer_keys))
        g = decoder.final_ln(x[n:])
        kernel = decoder.embedding.T if decoder.out_kernel is None else decoder.out_kernel
        logits = (g @ kernel.astype(dt)).astype(jnp.float32) + decoder.out_bias
        if decoder.grade_bias is not None:
            levels = decoder.grade_bias.shape[0] - 1
            grade = jnp.where((sample.grade_level > 0) & (sample.grade_level <= levels), sample.grade_level, 0)
            logits = logits + decoder.grade_bias[grade]
        return logits
