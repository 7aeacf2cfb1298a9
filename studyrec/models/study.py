"""STUDY as the paper defines it: every strictly earlier classmate interaction is visible, without leaks.

The reference's STUDY (``StudyReference``) shifts titles right within each student and masks on the
unshifted timestamps, so a classmate's title j reaches a query only through key j+1 (spec §5.3,
§11.3): a one-step lag. ``Study`` removes the lag with two streams, as XLNet does:

- a **content** stream ``h`` where position k embeds its *own* title (no shift) plus its position;
- a **query** stream ``g`` where position q embeds only the BOS token (id 0) plus its position, and
  reads the content stream of the previous layer without ever reading position q itself.

The logits come from the query stream, so the prediction at q depends on exactly the student's own
earlier titles and every classmate title strictly earlier in time than q's.

Both streams share every parameter (XLNet does the same) and run as one sequence ``[h; g]`` of
length ``2 * seq``: LayerNorms and MLPs act row by row as in ``Block``; in attention, the queries of
both streams read keys and values of the content stream only, under ``two_stream_mask``. That costs
``2 * seq**2`` attention scores instead of ``seq**2``, and twice the rows through every projection
and MLP (but one output layer, on the query stream).

The parameters are exactly ``StudyReference``'s (a ``Decoder`` under ``.decoder``, same paths and
shapes), so the parameter count is equal; only the forward pass differs.

Beyond the row, ``Study`` reads the classroom memory (``ModelConfig.memory_size``, see
``studyrec.data.memory``): at each position, the titles its whole classroom read most in the days
strictly before it, through the ``MemoryHead`` at the output.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models.decoder import Attention, DecoderModel
from studyrec.models.masks import own_past, strictly_earlier
from studyrec.models.registry import register


def content_mask(segments: Int[ArrayLike, " seq"], timestamps: Int[ArrayLike, " seq"]) -> Bool[Array, "seq seq"]:
    """Content stream: the student's own positions up to and including the query, plus classmates'
    interactions strictly earlier in time (ties stay hidden)."""
    valid = segments > 0
    classmate = segments[:, None] != segments[None, :]
    return valid[:, None] & valid[None, :] & (own_past(segments) | (classmate & strictly_earlier(timestamps)))


def query_mask(segments: Int[ArrayLike, " seq"], timestamps: Int[ArrayLike, " seq"]) -> Bool[Array, "seq seq"]:
    """Query stream: the content mask without the position itself, whose title is the target."""
    return content_mask(segments, timestamps) & ~jnp.eye(segments.shape[0], dtype=bool)


def two_stream_mask(segments: Int[ArrayLike, " seq"], timestamps: Int[ArrayLike, " seq"]) -> Bool[Array, "2*seq seq"]:
    """Rows: the content stream's queries, then the query stream's; columns: the content stream."""
    return jnp.concatenate([content_mask(segments, timestamps), query_mask(segments, timestamps)])


def two_stream_attention(
    attention: Attention,
    x: Float[Array, "rows d"],
    mask: Bool[Array, "queries seq"],
    *,
    key: PRNGKeyArray | None,
    **bias_inputs,
) -> Float[Array, "queries d"]:
    """``Attention`` with queries from both streams ``x = [h; g]`` and keys and values from ``h`` only.

    The queries are the last ``mask.shape[0]`` rows of ``x``: all of them, or the query stream alone
    (the last layer, whose content-stream output nothing reads). A row that may see nothing
    (separators, padding, a first read with no earlier classmate read)
    reads nothing: its output is zero, so no softmax over an empty set spreads over hidden keys.
    ``bias_inputs`` (one row per query) feed ``Attention.score_bias``.
    """
    sees = mask.any(axis=1)
    queries = x[x.shape[0] - mask.shape[0] :]  # both streams, or the query stream alone
    out = attention.attend(queries, x[: mask.shape[1]], mask | ~sees[:, None], key=key, **bias_inputs)
    return jnp.where(sees[:, None], out, jnp.zeros((), x.dtype))


@register("study")
class Study(DecoderModel):
    """STUDY without the reference's one-step lag: a content and a query stream over the shared decoder.

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
    ``R(k) ⊆ A(q)`` by the same argument, plus its own query state through the residual (a query
    that may see nothing reads nothing); so by induction it depends only on A(q), which excludes
    the target q. Conversely every i in A(q) is read directly by the query at q in the first layer,
    so nothing in A(q) is hidden. (``StudyReference`` relies on the same ordering.)

    The memory head adds, at q, titles read in q's classroom strictly before τ_q, which are
    in A(q) or are classmates' reads outside the row; none is q's own title (read at τ_q).
    """

    reads_classmates = True
    keys_carry_previous_title = False
    streams = 2
    reads_memory = True
    default_chunk_size = 32  # half a row of the student's own reads; the memory holds the classroom beyond the row

    def mask(self, sample: Sample) -> Bool[Array, "rows seq"]:
        return two_stream_mask(sample.segments, sample.timestamps)

    def copy_sources(self, sample: Sample) -> tuple[Int[ArrayLike, " seq"], Int[ArrayLike, " seq"], Bool[Array, "seq seq"]]:
        """Each position carries its own title, read at its own time; a query may copy exactly what its query stream reads."""
        return sample.titles, sample.timestamps, query_mask(sample.segments, sample.timestamps)

    def _streams(self, sample: Sample, key: PRNGKeyArray | None):
        """Both streams' inputs ``[h; g]``, the mask and bias inputs of every block, and the block call."""
        decoder = self.decoder
        tokens = jnp.concatenate([sample.titles, jnp.zeros_like(sample.titles)])
        twice = lambda a: None if a is None else jnp.concatenate([a, a])  # noqa: E731
        x = decoder.embed(tokens, twice(sample.positions), twice(self.input_gaps(sample)), key=key)
        mask = self.mask(sample)
        # Both streams' rows at q share q's time and student, so the biases repeat for the query stream.
        extra = {name: jnp.tile(v, (2, 1)) for name, v in decoder.bias_inputs(sample.timestamps, sample.segments).items()}
        block_fn = lambda block, x, k: block(x, mask, key=k, attend=two_stream_attention, **extra)  # noqa: E731
        return x, mask, extra, block_fn

    def hidden(self, sample: Sample, *, key: PRNGKeyArray | None = None, layers: int | None = None) -> Float[Array, "seq d"]:
        """The query stream's states (the content stream only feeds it: the last block computes no content)."""
        ke, kb = (None, None) if key is None else jax.random.split(key)
        x, mask, extra, block_fn = self._streams(sample, ke)
        seq = sample.titles.shape[0]
        if layers is not None and layers < self.decoder.config.num_layers:
            return self.decoder.transform(x, block_fn, key=kb, layers=layers)[seq:]
        query_rows = {name: v[seq:] for name, v in extra.items()}
        last_fn = lambda block, x, k: block(x, mask[seq:], key=k, attend=two_stream_attention, **query_rows)  # noqa: E731
        return self.decoder.transform(x, block_fn, key=kb, last_fn=last_fn)

    def last_block_input(self, sample: Sample):
        """Both streams before the last block (the query stream last), its mask, biases and attention."""
        x, mask, extra, block_fn = self._streams(sample, None)
        x = self.decoder.transform(x, block_fn, layers=self.decoder.config.num_layers - 1)
        return x, mask, extra, two_stream_attention
