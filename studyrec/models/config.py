"""Model sizes and options: one frozen dataclass shared by every model, the library's and the CLI's.

The class defaults are the reference's (spec §5.1); the training CLI starts from
``studyrec.config.DEFAULT_ARCH`` instead. Three fields come from the data, not from a flag
(``vocab_size``, ``max_len``, ``num_grade_levels``), and two may say ``"auto"`` until
:meth:`ModelConfig.resolve` fixes them for a model, a vocabulary and a platform.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal

import tyro

FromData = tyro.conf.Suppress
"""Marks a field that training sets from the data and flags (no ``--arch.*`` flag of its own)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. Defaults are the reference's (spec §5.1)."""

    vocab_size: Annotated[int, FromData] = 0
    """Width of the output layer: ``Vocabulary.logits_size`` (titles + padding, ``<SEP>``, OOV); 0 until resolved."""
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
    max_len: Annotated[int, FromData] = 512
    """Length of the sinusoidal position table."""
    num_grade_levels: Annotated[int | None, FromData] = None
    """Highest grade for grade-level conditioning (a per-row logit bias); None turns it off."""
    tie_embeddings: bool = False
    """Score titles with the input embedding table (copying a seen title generalises; the reference unties)."""
    recency_bias: bool = False
    """A learned per-head attention bias on log(1 + days between query and key), so attention can prefer recent reads."""
    copy_head: bool = False
    """Mix the output with a pointer over the titles in view (``CopyHead``: copying a classmate's or one's own read generalises; the reference has none)."""
    copy_bias_gain: float = 10.0
    """The copy head's recency and gate biases learn at this scale: stored divided by it, so Adam moves them by whole logits within a few passes (runs saved before it existed load with 1)."""
    copy_order_bias: bool = False
    """A learned copy-head bias on how many of the student's own titles in view came after a title (0 for the latest read), starting at 0: it tells apart same-day reads, whose ages are equal (the reference has none)."""
    copy_seen_bias: bool = False
    """A learned logit, starting at 0, added to every title the student's own keys in view carry: how much more (re-reading) or less (ratings, never repeated) likely a title already read is (the reference has none)."""
    gap_embedding: bool = False
    """Embed the time since the student's previous read (``gap_buckets``) into each input (the reference has none)."""
    own_bias: float | None | Literal["auto"] = None
    """Learned biases on the query's own student's keys, per attention head (starting at this many logits) and in the copy head (starting at 0), so a head weighs the student's past against classmates' with one number (None: off; auto: the model's ``default_own_bias``, 3 for study and off for the others; the reference has none)."""
    memory_size: int = 0
    """Titles in each position's classroom memory (``MemoryHead``: the titles its classroom read most in the days strictly before it, beyond what a row holds); 0: none. Only models that read classmates use it."""
    memory_days: float = 2.0
    """The classroom memory's window, in days before each position."""
    memory_reads: int = 512
    """At most this many of the classroom's latest reads in the window count (bounds the packing work)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Compute dtype, parameters staying float32 (auto: bfloat16 on GPU/TPU, float32 on CPU)."""

    def resolve(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        num_grade_levels: int | None,
        platform: str,
        default_own_bias: float | None,
        reads_memory: bool = False,
    ) -> ModelConfig:
        """This config for a vocabulary, a row length and a platform, with every ``"auto"`` decided
        (and no classroom memory for a model that does not read one)."""
        return dataclasses.replace(
            self,
            vocab_size=vocab_size,
            max_len=max(seq_len, 512),
            num_grade_levels=num_grade_levels,
            own_bias=default_own_bias if self.own_bias == "auto" else self.own_bias,
            memory_size=self.memory_size if reads_memory else 0,
            dtype=("float32" if platform == "cpu" else "bfloat16") if self.dtype == "auto" else self.dtype,
        )

    @property
    def resolved(self) -> bool:
        """Whether a model can be built from it: a vocabulary size and no ``"auto"`` left."""
        return self.vocab_size > 0 and "auto" not in (self.own_bias, self.dtype)

    def __post_init__(self):
        # A template without its vocabulary (the CLI's ``arch``) is checked once resolved, so that the
        # CLI can name the flag; every config a model is built from has a vocabulary and is checked here.
        if self.vocab_size:
            self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first field whose value the model cannot use."""
        at_least_one = ("num_layers", "d_model", "qkv_dim", "num_heads", "mlp_dim", "max_len")
        for field in at_least_one:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, f"{field}={value!r} must be a whole number of at least 1")
        if self.vocab_size != 0 and self.vocab_size < 4:
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
        if not isinstance(self.memory_size, int) or self.memory_size < 0:
            raise ConfigError("memory_size", self.memory_size, f"memory_size={self.memory_size!r} must be a whole number, 0 for no memory")
        if not (math.isfinite(self.memory_days) and self.memory_days > 0):
            raise ConfigError("memory_days", self.memory_days, f"memory_days={self.memory_days} must be a finite number of days above 0")
        if not isinstance(self.memory_reads, int) or self.memory_reads < 1:
            raise ConfigError("memory_reads", self.memory_reads, f"memory_reads={self.memory_reads!r} must be a whole number of at least 1")
        if self.own_bias not in (None, "auto") and not math.isfinite(self.own_bias):
            raise ConfigError("own_bias", self.own_bias, f"own_bias={self.own_bias} must be a finite number, None or 'auto'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError("dtype", self.dtype, f"dtype={self.dtype!r} must be 'auto', 'float32' or 'bfloat16'")


class ConfigError(ValueError):
    """An impossible :class:`ModelConfig` value: ``field`` and ``value`` say which, the message why."""

    def __init__(self, field: str, value, message: str):
        super().__init__(message)
        self.field = field
        self.value = value
        self.reason = message
