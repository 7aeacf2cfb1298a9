"""Individual and STUDY decoders as pure Equinox modules."""

from studyrec.models.config import ModelConfig
from studyrec.models.decoder import Decoder, DecoderModel
from studyrec.models.lagfree import StudyLagFree
from studyrec.models.masks import individual_mask, own_past, strictly_earlier, study_mask
from studyrec.models.recommenders import MODELS, Individual, Study, build, shift_within_students

__all__ = [
    "MODELS",
    "Decoder",
    "DecoderModel",
    "Individual",
    "ModelConfig",
    "Study",
    "StudyLagFree",
    "build",
    "individual_mask",
    "own_past",
    "shift_within_students",
    "strictly_earlier",
    "study_mask",
]
