"""The data side: files -> validated frames -> vocabulary -> classroom packs -> Grain."""

from studyrec.data.classrooms import GROUPINGS, assign_classrooms
from studyrec.data.interactions import Chunks, Interactions, make_chunks
from studyrec.data.packing import ClassroomPacker, EvalLayout, Sample, pack_histories
from studyrec.data.vocab import Vocabulary

__all__ = [
    "GROUPINGS",
    "Chunks",
    "ClassroomPacker",
    "EvalLayout",
    "Interactions",
    "Sample",
    "Vocabulary",
    "assign_classrooms",
    "make_chunks",
    "pack_histories",
]
