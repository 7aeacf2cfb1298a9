"""Individual and STUDY decoders as pure Equinox modules."""

from studyrec.models.config import ModelConfig
from studyrec.models.decoder import Decoder, DecoderModel
from studyrec.models.mixture import Scores, mixture
from studyrec.models.masks import individual_mask, own_past, strictly_earlier, study_mask
from studyrec.models.recommenders import STUDY_OWN_BIAS, Individual, StudyReference, batched_logits, batched_scores, shift_within_students
from studyrec.models.study import Study  # isort: skip (registered after the reference's two)
from studyrec.models.registry import MODELS, build, memory_options, model_class, register

__all__ = [
    "MODELS",
    "Decoder",
    "DecoderModel",
    "Individual",
    "ModelConfig",
    "STUDY_OWN_BIAS",
    "Scores",
    "Study",
    "StudyReference",
    "batched_logits",
    "batched_scores",
    "build",
    "individual_mask",
    "memory_options",
    "mixture",
    "model_class",
    "own_past",
    "register",
    "shift_within_students",
    "strictly_earlier",
    "study_mask",
]
