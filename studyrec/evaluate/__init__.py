"""Evaluation: hits@n, NDCG@n and MRR per student and subset, heuristic baselines, and paired comparisons."""

from studyrec.evaluate.baselines import BASELINES, recommend_baseline
from studyrec.evaluate.compare import Difference, paired_difference
from studyrec.evaluate.metrics import (
    AGGREGATE_COLUMNS,
    PER_STUDENT_COLUMNS,
    SUBSETS,
    StudentStats,
    aggregate_table,
    hits_at_n,
    per_student_table,
    score_recommendations,
    score_stats,
    subset_masks,
    target_ranks,
    write_tables,
)
from studyrec.evaluate.topk import top_titles

__all__ = [
    "AGGREGATE_COLUMNS",
    "BASELINES",
    "Difference",
    "PER_STUDENT_COLUMNS",
    "SUBSETS",
    "StudentStats",
    "aggregate_table",
    "hits_at_n",
    "paired_difference",
    "per_student_table",
    "recommend_baseline",
    "score_recommendations",
    "score_stats",
    "subset_masks",
    "target_ranks",
    "top_titles",
    "write_tables",
]
