"""Individual and the reference's STUDY: the same decoder under two attention masks (spec §5.2, §5.3).

The paper's STUDY, which sees every strictly earlier classmate read, is ``studyrec.models.study.Study``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models.decoder import DecoderModel, DistinctTitles
from studyrec.models.mixture import Scores, mixture
from studyrec.models.masks import individual_mask, study_mask
from studyrec.models.registry import register

# Where the reference mask's one-step lag hides classmates' latest reads, this start lets its STUDY
# keep the student's own history first (about level with Individual where classmates carry no
# signal); the lag-free Study, which sees every earlier classmate read, loses at hits@1 with it.
STUDY_OWN_BIAS = 3.0


def shift_within_students(values: Int[ArrayLike, " seq"], segments: Int[ArrayLike, " seq"]) -> Int[Array, " seq"]:
    """Position p gets the value at p-1 of the same student; each student starts from 0 (BOS).

    So the logits at p predict ``titles[p]`` without seeing it.
    """
    previous = jnp.concatenate([jnp.zeros(1, values.dtype), values[:-1]])
    same_student = jnp.concatenate([jnp.zeros(1, bool), segments[1:] == segments[:-1]])
    return jnp.where(same_student & (segments > 0), previous, 0)


@register("individual")
class Individual(DecoderModel):
    """Each student's prediction attends only to that student's own past."""

    reads_classmates = False
    keys_carry_previous_title = True
    default_chunk_size = 32  # half a row: each prediction sees up to 31 earlier reads

    def mask(self, sample: Sample) -> Bool[Array, "seq seq"]:
        return individual_mask(sample.segments)

    def copy_sources(self, sample: Sample) -> tuple[Int[Array, " seq"], Int[Array, " seq"], Bool[Array, "seq seq"]]:
        """Key k carries the title before it (the input shift), read at that one's time; a query may copy what its mask sees."""
        shift = lambda values: shift_within_students(values, sample.segments)  # noqa: E731
        return shift(sample.titles), shift(sample.timestamps), self.mask(sample)

    def hidden(self, sample: Sample, *, key: PRNGKeyArray | None = None, layers: int | None = None) -> Float[Array, "seq d"]:
        inputs = shift_within_students(sample.titles, sample.segments)
        return self.decoder.hidden(
            inputs,
            sample.positions,
            self.mask(sample),
            timestamps=sample.timestamps,
            segments=sample.segments,
            gaps=self.input_gaps(sample),
            key=key,
            layers=layers,
        )


@register("study-reference")
class StudyReference(Individual):
    """STUDY as the reference implements it: also attends to classmates' interactions strictly earlier in time.

    The mask is built on the unshifted timestamps while key k carries the title at k-1, as in the
    reference. This is leak-free, with a one-step lag: a classmate's title at j becomes visible only
    through their next interaction j+1 in the row (when that one is strictly earlier than the
    query), so each classmate's latest title in the row is never seen. Kept for side-by-side
    reproduction of the reference; ``Study`` (``--model study``) has no lag. Runs saved as ``study``
    before that name moved load as this model.
    """

    reads_classmates = True
    default_own_bias = STUDY_OWN_BIAS
    default_chunk_size = 8  # more classmates in a row

    def mask(self, sample: Sample) -> Bool[Array, "seq seq"]:
        return study_mask(sample.segments, sample.timestamps)


def _every_row(per_row, batch: Sample, key: PRNGKeyArray | None, *per_row_args):
    """``per_row(sample, *args, key=...)`` over the rows of a batch (and of ``per_row_args``), each with
    its own dropout key (none without ``key``)."""
    if key is None:
        return jax.vmap(lambda sample, *args: per_row(sample, *args, key=None))(batch, *per_row_args)
    keys = jax.random.split(key, batch.titles.shape[0])
    return jax.vmap(lambda sample, k, *args: per_row(sample, *args, key=k))(batch, keys, *per_row_args)


def batched_logits(model: DecoderModel, batch: Sample, key: PRNGKeyArray | None = None) -> Float[Array, "batch seq vocab"]:
    """The model's scores at every position of every row of a batch (dropout with ``key``)."""
    return _every_row(model, batch, key)


def batched_scores(model: DecoderModel, batch: Sample, key: PRNGKeyArray | None = None) -> Scores:
    """The model's output distribution at every position of every row, factored (dropout with ``key``).

    ``model.scores`` on every row, with the output layer applied to the whole batch at once: one
    ``[batch * seq, d] @ [d, vocab]`` product, whose gradient ``matmul_rows`` computes without
    transposing the ``[batch * seq, vocab]`` output gradient. A memory head on a CPU scores each
    row's memory titles once each (``DecoderModel.distinct_memory``). :func:`batched_logits`, which
    evaluation uses, scores them slot by slot: without a gradient that was as fast (43.1 against
    43.0 ms per 32 rows of the default model), and its results stay as they were to the last bit.
    """
    distinct = model.distinct_memory(batch)

    def inputs(sample: Sample, titles, slots, key: PRNGKeyArray | None):
        row = None if distinct is None else DistinctTitles(titles, slots, distinct.fits)  # one ``fits`` for the batch
        return model.readout_inputs(sample, model.hidden(sample, key=key), distinct=row)

    per_row = (None, None) if distinct is None else (distinct.titles, distinct.slots)
    queries, copy, memory = _every_row(inputs, batch, key, *per_row)
    logits = model.decoder.project(queries, batch.grade_level)
    return jax.vmap(mixture)(logits, copy, memory)
