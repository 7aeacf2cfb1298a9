"""Attention masks as the paper defines them: ``mask[q, k]`` is True when query q may see key k.

Separators and padding (segment 0) are never seen and never see anything.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int


def _real(segments: Int[ArrayLike, " seq"]) -> Bool[ArrayLike, "seq seq"]:
    valid = segments > 0
    return valid[:, None] & valid[None, :]


def own_past(segments: Int[ArrayLike, " seq"]) -> Bool[Array, "seq seq"]:
    """The same student's positions up to and including the query."""
    idx = jnp.arange(segments.shape[0])
    return (segments[:, None] == segments[None, :]) & (idx[None, :] <= idx[:, None])


def strictly_earlier(timestamps: Int[ArrayLike, " seq"]) -> Bool[ArrayLike, "seq seq"]:
    """Positions whose interaction happened strictly before the query's (ties stay hidden)."""
    return timestamps[None, :] < timestamps[:, None]


def individual_mask(segments: Int[ArrayLike, " seq"]) -> Bool[Array, "seq seq"]:
    """Individual: causal within the student, block-diagonal across students."""
    return _real(segments) & own_past(segments)


def study_mask(segments: Int[ArrayLike, " seq"], timestamps: Int[ArrayLike, " seq"]) -> Bool[Array, "seq seq"]:
    """STUDY: the student's own past, plus any classmate interaction strictly earlier in time."""
    return _real(segments) & (own_past(segments) | strictly_earlier(timestamps))
