"""Individual and the reference's STUDY: the same decoder under two attention masks (spec §5.2, §5.3).

The paper's STUDY, which sees every strictly earlier classmate read, is ``studyrec.models.study.Study``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models.decoder import DecoderModel
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


def _every_row(per_row, batch: Sample, key: PRNGKeyArray | None):
    """``per_row(sample, key=...)`` over the rows of a batch, each with its own dropout key (none without ``key``)."""
    if key is None:
        return jax.vmap(lambda sample: per_row(sample, key=None))(batch)
    keys = jax.random.split(key, batch.titles.shape[0])
    return jax.vmap(lambda sample, k: per_row(sample, key=k))(batch, keys)


def batched_logits(model: DecoderModel, batch: Sample, key: PRNGKeyArray | None = None) -> Float[Array, "batch seq vocab"]:
    """The model's scores at every position of every row of a batch (dropout with ``key``)."""
    return _every_row(model, batch, key)


def batched_scores(model: DecoderModel, batch: Sample, key: PRNGKeyArray | None = None) -> Scores:
    """The model's output distribution at every position of every row, factored (dropout with ``key``).

    ``model.scores`` on every row, with the output layer applied to the whole batch at once: one
    ``[batch * seq, d] @ [d, vocab]`` product, whose gradient ``matmul_rows`` computes without
    transposing the ``[batch * seq, vocab]`` output gradient.
    """
    def inputs(sample: Sample, key: PRNGKeyArray | None):
        return model.readout_inputs(sample, model.hidden(sample, key=key))

    queries, copy, memory = _every_row(inputs, batch, key)
    logits = model.decoder.project(queries, batch.grade_level)
    return jax.vmap(mixture)(logits, copy, memory)
