"""Why a title was recommended: the classmates' reads of it that the query saw, and the last-layer
attention they drew (STUDY-like models, whose keys carry the previous title)."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from numpy.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int

from studyrec.data.packing import Sample
from studyrec.data.query_rows import QueryRows
from studyrec.models import Study

DAY = 86_400


def dates(seconds: ArrayLike) -> np.ndarray:
    """``YYYY-MM-DD`` strings of seconds since 1970 (UTC)."""
    return np.datetime_as_string(np.asarray(seconds, dtype="datetime64[s]"), unit="D")


def last_block_input(model: Study, sample: Sample) -> tuple[Float[Array, "seq d"], Bool[Array, "seq seq"], dict]:
    """What ``model``'s last decoder block receives: ``(x, mask, extra keyword arguments)``."""
    decoder = model.decoder
    x = model.hidden(sample, layers=decoder.config.num_layers - 1)
    mask, extra = decoder.attention_inputs(model.mask(sample), sample.timestamps, sample.segments)
    return x, mask, extra


def last_block(model: Study):
    """The last decoder block as a module."""
    params, static = eqx.partition(model.decoder.blocks, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[-1], params), static)


def last_layer_attention(model: Study, sample: Sample, query: Int[Array, ""]) -> Float[Array, "heads seq"]:
    """The last block's attention weights of position ``query`` over the row, per head.

    The fused attention never returns its weights, so they are recomputed here with the block's own
    ``Attention.weights``, the scores every attention of the decoder forms.
    """
    x, mask, extra = last_block_input(model, sample)
    block = last_block(model)
    h = block.ln1(x)
    return block.attention.weights(h[query][None], h, mask[query][None], **{k: v[query][None] for k, v in extra.items()})[:, 0]


@eqx.filter_jit
def query_attention(model, sample: Sample, query: Int[Array, " batch"]) -> Float[Array, "batch seq"]:
    """Head-averaged last-layer attention of each row's query slot."""
    return jax.vmap(lambda s, q: last_layer_attention(model, s, q).mean(axis=0))(sample, query)


# --- sentences ---------------------------------------------------------------------------------


def explain(
    rows: QueryRows, top: np.ndarray, attention: np.ndarray, as_of: int, own_reads: np.ndarray, own_last: np.ndarray
) -> list[list[str]]:
    """One sentence per recommended title ``top[b, j]``: the classmates' reads of it that the query
    saw and the last-layer attention they drew, and the student's own reads of it (``own_*``)."""
    n = len(top)
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
