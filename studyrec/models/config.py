"""Model sizes and options: one frozen dataclass shared by Individual and STUDY."""

from __future__ import annotations

import dataclasses
import math
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
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first field whose value the model cannot use."""
        at_least_one = ("num_layers", "d_model", "qkv_dim", "num_heads", "mlp_dim", "max_len")
        for field in at_least_one:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, f"{field}={value!r} must be a whole number of at least 1")
        if self.vocab_size < 4:
            raise ConfigError(
                "vocab_size", self.vocab_size, f"vocab_size={self.vocab_size} is too small (padding, a title, <SEP> and OOV)"
            )
        if self.qkv_dim % self.num_heads:
            raise ConfigError(
                "qkv_dim", self.qkv_dim,
                f"qkv_dim={self.qkv_dim} is not divisible by num_heads={self.num_heads}; make it a multiple of num_heads",
            )
        if self.d_model % 2:
            raise ConfigError("d_model", self.d_model, f"d_model={self.d_model} must be even for sinusoidal positions")
        for field in ("dropout", "attention_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ConfigError(field, value, f"{field}={value} must be in [0, 1): a probability below 1")
        if self.num_grade_levels is not None and self.num_grade_levels < 1:
            raise ConfigError(
                "num_grade_levels", self.num_grade_levels,
                f"num_grade_levels={self.num_grade_levels} must be at least 1 (the highest grade), or None for no grade bias",
            )
        if not (math.isfinite(self.copy_bias_gain) and self.copy_bias_gain > 0):
            raise ConfigError(
                "copy_bias_gain", self.copy_bias_gain, f"copy_bias_gain={self.copy_bias_gain} must be a finite number above 0"
            )
        if self.own_bias is not None and not math.isfinite(self.own_bias):
            raise ConfigError("own_bias", self.own_bias, f"own_bias={self.own_bias} must be a finite number, or None")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", self.dtype, f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


class ConfigError(ValueError):
    """An impossible :class:`ModelConfig` value: ``field`` and ``value`` say which, the message why."""

    def __init__(self, field: str, value, message: str):
        super().__init__(message)
        self.field = field
        self.value = value
        self.reason = message
