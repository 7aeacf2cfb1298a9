"""Why a title was recommended: the classmates' reads of it that the query saw and the last-layer
attention they drew, the classroom's reads of it in the memory, and the student's own (models that
read classmates)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int

from studyrec.data.packing import Sample
from studyrec.data.query_rows import QueryRows
from studyrec.models import DecoderModel

DAY = 86_400


def dates(seconds: ArrayLike) -> np.ndarray:
    """``YYYY-MM-DD`` strings of seconds since 1970 (UTC)."""
    return np.datetime_as_string(np.asarray(seconds, dtype="datetime64[s]"), unit="D")


def last_block_input(model: DecoderModel, sample: Sample) -> tuple[Float[Array, "rows d"], Bool[Array, "rows seq"], dict, Callable | None]:
    """What ``model``'s last decoder block receives: ``(x, mask, bias inputs, attend)``; the last
    ``seq`` rows of ``x`` predict (see ``DecoderModel.last_block_input``)."""
    return model.last_block_input(sample)


def last_block(model: DecoderModel):
    """The last decoder block as a module."""
    params, static = eqx.partition(model.decoder.blocks, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[-1], params), static)


def last_layer_attention(model: DecoderModel, sample: Sample, query: Int[Array, ""]) -> Float[Array, "heads seq"]:
    """The last block's attention weights of position ``query`` over the row, per head (all zero
    where the query may see nothing).

    The fused attention never returns its weights, so they are recomputed here with the block's own
    ``Attention.weights``, the scores every attention of the decoder forms.
    """
    x, mask, extra, _ = last_block_input(model, sample)
    n = sample.titles.shape[0]
    row = x.shape[0] - n + query  # the predicting stream's row
    block = last_block(model)
    h = block.ln1(x)
    sees = mask[row].any()
    bias = {k: v[row][None] for k, v in extra.items()}
    weights = block.attention.weights(h[row][None], h[:n], (mask[row] | ~sees)[None], **bias)[:, 0]
    return jnp.where(sees, weights, 0.0)


@eqx.filter_jit
def query_attention(model, sample: Sample, query: Int[Array, " batch"]) -> Float[Array, "batch seq"]:
    """Head-averaged last-layer attention of each row's query slot."""
    return jax.vmap(lambda s, q: last_layer_attention(model, s, q).mean(axis=0))(sample, query)


# --- sentences ---------------------------------------------------------------------------------


def classroom_reads(rows: QueryRows, top: np.ndarray) -> np.ndarray:
    """How often each query's classroom memory says ``top[b, j]`` was read (zeros without a memory)."""
    sample, n = rows.sample, len(top)
    if sample.memory_titles is None:
        return np.zeros(top.shape, np.int64)
    at = np.arange(n), rows.query_col[:n]
    titles, reads = np.asarray(sample.memory_titles)[at], np.asarray(sample.memory_reads)[at]
    return ((titles[:, None, :] == top[:, :, None]) * reads[:, None, :]).sum(-1)


def explain(
    rows: QueryRows,
    top: np.ndarray,
    attention: np.ndarray,
    as_of: int,
    own_reads: np.ndarray,
    own_last: np.ndarray,
    memory_days: float | None = None,
) -> list[list[str]]:
    """One sentence per recommended title ``top[b, j]``: the classmates' reads of it that the query
    saw and the last-layer attention they drew, how often the classroom read it in the memory's
    ``memory_days`` (when the rows carry a memory), and the student's own reads of it (``own_*``)."""
    n = len(top)
    in_memory = classroom_reads(rows, top)
    seg = rows.sample.segments[:n]
    carried, when, att = rows.carried_title[:n], rows.carried_time[:n], attention[:n]
    match = (carried[:, None, :] == top[:, :, None]) & (carried[:, None, :] > 0)  # [B, k, L]
    mate = (seg >= 2)[:, None, :] & match
    share = (att[:, None, :] * mate).sum(-1)
    mates_share = (att * (seg >= 2)).sum(-1)
    slots = np.arange(2, max(int(seg.max(initial=1)), 1) + 1)
    readers = (mate[..., None] & (seg[:, None, :, None] == slots)).any(axis=2).sum(-1)
    in_view = (seg[:, :, None] == slots).any(axis=1).sum(-1)
    big = np.iinfo(np.int64).max
    latest = np.where(mate, when[:, None, :], -big).max(-1)
    earliest = np.where(mate, when[:, None, :], big).min(-1)
    days = np.maximum(np.ceil((as_of - earliest) / DAY), 1).astype(np.int64)
    latest_date, own_date = dates(np.maximum(latest, 0)), dates(np.maximum(own_last, 0))
    out = []
    for b in range(n):
        texts = []
        for j in range(top.shape[1]):
            parts = []
            if readers[b, j]:
                m, d = int(readers[b, j]), int(days[b, j])
                parts.append(
                    f"{m} classmate{'s' * (m > 1)} read it in the last {d} day{'s' * (d > 1)} (most recently "
                    f"{latest_date[b, j]}); those reads drew {share[b, j]:.0%} of the model's last-layer attention"
                )
            if in_memory[b, j]:
                m = int(in_memory[b, j])
                parts.append(f"the classroom read it {m} time{'s' * (m > 1)} in the {memory_days:g} days before")
            if own_reads[b, j]:
                m = int(own_reads[b, j])
                times = "once" if m == 1 else f"{m} times"
                parts.append(f"the student read it {times} before (last on {own_date[b, j]})")
            if not parts:
                v = int(in_view[b])
                parts.append(
                    f"none of the {v} classmate{'s' * (v != 1)} in view read it; it follows from the student's own "
                    f"history and reading patterns learned in training (classmates drew {mates_share[b]:.0%} of the "
                    "attention)"
                )
            texts.append("; ".join(parts))
        out.append(texts)
    return out
