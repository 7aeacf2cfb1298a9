"""Top-k over the whole catalogue on device, and the rank of the target in it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


def title_mask(num_titles: int) -> np.ndarray:
    """bool [K+3]: True for the real titles ``1..K``; padding, ``<SEP>`` and OOV are never recommended."""
    allowed = np.zeros(num_titles + 3, dtype=bool)
    allowed[1 : num_titles + 1] = True
    return allowed


@functools.partial(jax.jit, static_argnames="k")
def target_ranks_jax(
    logits: Float[Array, "*batch vocab"],
    targets: Int[Array, "*batch"],
    k: int,
    allowed: Bool[Array, " vocab"] | None = None,
) -> tuple[Int[Array, "*batch k"], Int[Array, "*batch"]]:
    """The k best ids per position (best first) and the 0-based rank of the target, k when absent.

    Arguments:
        logits: scores over the catalogue.
        targets: the id actually read; a disallowed id (e.g. OOV) is never found.
        k: list length. With fewer allowed ids than k, the list holds them all and ends in -1.
        allowed: ids that may be recommended (see :func:`title_mask`); all when None.

    Returns:
        ``(topk, ranks)``, both int32.
    """
    width = min(k, logits.shape[-1])
    if allowed is not None:
        logits = jnp.where(jnp.broadcast_to(allowed, logits.shape), logits, -jnp.inf)
    _, ids = jax.lax.top_k(logits, width)
    if allowed is not None:  # fewer allowed ids than k: the disallowed ones that fill the list are no titles
        ids = jnp.where(allowed[ids], ids, -1)
    ids = jnp.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, k - width)], constant_values=-1)
    match = ids == targets.astype(ids.dtype)[..., None]
    ranks = jnp.where(match.any(axis=-1), jnp.argmax(match, axis=-1), k)
    return ids.astype(jnp.int32), ranks.astype(jnp.int32)
