"""Individual and STUDY: the same decoder under two attention masks (spec §5.2, §5.3)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models.config import ModelConfig
from studyrec.models.decoder import DecoderModel
from studyrec.models.lagfree import StudyLagFree
from studyrec.models.masks import individual_mask, study_mask


def shift_within_students(values: Int[Array, " seq"], segments: Int[Array, " seq"]) -> Int[Array, " seq"]:
    """Position p gets the value at p-1 of the same student; each student starts from 0 (BOS).

    So the logits at p predict ``titles[p]`` without seeing it.
    """
    previous = jnp.concatenate([jnp.zeros(1, values.dtype), values[:-1]])
    same_student = jnp.concatenate([jnp.zeros(1, bool), segments[1:] == segments[:-1]])
    return jnp.where(same_student & (segments > 0), previous, 0)


class Individual(DecoderModel):
    """Each student's prediction attends only to that student's own past."""

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


class Study(Individual):
    """STUDY: also attends to classmates' interactions strictly earlier in time.

    The mask is built on the unshifted timestamps while key k carries the title at k-1, as in the
    reference. This is leak-free, with a one-step lag: a classmate's title at j becomes visible only
    through their next interaction j+1 in the row (when that one is strictly earlier than the
    query), so each classmate's latest title in the row is never seen.
    """

    def mask(self, sample: Sample) -> Bool[Array, "seq seq"]:
        return study_mask(sample.segments, sample.timestamps)


MODELS: dict[str, type[eqx.Module]] = {"individual": Individual, "study": Study, "study-lagfree": StudyLagFree}


def build(name: str, config: ModelConfig, *, key: PRNGKeyArray) -> eqx.Module:
    """A fresh model by name: ``"study"``, ``"individual"`` or ``"study-lagfree"``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(config, key=key)
