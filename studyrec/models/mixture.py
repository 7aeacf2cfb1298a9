"""The output distribution of the copy and memory heads, computed where it differs from the logits.

The heads mix three things into the vocabulary softmax ``P``: a copy pointer over the titles the
keys carry, one learned logit ``b`` on the titles the student already read (renormalised), and a
pointer over the classroom memory (see ``CopyHead`` and ``MemoryHead``)::

    p1 = a1 P + (1 - a1) copy
    p2 = p1 exp(b seen) / Z                 Z = 1 + (exp(b) - 1) * (p1's mass on seen titles)
    p  = a3 p2 + (1 - a3) memory

At a title none of them touches, ``log p = logits + base`` with one ``base`` per position; only the
(at most ``seq + memory``) titles in the pointers' support differ. :func:`mixture` computes ``base``
and the log-probability at each support title from the pointers alone, so training reads the
target's log-probability without ever writing the distribution out over the vocabulary (one pass
for the log-sum-exp, one for its gradient), and :meth:`Scores.log_probs` writes it out when it is
wanted (evaluation, recommendations).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class Scores(NamedTuple):
    """Log-probabilities over the vocabulary, factored: ``logits + base``, except at ``titles``, where
    they are ``values``. Ids ``>= vocab`` in ``titles`` are unused slots (each title appears once)."""

    logits: Float[Array, "*n vocab"]
    base: Float[Array, "*n"]
    titles: Int[Array, "*n s"]
    values: Float[Array, "*n s"]

    def log_probs(self) -> Float[Array, "*n vocab"]:
        """The whole distribution, as log-probabilities."""
        *lead, vocab = self.logits.shape
        dense = (self.logits + self.base[..., None]).reshape(-1, vocab)
        rows = jnp.arange(dense.shape[0])[:, None]
        titles, values = self.titles.reshape(dense.shape[0], -1), self.values.reshape(dense.shape[0], -1)
        return dense.at[rows, titles].set(values, mode="drop").reshape(*lead, vocab)

    def max(self) -> Float[Array, "*n"]:
        """``log_probs().max(-1)`` without writing the distribution out: the logits' maximum outside the
        slots' titles plus ``base``, against the slots' values (``fl(x + base)`` is monotone in ``x``,
        so the two agree to the last bit)."""
        *lead, vocab = self.logits.shape
        flat = self.logits.reshape(-1, vocab)
        titles = self.titles.reshape(flat.shape[0], -1)
        rows = jnp.arange(flat.shape[0])[:, None]
        in_slots = jnp.zeros(flat.shape, bool).at[rows, titles].set(True, mode="drop")
        outside = jnp.max(jnp.where(in_slots, -jnp.inf, flat), -1).reshape(lead) + self.base
        inside = jnp.max(jnp.where(self.titles < vocab, self.values, -jnp.inf), -1, initial=-jnp.inf)
        return jnp.maximum(outside, inside)

    def at(self, targets: Int[Array, "*n"]) -> Float[Array, "*n"]:
        """The log-probability of ``targets[i]`` at position ``i``."""
        dense = jnp.take_along_axis(self.logits, targets[..., None], -1)[..., 0] + self.base
        match = self.titles == targets[..., None]
        return jnp.where(match.any(-1), jnp.sum(jnp.where(match, self.values, 0.0), -1), dense)


class CopyPointer(NamedTuple):
    """The copy head's pointer at ``n`` positions over ``m`` keys."""

    titles: Int[Array, " m"]  # what each key carries (0: nothing)
    weights: Float[Array, "n m"]  # sums to 1 over the visible keys, 0 where none is
    gate: Float[Array, " n"]  # logit of the vocabulary's share
    present: Bool[Array, " n"]  # any visible key (else the vocabulary alone)
    own: Bool[Array, "n m"] | None = None  # visible keys of the student's own reads (for ``seen_bias``)
    seen_bias: Float[Array, ""] | None = None  # the logit added to titles the student read


class MemoryPointer(NamedTuple):
    """The memory head's pointer at ``n`` positions over ``k`` memory slots."""

    titles: Int[Array, "n k"]
    weights: Float[Array, "n k"]
    gate: Float[Array, " n"]  # logit of the memory's share
    present: Bool[Array, " n"]


def _log(p: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """``log p``, -inf where ``p`` is 0, with no NaN in its gradient."""
    hit = p > 0
    return jnp.where(hit, jnp.log(jnp.where(hit, p, 1.0)), -jnp.inf)


def _earlier_same(same: Bool[Array, "*b j j"]) -> Bool[Array, "*b j j"]:
    """``same[..., i, j]`` (slots i and j hold the same title) where slot i comes before slot j: a
    slot ``j`` with any such ``i`` repeats an earlier slot's title."""
    j = same.shape[-1]
    return same & (jnp.arange(j)[:, None] < jnp.arange(j)[None, :])


def mixture(
    logits: Float[Array, "n vocab"], copy: CopyPointer | None = None, memory: MemoryPointer | None = None
) -> Scores:
    """The heads' distribution at ``n`` positions, factored as :class:`Scores` (no head: ``log_softmax``)."""
    n, vocab = logits.shape
    f32 = jnp.float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    zero, none = jnp.zeros(n, f32), jnp.full(n, -jnp.inf, f32)
    if copy is None:
        copy = CopyPointer(jnp.zeros(0, jnp.int32), jnp.zeros((n, 0), f32), zero, jnp.zeros(n, bool))
    if memory is None:
        memory = MemoryPointer(jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), f32), zero, jnp.zeros(n, bool))
    c, mt = copy.titles, memory.titles
    m = c.shape[0]
    slot = jnp.arange(m)
    # Which slots hold the same title: copy-copy (one matrix for every position) and memory-memory;
    # a memory slot's title among the copy slots is found by the first copy slot holding it (m: none),
    # looked up in a table over the vocabulary (comparing every pair of slots at every position cost
    # 3.5% of a training step).
    cc = (c[:, None] == c[None, :]) & (c > 0)[:, None]
    mm = (mt[:, :, None] == mt[:, None, :]) & (mt > 0)[:, :, None]
    first_slot = jnp.full(vocab, m, jnp.int32).at[jnp.where(c > 0, c, vocab)].min(slot.astype(jnp.int32), mode="drop")
    first_of = jnp.where(c > 0, first_slot[c], m + 1)
    found = jnp.where(mt > 0, first_slot[mt], m)
    cc_f = cc.astype(f32)
    earlier_c = _earlier_same(cc)

    def at_copy_slots(w):
        """Sums of copy-slot weights over the copy slots holding each copy slot's and each memory slot's title."""
        at_c = w @ cc_f
        return at_c, jnp.take_along_axis(jnp.pad(at_c, ((0, 0), (0, 1))), found, -1)

    def at_memory_slots(w):
        """Sums of memory-slot weights over the memory slots holding each copy slot's and each memory slot's title."""
        return (
            jnp.sum(jnp.where(found[:, None, :] == first_of[None, :, None], w[:, None, :], 0.0), -1),
            jnp.sum(jnp.where(mm, w[:, :, None], 0.0), 1),
        )

    copy_c, copy_m = at_copy_slots(copy.weights)
    mem_c, mem_m = at_memory_slots(memory.weights)
    la1 = jnp.where(copy.present, jax.nn.log_sigmoid(copy.gate), zero)  # the vocabulary's share
    lb1 = jnp.where(copy.present, jax.nn.log_sigmoid(-copy.gate), none)  # the copy pointer's
    la3 = jnp.where(memory.present, jax.nn.log_sigmoid(-memory.gate), zero)  # what precedes the memory
    lb3 = jnp.where(memory.present, jax.nn.log_sigmoid(memory.gate), none)  # the memory pointer's
    logp_c = jnp.take_along_axis(logits, jnp.broadcast_to(c, (n, c.shape[0])), -1) - lse[:, None]
    logp_m = jnp.take_along_axis(logits, mt, -1) - lse[:, None]

    seen_c, seen_m, log_z = jnp.zeros_like(logp_c), jnp.zeros_like(logp_m), zero
    if copy.seen_bias is not None:
        own_c, own_m = at_copy_slots(copy.own.astype(f32))
        first = copy.own & (copy.own.astype(f32) @ earlier_c.astype(f32) == 0)  # each seen title once
        p1 = jnp.exp(jnp.logaddexp(la1[:, None] + logp_c, lb1[:, None] + _log(copy_c)))
        mass = jnp.sum(jnp.where(first, p1, 0.0), -1)  # p1's mass on the seen titles
        log_z = jnp.logaddexp(_log(jnp.maximum(1.0 - mass, 0.0)), copy.seen_bias + _log(mass))
        seen_c = jnp.where(own_c > 0, copy.seen_bias, 0.0)
        seen_m = jnp.where(own_m > 0, copy.seen_bias, 0.0)

    log_a = la1 + la3 - log_z  # the factor on the vocabulary softmax
    log_copy = la3 + lb1 - log_z

    def values(logp, seen, copied, remembered):
        # The pointers' mass adds in linear space: two empty pointers would give logaddexp(-inf, -inf), whose gradient is NaN.
        pointed = jnp.exp(log_copy[:, None] + seen) * copied + jnp.exp(lb3)[:, None] * remembered
        return jnp.logaddexp(log_a[:, None] + logp + seen, _log(pointed))

    unused = jnp.int32(vocab)
    keep_c = (c > 0) & ~earlier_c.any(0)
    keep_m = (mt > 0) & (found == m) & ~_earlier_same(mm).any(-2)
    titles = jnp.concatenate([jnp.where(keep_c, c, unused)[None].repeat(n, 0), jnp.where(keep_m, mt, unused)], -1)
    slot_values = jnp.concatenate([values(logp_c, seen_c, copy_c, mem_c), values(logp_m, seen_m, copy_m, mem_m)], -1)
    return Scores(logits, log_a - lse, titles, slot_values)
