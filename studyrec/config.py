"""Experiment configuration: frozen dataclasses that tyro turns into flags, and named presets."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import tyro

from studyrec.models import ModelConfig, model_class


DEFAULT_EPOCHS = 12.0
"""Passes over the training data of a run that does not give ``--steps``: enough to learn, few
enough not to memorise small data (the best checkpoint by validation accuracy is kept anyway)."""

DEFAULT_ARCH = ModelConfig(
    num_layers=2, d_model=64, qkv_dim=64, num_heads=4, mlp_dim=256,
    tie_embeddings=True, copy_head=True, copy_order_bias=True, copy_seen_bias=True, gap_embedding=True, own_bias="auto",
    dtype="auto", memory_size=32,
)
"""The training CLI's model: small, with the additions that help on classroom data (see Results)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data a job reads and how its validation interactions are scored (training and baselines alike)."""

    train_data: tuple[str, ...] = ()
    """Training activity CSV/Parquet files (default: the bundled sample)."""
    valid_data: tuple[str, ...] = ()
    """Validation activity files: the interactions scored (default: the bundled sample)."""
    student_info: str | None = None
    """student_info CSV: StudentID, OrgnID, GRADE_LVL_NBR (default: the bundled sample's when no training file is given)."""
    school_info: str | None = None
    """school_info CSV: OrgnID, Parent_Building_ID (needed for district_grade)."""
    vocab_size: int = 2000
    """Titles kept in the vocabulary (most read first); 0 keeps all. Give models and baselines the same value to compare them."""
    classroom_grouping: Literal["school_grade", "district_grade", "grade", "none"] = "school_grade"
    """Who shares a row, and who counts as a classmate: see the README's table of groupings."""
    eval_context: Literal["valid-only", "history"] = "valid-only"
    """Final evaluation context: the validation file alone (the reference), or each student's and classmates' training history too."""
    n_recommendations: tuple[int, ...] = (1, 3, 5, 10, 20)
    """The n of hits@n in the final evaluation."""

    def check(self) -> None:
        """Rejects values that cannot work, before anything is read."""
        check_vocab_size(self.vocab_size)
        check_n_recommendations(tuple(self.n_recommendations))


Flat = Annotated[DataConfig, tyro.conf.arg(name="")]
"""A nested config whose flags keep their plain names (``--train-data``, not ``--data.train-data``)."""


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging. Each flag not given falls back to its ``WANDB_*`` environment
    variable, then to our default: offline (nothing leaves the machine), under the output dir."""

    mode: Literal["offline", "online", "disabled"] | None = None
    """offline writes under the output dir (``wandb sync`` uploads it later); online needs ``wandb login`` (None: $WANDB_MODE if set, else offline)."""
    project: str | None = None
    """W&B project (None: $WANDB_PROJECT if set, else studyrec)."""
    entity: str | None = None
    """W&B user or team (None: $WANDB_ENTITY if set, else your W&B default)."""
    name: str | None = None
    """Run name (None: $WANDB_NAME if set, else the output dir's name)."""
    tags: tuple[str, ...] | None = None
    """Run tags (None: $WANDB_TAGS, comma-separated, if set, else none)."""
    dir: str | None = None
    """Folder W&B writes its wandb/ directory in (None: $WANDB_DIR if set, else the output dir)."""


WANDB_MODES = {
    "offline": "offline", "dryrun": "offline", "online": "online", "run": "online", "shared": "shared", "disabled": "disabled",
}
"""W&B's spellings of a mode (in $WANDB_MODE) and the mode each means."""


def resolve_wandb(flags: WandbConfig, run_dir: str | os.PathLike, environ: Mapping[str, str] | None = None) -> WandbConfig:
    """Every field set: the flag when given, else its ``WANDB_*`` variable, else our default."""
    env = os.environ if environ is None else environ
    mode = flags.mode or env.get("WANDB_MODE") or "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE={mode!r} is not a W&B mode; set it to offline, online or disabled, unset it, or give --wandb.mode")
    tags = flags.tags if flags.tags is not None else tuple(t for t in env.get("WANDB_TAGS", "").split(",") if t)
    return WandbConfig(
        mode=WANDB_MODES[mode],
        project=flags.project or env.get("WANDB_PROJECT") or "studyrec",
        entity=flags.entity or env.get("WANDB_ENTITY") or None,
        name=flags.name or env.get("WANDB_NAME") or Path(run_dir).name,
        tags=tags,
        dir=flags.dir or env.get("WANDB_DIR") or str(run_dir),
    )


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-process setup through ``jax.distributed``; leave empty for one process."""

    auto: bool = False
    """Let JAX detect SLURM / Open MPI / TPU environments (``jax.distributed.initialize()``)."""
    coordinator_address: str | None = None
    """``host:port`` of process 0, for a manual launch."""
    num_processes: int | None = None
    """Total processes, for a manual launch."""
    process_id: int | None = None
    """This process's index, for a manual launch."""
    local_device_ids: tuple[int, ...] | None = None
    """Devices this process drives (default: all visible)."""
    timeout_s: int = 300
    """Seconds to wait for every process to join before giving up."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train STUDY or Individual on classroom-packed reading histories."""

    model: str = "study"
    """Which recommender to train: individual, study (the paper's, with the classroom memory), study-reference (the reference's lagged mask), or a model registered with studyrec.models.register."""
    preset: Annotated[str, tyro.conf.Suppress] = "default"
    """The preset this config started from (a subcommand of experiments.train), recorded in config.json."""
    data: Flat = DataConfig()
    """The data and how it is scored."""
    output_dir: str = "runs/{model}"
    """Run directory; rerunning with the same one resumes from its last checkpoint."""
    steps: int | None = None
    """Training steps (None: --epochs passes over the training interactions)."""
    epochs: float = DEFAULT_EPOCHS
    """Passes over the training interactions when --steps is not given: a pass is interactions / (global batch x seq_len) steps, and --warmup-steps is capped at a tenth of the run."""
    seq_len: int = 65
    """Tokens per packed classroom row."""
    student_chunk_size: int | None = None
    """Longest run of one student's interactions in a row (None: the model's default_chunk_size, 32 for individual and study, 8 for study-reference, at most seq_len; a run records the size it used)."""
    classmate_chunk_size: int | None = None
    """Focus rows: each row is one student's chunk, then this many of each classmate's latest interactions before its last (most recent first); evaluation and the validation accuracy score that student only (None: every student's chunk alike, as the reference)."""
    per_device_batch_size: int = 32
    """Rows per device per step; the global batch is this times every device of every host."""
    learning_rate: float = 0.0016
    """Peak learning rate (at a global batch of 2048 when scale_lr is on)."""
    scale_lr: bool = True
    """Scale learning_rate by global_batch/2048, the reference README's rule."""
    warmup_steps: int = 1000
    """Linear warm-up steps, then --lr-decay."""
    lr_decay: Literal["cosine", "rsqrt"] = "cosine"
    """After warm-up: a cosine to 0 at the last step, or the reference's inverse square root (no end)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    decay_all_params: bool = False
    """Decay biases, LayerNorm and embeddings too, as the reference does (default: matrices only)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (None: no clipping, as the reference)."""
    sampler: Literal["aligned", "random"] = "aligned"
    """Training rows: classmates' chunks around one moment (aligned), or each at random (the reference)."""
    grade_levels: int | None = None
    """Highest grade for grade-level conditioning (None: off)."""
    eval_every: int | None = None
    """Steps between evaluations of loss and accuracy on fixed batches (None: ten per run); they pick the best checkpoint."""
    eval_rows: int = 512
    """Rows in the fixed train and validation batches scored every eval_every steps."""
    save_every: int = 200
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept."""
    log_every: int = 20
    """Steps between metric logs."""
    seed: int = 0
    """Seeds the initial parameters, dropout and the training rows."""
    select_best: bool = True
    """Final evaluation with the parameters of the best validation accuracy seen at the evaluations (False: the last)."""
    fsdp: int = 1
    """Devices that share each parameter (fully sharded data parallel); 1 = replicate."""
    prefetch: int = 8
    """Batches packed ahead of the device."""
    arch: ModelConfig = DEFAULT_ARCH
    """Model sizes and options."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases."""
    dist: DistConfig = DistConfig()
    """Multi-process runs."""
    debug: bool = False
    """Show full tracebacks on errors."""

    @property
    def chunk_size(self) -> int:
        """``student_chunk_size``, or the model's default (at most ``seq_len``)."""
        return self.student_chunk_size or min(model_class(self.model).default_chunk_size or self.seq_len, self.seq_len)

    def run_dir(self) -> str:
        return self.output_dir.format(model=self.model)

    def model_config(self, vocab_size: int, platform: str) -> ModelConfig:
        """``arch`` resolved for this job's model, vocabulary, row length, grade levels and platform."""
        return self.arch.resolve(
            vocab_size=vocab_size, seq_len=self.seq_len, num_grade_levels=self.grade_levels, platform=platform,
            default_own_bias=model_class(self.model).default_own_bias,
            reads_memory=model_class(self.model).reads_memory,
        )


def check_vocab_size(vocab_size: int) -> None:
    """--vocab-size: a title count, or 0 for every title (training and baselines alike)."""
    if vocab_size < 0:
        raise ValueError(f"--vocab-size {vocab_size} is negative; give a title count, or 0 to keep every title")


def check_n_recommendations(ns: tuple[int, ...]) -> None:
    """--n-recommendations: one or more list lengths, each at least 1."""
    if not ns or min(ns) < 1:
        given = " ".join(map(str, ns)) or "(none)"
        raise ValueError(f"--n-recommendations {given}: list lengths must be positive integers, one or more (e.g. 1 3 5 10 20)")


def check_output_dir(template: str, placeholder: str) -> None:
    """--output-dir must name a directory; ``{placeholder}`` is the only field it may hold."""
    try:
        path = template.format(**{placeholder: placeholder})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--output-dir {template!r} has a placeholder other than {{{placeholder}}} ({e!r}); "
            "write braces as {{ and }}"
        ) from None
    if not path.strip():
        raise ValueError("--output-dir is empty; give a directory")


PRESETS: dict[str, TrainConfig] = {
    # Small enough to train on the bundled data on a laptop CPU in a couple of minutes.
    "default": TrainConfig(learning_rate=3e-3, scale_lr=False, warmup_steps=100),
    # Every preset but paper trains for DEFAULT_EPOCHS passes with the model's chunk size.
    # The side-by-side comparison with the reference on a 2-core CPU.
    "cpu-small": TrainConfig(
        preset="cpu-small",
        arch=dataclasses.replace(DEFAULT_ARCH, num_layers=2, d_model=128, qkv_dim=128, num_heads=8, mlp_dim=512),
        seq_len=65,
        per_device_batch_size=32,
        learning_rate=1e-3,
        scale_lr=False,
        warmup_steps=200,
        save_every=500,
    ),
    # The reference README's paper-scale run.
    "paper": TrainConfig(
        preset="paper",
        arch=dataclasses.replace(DEFAULT_ARCH, num_layers=6, d_model=256, qkv_dim=256, num_heads=8, mlp_dim=1024),
        seq_len=65,
        student_chunk_size=65,
        per_device_batch_size=2048,
        steps=224_000,
        learning_rate=0.0016,
        lr_decay="rsqrt",
        scale_lr=True,
        warmup_steps=1000,
        grad_clip=None,
        eval_every=500,
        eval_rows=65536,
        save_every=1000,
        log_every=100,
    ),
}
