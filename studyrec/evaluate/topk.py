"""The one top-k: the best real titles of a score vector, on device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@functools.partial(jax.jit, static_argnames=("k", "num_titles"))
def top_titles(
    scores: Float[Array, "*batch vocab"],
    k: int,
    num_titles: int,
    exclude: Int[Array, "*batch m"] | None = None,
) -> tuple[Int[Array, "*batch k"], Float[Array, "*batch k"]]:
    """The ``k`` best real titles (ids ``1..num_titles``) and their scores, best first.

    Padding, ``<SEP>`` and OOV are never returned; ids in ``exclude`` (0-padded: 0 is never a
    title) score ``-inf``. A catalogue of fewer than ``k`` titles gives them all, then id 0 with
    score ``-inf``; ties go to the lower id.
    """
    if exclude is not None:
        flat = scores.reshape(-1, scores.shape[-1])
        rows = jnp.arange(flat.shape[0])[:, None]
        scores = flat.at[rows, exclude.reshape(flat.shape[0], -1)].set(-jnp.inf).reshape(scores.shape)
    width = min(k, num_titles)
    best, index = jax.lax.top_k(scores[..., 1 : num_titles + 1], width)
    pad = [(0, 0)] * (index.ndim - 1) + [(0, k - width)]
    return jnp.pad(index + 1, pad).astype(jnp.int32), jnp.pad(best, pad, constant_values=-jnp.inf)
