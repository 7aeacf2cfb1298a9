"""Model sizes and options: one frozen dataclass shared by Individual and STUDY."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. Defaults are the reference's (spec §5.1)."""

    vocab_size: int
    """Width of the output layer: ``Vocabulary.logits_size`` (titles + padding, ``<SEP>``, OOV)."""
    num_layers: int = 6
    """Number of pre-LayerNorm decoder blocks."""
    d_model: int = 256
    """Embedding and residual width."""
    qkv_dim: int = 256
    """Total width of queries, keys and values, split over the heads."""
    num_heads: int = 8
    """Attention heads."""
    mlp_dim: int = 1024
    """Hidden width of each block's ReLU MLP."""
    dropout: float = 0.1
    """Dropout on embeddings, attention outputs and MLPs."""
    attention_dropout: float = 0.1
    """Dropout on attention weights (0 lets training use the fused attention kernel)."""
    max_len: int = 512
    """Length of the sinusoidal position table."""
    num_grade_levels: int | None = None
    """Highest grade for grade-level conditioning (a per-row logit bias); None turns it off."""
    tie_embeddings: bool = False
    """Score titles with the input embedding table (makes copying a seen title easy)."""
    recency_bias: bool = False
    """A learned per-head attention bias on log(1 + days between query and key), so attention can prefer recent reads."""
    copy_head: bool = False
    """Mix the output softmax with a pointer over the titles in view (``CopyHead``)."""
    copy_bias_gain: float = 10.0
    """The copy head's recency and gate biases are stored divided by this, so Adam moves them by
    whole logits within a few passes (runs saved before it existed load with 1)."""
    gap_embedding: bool = False
    """Add a learned embedding of the time since the student's previous read (``gap_buckets``) to each input."""
    own_bias: float | None = None
    """Learned biases on the query's own student's keys, per attention head (starting at this many
    logits) and in the copy head (starting at 0), so a head weighs the student's past against
    classmates' with one number; None: no such parameters."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; parameters stay float32."""

    def __post_init__(self):
        if self.qkv_dim % self.num_heads:
            raise ValueError(f"qkv_dim={self.qkv_dim} is not divisible by num_heads={self.num_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size={self.vocab_size} is too small (padding, a title, <SEP> and OOV)")
