"""Recommendations from a saved run: ``load_run(path).recommend(activity)``, with explanations."""

from studyrec.recommend.explain import last_block, last_block_input, last_layer_attention
from studyrec.recommend.load import load_run
from studyrec.recommend.run import RECOMMENDATION_COLUMNS, SCORE, Run, as_seconds

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
