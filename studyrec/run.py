"""A saved run, loaded for inference: ``studyrec.load_run(path).recommend(activity)``.

:func:`load_run` rebuilds the model named in ``config.json`` from its ``model_config``, restores the
parameters of a checkpoint into it with Orbax (no pickle: nothing from the run directory is ever
executed) and returns a :class:`Run`. A missing file or checkpoint is an error: there is no
fallback to random weights.

:meth:`Run.recommend` answers "what should each student read next?" as of a moment. Each student
gets one packed row: their latest ``chunk_size - 1`` interactions followed by a *query slot* at
``as_of`` whose logits score the next title (the slot's own title is a placeholder that the model
never reads, since position p never sees the title at p). For STUDY, the rest of the row holds the
classroom's most recently active classmates. STUDY's keys carry the previous title of their
student (the one-step lag of ``Study``), so each classmate's segment ends with a *carrier* slot at
their last timestamp: it carries their latest title, and is strictly earlier than ``as_of``, so
every classmate interaction in the row reaches the query.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
import typing
from collections.abc import Iterable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float, Int
from tqdm.auto import tqdm

from studyrec.data.classrooms import assign_classrooms
from studyrec.data.dataset import check_recommend_times
from studyrec.data.io import load_activity, load_school_info, load_student_info
from studyrec.data.packing import Sample
from studyrec.data.vocab import Vocabulary
from studyrec.models import MODELS, Individual, ModelConfig, Study, build
from studyrec.train.checkpoint import (
    CheckpointMismatch,
    Checkpoints,
    CorruptCheckpoint,
    UncommittedCheckpoint,
    all_finite,
    describe,
)
from studyrec.train.config import TrainConfig

logger = logging.getLogger("studyrec.run")

DAY = 86_400
SCORE = "log_probability"
"""What ``recommend``'s ``score`` column holds: the natural log of the model's probability that the
title is the student's next read (softmax over the whole output layer; excluded titles are dropped,
not renormalised)."""
RECOMMENDATION_COLUMNS = ("StudentID", "rank", "title", "score")
_ACTIVITY_COLUMNS = ("StudentID", "SHLF_NUM", "timestamp")
_ACTIVATION_BUDGET = 1 << 25  # floats of one batch's widest activations, [rows, seq, max(mlp, heads * seq)]
_CPU_BATCH = 64  # on CPU small batches stay in cache: 64 rows ran 1.5x faster than 256 (benchmarks.eval_throughput)


# --- loading -------------------------------------------------------------------------------------


def _from_dict(cls: type, data: dict, where: str):
    """A (nested) frozen dataclass from JSON: lists become tuples, unknown keys are logged and ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        logger.warning(
            "%s: ignoring unknown %s keys %s (written by another studyrec version?)", where, cls.__name__, unknown
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items() if name in known}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild {cls.__name__}: {e}") from None


def _convert(hint, value, where: str):
    if isinstance(value, dict):
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate):
                return _from_dict(candidate, value, where)
        return value
    if isinstance(value, list):
        return tuple(_convert(typing.Any, v, where) for v in value)
    return value


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json; is this a run directory written by experiments.train?")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return record


def load_run(path: str | os.PathLike, step: int | None = None) -> Run:
    """Loads a trained run directory for inference.

    Arguments:
        path: a run directory written by ``experiments.train`` (``config.json``, ``vocab.json``,
            ``checkpoints/``).
        step: the checkpoint to restore (default: the latest).

    Returns:
        A :class:`Run` whose ``model`` is in inference mode (no dropout).

    Raises:
        FileNotFoundError: the directory, ``config.json``, ``vocab.json`` or any checkpoint is missing.
        ValueError: the files do not fit together (unknown model, vocabulary size or titles, checkpoint
            shapes), or no checkpoint is usable (each step and its problem are named).

    A checkpoint that is not committed (no ``checksums.json``: a save cut short, or one in
    progress), fails its checksums, cannot be read or holds non-finite numbers is skipped with a
    warning and the one before it is used. Nothing in the run directory is moved or deleted.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run directory not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: is a file, expected a run directory")
    record = _read_config(path)
    where = str(path / "config.json")
    name = record.get("model")
    if isinstance(name, str) and name.startswith("baseline:"):
        raise ValueError(f"{path} is a {name} run: it has scores but no model to load")
    if name not in MODELS:
        raise ValueError(f"{where}: unknown model {name!r}; this studyrec knows {', '.join(MODELS)}")
    if "model_config" not in record:
        raise ValueError(f"{where}: no 'model_config'")
    saved = record["model_config"]
    if isinstance(saved, dict):  # runs saved before copy_bias_gain existed learned the copy head's biases unscaled
        saved = {"copy_bias_gain": 1.0, **saved}
    model_config = _from_dict(ModelConfig, saved, f"{where}: model_config")
    config = _from_dict(TrainConfig, record.get("config", {}), f"{where}: config")
    if "time_origin" not in record:
        raise ValueError(f"{where}: no 'time_origin' (the moment the model's timestamps count from)")
    time_origin = int(record["time_origin"])

    vocab_file = path / "vocab.json"
    if not vocab_file.exists():
        raise FileNotFoundError(f"{path}: no vocab.json; the run's vocabulary is needed to read and write titles")
    vocab = Vocabulary.load(vocab_file)
    if vocab.logits_size != model_config.vocab_size:
        raise ValueError(
            f"{vocab_file} has {vocab.num_titles} titles (an output layer of {vocab.logits_size}) but "
            f"{where} says model_config.vocab_size={model_config.vocab_size}; the files come from different runs"
        )
    _check_fingerprint(vocab, vocab_file, record.get("vocab_fingerprint"), where)

    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path}: no checkpoints/ directory; refusing to use random weights")
    checkpoints = Checkpoints(path, async_save=False)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint; refusing to use random weights")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{path}/checkpoints has no step {step}; available: {steps}")
        step, model, meta = _restore_usable(checkpoints, steps if step is None else [step], name, model_config)
    finally:
        checkpoints.close()
    if meta.get("model") not in (None, name):
        raise ValueError(f"{where} says model {name!r} but checkpoint {step} was saved by a {meta['model']!r} run")
    _check_fingerprint(vocab, vocab_file, meta.get("vocab_fingerprint"), str(checkpoints.step_dir(step)))
    if record.get("vocab_fingerprint") is None and meta.get("vocab_fingerprint") is None:
        _warn_unverified(vocab_file)
    return Run(
        path=path,
        model=eqx.nn.inference_mode(model),
        vocab=vocab,
        config=config,
        model_config=model_config,
        model_name=name,
        time_origin=time_origin,
        step=int(step),
    )


def _blank_model(name: str, config: ModelConfig):
    """A zero-filled model of the right structure: a restore target, quicker than a random init."""
    abstract = eqx.filter_eval_shape(build, name, config, key=jax.random.key(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s, abstract)


def _check_fingerprint(vocab: Vocabulary, vocab_file: Path, saved: str | None, source: str) -> None:
    """Refuses a vocab.json whose titles differ from those the run trained with (recorded in ``source``)."""
    if saved is not None and saved != vocab.fingerprint:
        raise ValueError(
            f"{vocab_file} does not hold the titles that {source} was trained with (its vocabulary fingerprint "
            f"{vocab.fingerprint[:12]} differs from the recorded {str(saved)[:12]}); the files come from different "
            "runs or vocab.json was edited: restore the vocab.json that training wrote"
        )


@functools.cache
def _warn_unverified(vocab_file: Path) -> None:
    logger.warning(
        "%s cannot be verified: the run was saved before studyrec recorded vocabulary fingerprints", vocab_file
    )


def _restore_usable(checkpoints: Checkpoints, steps: list[int], name: str, config: ModelConfig):
    """``(step, model, meta)`` of the newest of ``steps`` that is committed, intact and finite.

    The others are named in warnings (never moved: the run may be live); when none is usable, one
    ValueError names each step and its problem.
    """
    problems = []
    target = _blank_model(name, config)
    for step in reversed(steps):
        try:
            model, meta = _restore_checked(checkpoints, step, target)
            return step, model, meta
        except CheckpointMismatch as e:
            raise ValueError(
                f"{checkpoints.directory.parent}: checkpoint {step} does not fit the {name!r} model that config.json "
                f"describes: {e}"
            ) from None
        except UncommittedCheckpoint:
            problem = "is not committed (no checksums.json: a save cut short, or one in progress)"
        except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types; any means unusable
            problem = f"is damaged ({describe(e, limit=160)})"
        logger.warning("checkpoint %s %s; trying the one before", checkpoints.step_dir(step), problem)
        problems.append(f"step {step} {problem}")
    raise ValueError(
        f"{checkpoints.directory}: no intact checkpoint among steps {steps} ({'; '.join(problems)}); "
        "refusing to use random weights"
    )


def _restore_checked(checkpoints: Checkpoints, step: int, target):
    """Verifies, restores and checks one checkpoint: ``(model, meta)``."""
    checkpoints.verify(step)
    checkpoints.check_shapes(step, target)
    model, _, meta = checkpoints.restore(step, target)
    if not all_finite(model):
        raise CorruptCheckpoint("its parameters hold non-finite (NaN or infinite) numbers")
    return model, meta


# --- inputs --------------------------------------------------------------------------------------


def _activity_frame(activity) -> pd.DataFrame:
    if isinstance(activity, pd.DataFrame):
        missing = [c for c in _ACTIVITY_COLUMNS if c not in activity.columns]
        if missing:
            raise ValueError(
                f"the activity frame lacks columns {missing}; load files with studyrec.data.io.load_activity"
            )
        return activity
    if isinstance(activity, (str, os.PathLike)):
        return load_activity(activity)
    return load_activity(*activity)


def _table(value, loader):
    if value is None or isinstance(value, pd.DataFrame):
        return value
    return loader(value)


def as_seconds(moment) -> int:
    """Seconds since 1970 UTC, rounded up, from an int (seconds), a date string or a datetime.

    A plain date is midnight UTC and naive datetimes are UTC, as in the activity files.
    """
    if isinstance(moment, (int, np.integer)) and not isinstance(moment, bool):
        return int(moment)
    try:
        stamp = pd.Timestamp(moment.strip() if isinstance(moment, str) else moment)
    except (ValueError, TypeError):
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise ValueError(f"as_of {moment!r}: cannot parse as a date (expected YYYY-MM-DD or an ISO datetime)")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    nanos = int(stamp.as_unit("ns").value)
    return -(-nanos // 10**9)


def _dates(seconds: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(np.asarray(seconds, dtype="datetime64[s]"), unit="D")


# --- the query rows ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _History:
    """Encoded activity before ``as_of``, students contiguous and earliest first."""

    titles: np.ndarray  # int32 [N]
    timestamps: np.ndarray  # int64 [N]
    students: np.ndarray  # int64 [S] ascending: everyone with activity or queried
    start: np.ndarray  # int64 [S]
    count: np.ndarray  # int64 [S]
    classroom: np.ndarray  # int64 [S]
    grade: np.ndarray  # int32 [S]

    @functools.cached_property
    def last_time(self) -> np.ndarray:
        """int64 [S]: each student's latest timestamp (int64 min without activity)."""
        padded = np.append(self.timestamps, np.iinfo(np.int64).min)
        return padded[np.where(self.count > 0, self.start + self.count - 1, -1)]

    @functools.cached_property
    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """Titles and timestamps with one trailing 0, so that index -1 reads "nothing"."""
        return np.append(self.titles, 0).astype(np.int32), np.append(self.timestamps, 0)

    @functools.cached_property
    def reads(self) -> pd.DataFrame:
        """Reads per (student index, title id): ``count`` and ``last`` timestamp."""
        frame = pd.DataFrame(
            {
                "student": np.repeat(np.arange(len(self.students)), self.count),
                "title": self.titles,
                "time": self.timestamps,
            }
        )
        return frame.groupby(["student", "title"])["time"].agg(count="size", last="max")

    def reads_of(self, students: np.ndarray, titles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How often ``students[b]`` read ``titles[b, j]``, and when last (0 if never): two [B, k] arrays."""
        index = pd.MultiIndex.from_arrays([np.repeat(students, titles.shape[1]), titles.ravel()])
        found = self.reads.reindex(index)
        count = found["count"].fillna(0).to_numpy(np.int64).reshape(titles.shape)
        last = found["last"].fillna(0).to_numpy(np.int64).reshape(titles.shape)
        return count, last


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Rows of queries: the queried student first, then classmates (``mates[r, j]``, -1 = none)."""

    query: np.ndarray  # int64 [R] student index
    own: np.ndarray  # int64 [R] own interactions in the row
    mates: np.ndarray  # int64 [R, W]
    mate_count: np.ndarray  # int64 [R, W] interactions taken (latest), excluding a carrier
    seq_len: int
    carriers: bool


def _layout(
    history: _History, query: np.ndarray, seq_len: int, chunk: int, classmates: bool, carriers: bool, mate_chunk: int
) -> _Layout:
    """Which classmates share each query's row: the most recently active first, while they fit.

    The query slot and the student's latest interactions take ``chunk`` tokens, each classmate's
    latest interactions (and carrier) at most ``mate_chunk``. The first classmate that does not fit
    is cut to its latest interactions when at least one fits.
    """
    own = np.minimum(history.count[query], chunk - 1)
    extra = 1 if carriers else 0
    least = 2 + extra  # a separator, one interaction, the carrier
    width = max((seq_len - 1) // least, 0) if classmates else 0
    R = len(query)
    if width == 0:
        empty = np.zeros((R, 0), np.int64)
        return _Layout(query, own, empty, empty, seq_len, carriers)
    active = np.flatnonzero(history.count > 0)
    members = active[np.lexsort((history.students[active], -history.last_time[active], history.classroom[active]))]
    rooms = history.classroom[members]
    first = np.searchsorted(rooms, history.classroom[query], side="left")
    size = np.searchsorted(rooms, history.classroom[query], side="right") - first
    j = np.arange(width + 1)[None, :]
    inside = j < size[:, None]
    cand = np.where(inside, members[np.minimum(first[:, None] + j, len(members) - 1)] if len(members) else 0, -1)
    cand = np.where(cand == query[:, None], -1, cand)
    keep = np.argsort(cand < 0, axis=1, kind="stable")[:, :width]  # drop self, keep order
    cand = np.take_along_axis(cand, keep, 1)
    valid = cand >= 0
    full = np.where(valid, np.minimum(history.count[np.maximum(cand, 0)], mate_chunk - extra), 0)
    need = np.where(valid, 1 + full + extra, 0)
    space = seq_len - (own + 1)
    used = np.cumsum(need, axis=1)
    fits = valid & (used <= space[:, None])
    taken = np.where(fits, full, 0)
    # The first misfit gets what is left, if that holds a separator, one interaction and its carrier.
    n_fit = fits.sum(axis=1)
    rows = np.flatnonzero(n_fit < width)
    col = n_fit[rows]
    left = space[rows] - np.where(col > 0, used[rows, np.maximum(col - 1, 0)], 0)
    cut = valid[rows, col] & (left >= least)
    taken[rows[cut], col[cut]] = left[cut] - 1 - extra
    cand = np.where(taken > 0, cand, -1)
    return _Layout(query, own, cand, taken, seq_len, carriers)


@dataclasses.dataclass(frozen=True)
class _Rows:
    sample: Sample
    query_col: np.ndarray  # int32 [B]
    carried_title: np.ndarray  # int32 [B, L]: the title each key carries (Study: the previous one)
    carried_time: np.ndarray  # int64 [B, L]: when that title was read (absolute seconds)


def _compose(
    history: _History, layout: _Layout, rows: np.ndarray, batch: int, as_of: int, origin: int, sep: int
) -> _Rows:
    """Packs ``rows`` of the layout into ``batch`` rows (the rest empty)."""
    L = layout.seq_len
    n = len(rows)
    W = layout.mates.shape[1]
    mates, taken = layout.mates[rows], layout.mate_count[rows]
    seg_len = taken + (1 if layout.carriers else 0)
    own = layout.own[rows]
    # Pieces: the queried student (slot 1) then each classmate placed (slots 2, 3, ...).
    placed = mates >= 0
    col0 = own + 1  # after the query slot
    widths = np.where(placed, 1 + seg_len, 0)
    starts = col0[:, None] + np.cumsum(widths, axis=1) - widths + 1  # skip the separator
    r_idx = np.arange(n)
    piece_row = np.concatenate([r_idx, np.repeat(r_idx, W)[placed.ravel()]])
    piece_col = np.concatenate([np.zeros(n, np.int64), starts[placed]])
    piece_slot = np.concatenate([np.ones(n, np.int64), (np.cumsum(placed, axis=1) + 1)[placed]])
    piece_student = np.concatenate([layout.query[rows], mates[placed]])
    piece_taken = np.concatenate([own, taken[placed]])
    piece_trailing = np.concatenate([np.ones(n, bool), np.full(placed.sum(), layout.carriers)])
    last = history.last_time[piece_student]
    piece_trail_time = np.concatenate([np.full(n, as_of, np.int64), last[n:]])

    cells = piece_taken + piece_trailing
    within = np.arange(cells.sum()) - np.repeat(np.cumsum(cells) - cells, cells)
    r = np.repeat(piece_row, cells)
    c = np.repeat(piece_col, cells) + within
    count = np.repeat(piece_taken, cells)
    first = np.repeat(history.start[piece_student] + history.count[piece_student] - piece_taken, cells)
    trailing = within >= count
    # Index -1 reads the padding appended below, so an empty history needs no special case.
    src = np.where(trailing, -1, first + within)
    prev = np.where(within > 0, first + within - 1, -1)
    all_titles, all_times = history.padded

    titles = np.zeros((batch, L), np.int32)
    segments = np.zeros((batch, L), np.int32)
    stamps = np.zeros((batch, L), np.int64)
    positions = np.zeros((batch, L), np.int32)
    carried = np.zeros((batch, L), np.int32)
    carried_time = np.zeros((batch, L), np.int64)
    titles[r, c] = all_titles[src]
    segments[r, c] = np.repeat(piece_slot, cells)
    stamps[r, c] = np.where(trailing, np.repeat(piece_trail_time, cells), all_times[src]) - origin
    positions[r, c] = within
    carried[r, c] = all_titles[prev]
    carried_time[r, c] = all_times[prev]
    later = piece_slot > 1
    titles[piece_row[later], piece_col[later] - 1] = sep
    grade = np.zeros(batch, np.int32)
    grade[:n] = history.grade[layout.query[rows]]
    query_col = np.zeros(batch, np.int32)
    query_col[:n] = own
    sample = Sample(titles, segments, stamps.astype(np.int32), positions, grade)
    return _Rows(sample, query_col, carried, carried_time)


# --- device side ---------------------------------------------------------------------------------


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

    The fused attention never returns its weights, so they are recomputed here from the block's
    parameters, exactly as ``Attention`` forms its scores.
    """
    x, mask, extra = last_block_input(model, sample)
    block = last_block(model)
    h = block.ln1(x)
    attention = block.attention
    dt = h.dtype
    T = h.shape[0]
    q = (h[query] @ attention.wq.astype(dt)).reshape(attention.num_heads, -1)
    k = (h @ attention.wk.astype(dt)).reshape(T, attention.num_heads, -1)
    scores = jnp.einsum("hd,khd->hk", q, k) / math.sqrt(q.shape[-1])
    bias = attention.score_bias(dt, **{name: v[query][None] for name, v in extra.items()})
    if bias is not None:
        scores = scores + bias[:, 0]
    scores = jnp.where(mask[query][None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@eqx.filter_jit
def _query_log_probs(model, sample: Sample, query: Int[Array, " batch"]) -> Float[Array, "batch vocab"]:
    """Log-probabilities over the output layer at each row's query slot (the only slot read out)."""
    scores = jax.vmap(lambda s, q: model.logits_at(s, model.hidden(s), q[None])[0])(sample, query)
    return jax.nn.log_softmax(scores, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "num_titles"))
def _top_titles(
    log_probs: Float[Array, "batch vocab"], exclude: Int[Array, "batch m"], k: int, num_titles: int
) -> tuple[Int[Array, "batch k"], Float[Array, "batch k"]]:
    """The k best real titles (ids ``1..num_titles``) per row, leaving out ``exclude`` (-inf if too few)."""
    ids = jnp.arange(log_probs.shape[-1])
    scores = jnp.where((ids >= 1) & (ids <= num_titles), log_probs, -jnp.inf)
    scores = scores.at[jnp.arange(scores.shape[0])[:, None], exclude].set(-jnp.inf)
    best, top = jax.lax.top_k(scores, k)
    return top.astype(jnp.int32), best


@eqx.filter_jit
def _query_attention(model, sample: Sample, query: Int[Array, " batch"]) -> Float[Array, "batch seq"]:
    """Head-averaged last-layer attention of each row's query slot."""
    return jax.vmap(lambda s, q: last_layer_attention(model, s, q).mean(axis=0))(sample, query)


# --- explanations --------------------------------------------------------------------------------


def _explain(
    rows: _Rows, top: np.ndarray, attention: np.ndarray, as_of: int, own_reads: np.ndarray, own_last: np.ndarray
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
    latest_date, own_date = _dates(np.maximum(latest, 0)), _dates(np.maximum(own_last, 0))
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


# --- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained model with everything needed to use it; see :func:`load_run`."""

    path: Path
    """The run directory."""
    model: Individual
    """The restored model, in inference mode."""
    vocab: Vocabulary
    """Title strings <-> ids."""
    config: TrainConfig
    """The training configuration, rebuilt from ``config.json``."""
    model_config: ModelConfig
    """The model's sizes."""
    model_name: str
    """``"study"``, ``"individual"``, ... (a key of ``studyrec.models.MODELS``)."""
    time_origin: int
    """Seconds since 1970 that the model's timestamps count from."""
    step: int
    """The training step of the restored checkpoint."""

    @property
    def reads_classmates(self) -> bool:
        """Whether the model looks at classmates (every model but Individual)."""
        return isinstance(self.model, Study) or not isinstance(self.model, Individual)

    def recommend(
        self,
        activity,
        student_info=None,
        k: int = 20,
        as_of=None,
        exclude_read: bool = False,
        school_info=None,
        explain: bool = False,
        *,
        students: Iterable[int] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """The next ``k`` titles for every student, as of a moment.

        Arguments:
            activity: a frame from :func:`studyrec.data.io.load_activity`, or a path (or paths) to
                activity files. Rows at or after ``as_of`` are ignored entirely.
            student_info: a frame from ``load_student_info`` or a path; it puts students in
                classrooms (by the run's ``classroom_grouping``). Without it every student is alone,
                so STUDY sees no classmates.
            k: titles per student.
            as_of: the moment to recommend at: an int (seconds since 1970), a date or datetime
                string (a date is midnight UTC), or a datetime. Default: just after the last row.
            exclude_read: drop titles the student read before ``as_of``.
            school_info: a frame or path, needed for the ``district_grade`` grouping.
            explain: add an ``explanation`` column (STUDY runs only) saying which classmates' reads
                of the title the model saw, and how much last-layer attention they drew.
            students: the StudentIDs to recommend for (default: every student with activity before
                ``as_of``). A student without activity gets titles from classmates and the model's
                learned start-of-history distribution.
            batch_size: rows per batch; every batch has this shape (default: 64 on CPU, else from a
                memory budget, at most 512; smaller for small inputs).
            progress: show a progress bar (default: when there is more than one batch).

        Returns:
            A frame with ``StudentID``, ``rank`` (1..k), ``title`` and ``score`` (the log-probability
            of the title being read next, see :data:`SCORE`), sorted by student then rank. Fewer
            than k rows only when ``exclude_read`` leaves fewer titles. ``attrs`` records ``as_of``,
            the ignored rows and the unknown titles.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > self.vocab.num_titles:
            logger.warning("k=%d is more than the run's %d titles; returning them all", k, self.vocab.num_titles)
            k = self.vocab.num_titles
        if explain and not isinstance(self.model, Study):
            raise ValueError(
                f"explanations come from STUDY's attention to classmates; this is a {self.model_name!r} run"
            )
        history, layout, as_of_s, attrs = self._prepare(activity, student_info, school_info, as_of, students)
        query = layout.query
        seq_len = layout.seq_len
        read = self._read_titles(history, query) if exclude_read else None

        R = len(query)
        if batch_size is None:
            mc = self.model_config
            widest = seq_len * max(mc.mlp_dim, mc.num_heads * seq_len, mc.vocab_size // seq_len)
            batch_size = _CPU_BATCH if jax.default_backend() == "cpu" else int(np.clip(_ACTIVATION_BUDGET // widest, 8, 512))
            batch_size = min(batch_size, 1 << max(R - 1, 0).bit_length())  # small inputs: a small batch
        batch_size = max(1, int(batch_size))
        num_batches = -(-R // batch_size)
        show = num_batches > 1 if progress is None else progress
        tops, scores, texts = [], [], []
        for lo in tqdm(range(0, R, batch_size), total=num_batches, desc="recommend", disable=not show, leave=False):
            rows = np.arange(lo, min(lo + batch_size, R))
            packed = _compose(history, layout, rows, batch_size, as_of_s, self.time_origin, self.vocab.sep)
            exclude = self._exclude_batch(read, rows, batch_size)
            log_probs = _query_log_probs(self.model, packed.sample, packed.query_col)
            top, score = _top_titles(log_probs, exclude, k, self.vocab.num_titles)
            top, score = np.asarray(top)[: len(rows)], np.asarray(score)[: len(rows)]
            tops.append(top)
            scores.append(score)
            if explain:
                attention = np.asarray(_query_attention(self.model, packed.sample, packed.query_col))
                own_reads, own_last = history.reads_of(query[rows], top)
                texts += _explain(packed, top, attention, as_of_s, own_reads, own_last)

        top = np.concatenate(tops) if tops else np.zeros((0, k), np.int32)
        score = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
        self._check_scores(score, history.students[query], read)
        keep = np.isfinite(score).ravel()  # -inf: fewer than k titles left after exclude_read
        out = pd.DataFrame(
            {
                "StudentID": np.repeat(history.students[query], k)[keep],
                "rank": np.tile(np.arange(1, k + 1), R)[keep],
                "title": self.vocab.decode_many(top.ravel()[keep]).astype(object),
                "score": score.ravel()[keep].astype(np.float64),
            }
        )
        if explain:
            out["explanation"] = np.asarray([t for row in texts for t in row], dtype=object)[keep] if R else []
        out.attrs.update(attrs, score=SCORE, run=str(self.path), step=self.step, model=self.model_name)
        return out

    def query_rows(
        self, activity, student_info=None, as_of=None, school_info=None, *, students: Iterable[int] | None = None
    ) -> tuple[np.ndarray, Sample, np.ndarray]:
        """The packed rows that :meth:`recommend` scores, for inspection.

        Returns:
            ``(student_ids [R], rows, query [R])``: row r's logits at column ``query[r]`` score
            student ``student_ids[r]``'s next title. Arguments are those of :meth:`recommend`.
        """
        history, layout, as_of_s, _ = self._prepare(activity, student_info, school_info, as_of, students)
        rows = np.arange(len(layout.query))
        packed = _compose(history, layout, rows, len(rows), as_of_s, self.time_origin, self.vocab.sep)
        return history.students[layout.query], packed.sample, packed.query_col

    def _prepare(self, activity, student_info, school_info, as_of, students) -> tuple[_History, _Layout, int, dict]:
        frame = _activity_frame(activity)
        info = _table(student_info, load_student_info)
        schools = _table(school_info, load_school_info)
        wanted = None if students is None else np.unique(np.fromiter((int(s) for s in students), np.int64))
        history, as_of_s, attrs = self._history(frame, info, schools, as_of, wanted)
        if wanted is None:
            query = np.flatnonzero(history.count > 0)
        else:
            query = np.searchsorted(history.students, wanted)
        if info is None and self.reads_classmates:
            logger.warning(
                "no student_info given: every student is alone in a classroom, so %s sees no classmates", self.model_name
            )
        chunk = min(self.config.chunk_size, self.config.seq_len)
        seq_len = self.config.seq_len if self.reads_classmates else chunk
        carriers = isinstance(self.model, Study)  # Study's keys carry the previous title
        mate_chunk = min(self.config.classmate_chunk_size or chunk, seq_len)
        layout = _layout(history, query, seq_len, chunk, self.reads_classmates, carriers, mate_chunk)
        return history, layout, as_of_s, attrs

    def _history(self, frame: pd.DataFrame, info, schools, as_of, wanted) -> tuple[_History, int, dict]:
        """Encodes the rows before ``as_of`` for everyone with activity and the ``wanted`` students."""
        stamps = frame["timestamp"].to_numpy(dtype=np.int64)
        if as_of is None:
            as_of_s = int(stamps.max()) + 1 if len(stamps) else int(time.time())
            before = np.ones(len(frame), bool)
        else:
            as_of_s = as_seconds(as_of)
            before = stamps < as_of_s
        ignored = int((~before).sum())
        if ignored:
            logger.info("ignoring %d activity rows at or after as_of %s", ignored, _dates([as_of_s])[0])
        kept = frame.loc[before]
        sids = kept["StudentID"].to_numpy(dtype=np.int64)
        stamps = stamps[before]
        titles = self.vocab.encode_many(kept["SHLF_NUM"])
        unknown = titles == self.vocab.oov
        n_unknown, n_distinct = int(unknown.sum()), int(kept["SHLF_NUM"][unknown].nunique())
        if n_unknown:
            examples = ", ".join(map(repr, kept["SHLF_NUM"][unknown].unique()[:3]))
            logger.warning(
                "%d of %d activity rows (%d distinct titles, e.g. %s) are not in the run's vocabulary: the model "
                "reads them as <OOV> and never recommends them", n_unknown, len(kept), n_distinct, examples,
            )
        order = np.lexsort((stamps, sids))
        sids, stamps, titles = sids[order], stamps[order], titles[order]
        everyone = np.unique(sids)
        if wanted is not None:
            everyone = np.union1d(everyone, wanted)
        start = np.searchsorted(sids, everyone, side="left")
        count = np.searchsorted(sids, everyone, side="right") - start
        classroom, grade = assign_classrooms(everyone, info, schools, self.config.classroom_grouping)
        check_recommend_times(frame, self.time_origin, as_of_s, as_of)
        history = _History(titles, stamps, everyone, start.astype(np.int64), count.astype(np.int64), classroom, grade)
        as_of_text = pd.Timestamp(as_of_s, unit="s", tz="UTC").isoformat()
        attrs = {"as_of": as_of_text, "ignored_rows": ignored, "unknown_title_rows": n_unknown, "unknown_titles": n_distinct}
        return history, as_of_s, attrs

    def _check_scores(self, score: np.ndarray, students: np.ndarray, read) -> None:
        """Refuses NaN or +inf scores, and a student left without any title though some remain unread.

        Finite weights give finite log-probabilities; anything else means damaged parameters, which
        must not pass for "no recommendation".
        """
        read_count = np.diff(read[0], axis=1)[:, 0] if read is not None else np.zeros(len(score), np.int64)
        best = score.max(axis=1, initial=-np.inf)
        left_out = np.isnan(score).any(axis=1) | (score == np.inf).any(axis=1)
        left_out |= (best == -np.inf) & (read_count < self.vocab.num_titles)
        if left_out.any():
            raise ValueError(
                f"the model of {self.path} (checkpoint {self.step}) gives no valid score to {int(left_out.sum())} of "
                f"{len(score)} students (StudentID {int(students[np.argmax(left_out)])}, for one): its parameters "
                "are damaged; load an earlier checkpoint (--step) or retrain"
            )

    def _read_titles(self, history: _History, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each queried student's distinct real titles read before ``as_of``: (bounds [R, 2], titles)."""
        owner = np.repeat(np.arange(len(history.students)), history.count)  # history is contiguous
        real = (history.titles >= 1) & (history.titles <= self.vocab.num_titles)
        pairs = np.unique(np.stack([owner[real], history.titles[real]], 1), axis=0)
        lo = np.searchsorted(pairs[:, 0], query, side="left")
        hi = np.searchsorted(pairs[:, 0], query, side="right")
        return np.stack([lo, hi], 1), pairs[:, 1].astype(np.int32)

    @staticmethod
    def _exclude_batch(read, rows: np.ndarray, batch: int) -> np.ndarray:
        """int32 [batch, M]: title ids to drop per row, 0-padded (0 is never recommended anyway)."""
        if read is None:
            return np.zeros((batch, 1), np.int32)
        bounds, titles = read
        lo, hi = bounds[rows, 0], bounds[rows, 1]
        n = hi - lo
        width = 1 << max(int(n.max(initial=1)) - 1, 0).bit_length()  # powers of two: few compiles
        out = np.zeros((batch, width), np.int32)
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        out[np.repeat(np.arange(len(rows)), n), within] = titles[np.repeat(lo, n) + within]
        return out


__all__ = [
    "RECOMMENDATION_COLUMNS",
    "SCORE",
    "Run",
    "as_seconds",
    "last_block",
    "last_block_input",
    "last_layer_attention",
    "load_run",
]
