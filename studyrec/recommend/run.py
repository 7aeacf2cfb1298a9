"""A trained model ready to use: :class:`Run` answers "what should each student read next?"

:meth:`Run.recommend` packs one query row per student (:mod:`studyrec.data.query_rows`), scores the
query slot with the model and keeps the best titles (:func:`studyrec.evaluate.topk.top_titles`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from studyrec.config import TrainConfig
from studyrec.data.classrooms import assign_classrooms
from studyrec.data.dataset import check_recommend_times
from studyrec.data.io import load_activity, load_school_info, load_student_info
from studyrec.data.memory import ClassroomMemory
from studyrec.data.packing import Sample
from studyrec.data.query_rows import QueryHistory, QueryLayout, compose_queries, layout_queries
from studyrec.data.vocab import Vocabulary
from studyrec.evaluate.topk import top_titles
from studyrec.models import DecoderModel, ModelConfig, memory_options
from studyrec.recommend.explain import dates, query_attention
from studyrec.recommend.explain import explain as explain_titles
from studyrec.sharding import in_order

logger = logging.getLogger("studyrec.recommend")

SCORE = "log_probability"
"""What ``recommend``'s ``score`` column holds: the natural log of the model's probability that the
title is the student's next read (softmax over the whole output layer; excluded titles are dropped,
not renormalised)."""
RECOMMENDATION_COLUMNS = ("StudentID", "rank", "title", "score")
_ACTIVITY_COLUMNS = ("StudentID", "SHLF_NUM", "timestamp")
_ACTIVATION_BUDGET = 1 << 25  # floats of one batch's widest activations, [rows, seq, max(mlp, heads * seq)]
_CPU_BATCH = 64  # on CPU small batches stay in cache: 64 rows ran 1.5x faster than 256 (benchmarks.eval_throughput)


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


T = TypeVar("T")


def _one_ahead(items: Iterable[T]) -> Iterator[T]:
    """Each item once the next one is made: the host packs batch i + 1 while the device scores batch i."""
    previous = empty = object()
    for item in items:
        if previous is not empty:
            yield previous
        previous = item
    if previous is not empty:
        yield previous


@eqx.filter_jit
def _query_log_probs(model, sample: Sample, query: Int[Array, " batch"]) -> Float[Array, "batch vocab"]:
    """Log-probabilities over the output layer at each row's query slot (the only slot read out)."""
    scores = jax.vmap(lambda s, q: model.logits_at(s, model.hidden(s), q[None])[0])(sample, query)
    return jax.nn.log_softmax(scores, axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained model with everything needed to use it; see :func:`load_run`."""

    path: Path
    """The run directory."""
    model: DecoderModel
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
        """Whether the model looks at classmates (its class declares it: every model but Individual)."""
        return type(self.model).reads_classmates

    @property
    def explainable(self) -> bool:
        """Whether explanations can be given: the model reads classmates."""
        return self.reads_classmates

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
        students: Iterable[int | np.integer] | None = None,
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
        if explain and not self.explainable:
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
        memory = self._memory(history)

        def dispatched(lo: int):
            rows = np.arange(lo, min(lo + batch_size, R))
            packed = compose_queries(history, layout, rows, batch_size, as_of_s, self.vocab.sep, memory)
            exclude = self._exclude_batch(read, rows, batch_size)
            log_probs = _query_log_probs(self.model, packed.sample, packed.query_col)
            return rows, packed, top_titles(log_probs, k, self.vocab.num_titles, exclude)  # not awaited

        starts = tqdm(range(0, R, batch_size), total=num_batches, desc="recommend", disable=not show, leave=False)
        for rows, packed, (top, score) in _one_ahead(in_order(dispatched, starts)):
            top, score = np.asarray(top)[: len(rows)], np.asarray(score)[: len(rows)]
            tops.append(top)
            scores.append(score)
            if explain:
                attention = np.asarray(query_attention(self.model, packed.sample, packed.query_col))
                own_reads, own_last = history.reads_of(query[rows], top)
                texts += explain_titles(packed, top, attention, as_of_s, own_reads, own_last, self.model_config.memory_days)

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
        self, activity, student_info=None, as_of=None, school_info=None, *, students: Iterable[int | np.integer] | None = None
    ) -> tuple[np.ndarray, Sample, np.ndarray]:
        """The packed rows that :meth:`recommend` scores, for inspection.

        Returns:
            ``(student_ids [R], rows, query [R])``: row r's logits at column ``query[r]`` score
            student ``student_ids[r]``'s next title (the rows carry the classroom memory at that
            column only). Arguments are those of :meth:`recommend`.
        """
        history, layout, as_of_s, _ = self._prepare(activity, student_info, school_info, as_of, students)
        rows = np.arange(len(layout.query))
        packed = compose_queries(history, layout, rows, len(rows), as_of_s, self.vocab.sep, self._memory(history))
        return history.students[layout.query], packed.sample, packed.query_col

    def _memory(self, history: QueryHistory) -> ClassroomMemory | None:
        """The classroom memory over ``history`` that the model reads (None: it reads none)."""
        options = memory_options(self.model_name, self.model_config)
        return None if options is None else history.memory(**options)

    def _prepare(self, activity, student_info, school_info, as_of, students) -> tuple[QueryHistory, QueryLayout, int, dict]:
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
        carriers = type(self.model).keys_carry_previous_title  # a classmate's latest title needs a carrier slot
        mate_chunk = min(self.config.classmate_chunk_size or chunk, seq_len)
        layout = layout_queries(history, query, seq_len, chunk, self.reads_classmates, carriers, mate_chunk)
        return history, layout, as_of_s, attrs

    def _history(self, frame: pd.DataFrame, info, schools, as_of, wanted) -> tuple[QueryHistory, int, dict]:
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
            logger.info("ignoring %d activity rows at or after as_of %s", ignored, dates([as_of_s])[0])
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
        classroom, grade = assign_classrooms(everyone, info, schools, self.config.data.classroom_grouping)
        check_recommend_times(frame, self.time_origin, as_of_s, as_of)
        history = QueryHistory(
            titles, stamps, everyone, start.astype(np.int64), count.astype(np.int64), classroom, grade, self.time_origin
        )
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

    def _read_titles(self, history: QueryHistory, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
