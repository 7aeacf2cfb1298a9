"""A training job up to its first step: the plan (flags, devices), the data, the model and optimizer
state, and the compiled step.

Nothing here imports Grain, Orbax or the evaluation (about 50 MB of a run's memory): the step is
compiled before :mod:`studyrec.train.fit` loads them, so the compiler's transient memory adds to
the smallest the process will be.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import equinox as eqx
import jax

from studyrec import rundir
from studyrec.config import TrainConfig, resolve_wandb
from studyrec.data import dataset
from studyrec.data.interactions import Interactions, make_chunks
from studyrec.data.memory import ClassroomMemory
from studyrec.data.packing import ClassroomPacker, local_rows
from studyrec.data.vocab import Vocabulary
from studyrec.models import build, memory_options
from studyrec.sharding import make_mesh, place_batch, scoring_workers, shard_params
from studyrec.train.checks import check_flags, check_memory, check_run_dir, resolve_steps
from studyrec.train.step import make_optimizer, make_train_step

logger = logging.getLogger("studyrec.train")


@dataclasses.dataclass
class TrainingData:
    """The job's data: validated frames, the vocabulary, the time origin and the packers."""

    frames: dataset.Frames
    vocab: Vocabulary
    origin: int
    train_packer: ClassroomPacker
    valid_packer: ClassroomPacker | None


@dataclasses.dataclass
class Job:
    """Where and how a job runs: its config (steps resolved), mesh, batch and run directory."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    global_batch: int
    peak_lr: float
    run_dir: Path
    is_main: bool


def make_packer(
    data: Interactions, cfg: TrainConfig, vocab: Vocabulary, origin: int, align: str = "start", chunk_size: int | None = None
) -> ClassroomPacker:
    """The job's packer of ``data``: its row length, chunks, sampler and classroom memory."""
    chunks = make_chunks(data, chunk_size or cfg.chunk_size, align)
    return ClassroomPacker(
        data, chunks, cfg.seq_len, vocab.sep, origin, aligned=cfg.sampler == "aligned", context_size=cfg.classmate_chunk_size,
        memory=ClassroomMemory.optional(data, origin, memory_options(cfg.model, cfg.arch)),
    )


def plan(cfg: TrainConfig) -> Job:
    """Checks every flag (before anything is read or written) and lays out the devices."""
    check_flags(cfg, jax.device_count())
    scoring_workers()  # the final evaluation's: a bad STUDYREC_SCORING_WORKERS stops the job now, not after training
    run_dir = Path(cfg.run_dir())
    check_run_dir(run_dir)
    # config.json records what is used
    cfg = dataclasses.replace(cfg, wandb=resolve_wandb(cfg.wandb, run_dir), student_chunk_size=cfg.chunk_size)
    global_batch = cfg.per_device_batch_size * jax.device_count()
    peak_lr = cfg.learning_rate * (global_batch / 2048 if cfg.scale_lr else 1.0)
    return Job(cfg, make_mesh(cfg.fsdp), global_batch, peak_lr, run_dir, jax.process_index() == 0)


def load_data(job: Job) -> tuple[TrainingData, Job]:
    """Validated frames, the vocabulary (a resumed run's must match), encoded interactions and packers;
    the job's steps follow from ``--epochs`` once the interactions are counted."""
    cfg, run_dir = job.cfg, job.run_dir
    paths = dataset.DataPaths.resolve(cfg.data.train_data, cfg.data.valid_data, cfg.data.student_info, cfg.data.school_info)
    frames = dataset.Frames.load(paths)
    vocab = dataset.build_vocab(frames, cfg.data.vocab_size)
    vocab_path = rundir.vocab_file(run_dir)
    if vocab_path.exists():
        saved = rundir.load_vocab(run_dir)
        if saved != vocab:
            raise ValueError(
                f"{vocab_path} holds {len(saved)} tokens, but --vocab-size {cfg.data.vocab_size} on these training files "
                f"gives {len(vocab)}{' with other titles' if len(saved) == len(vocab) else ''}; resume with the data "
                f"and flags the run was started with (see {run_dir / 'config.json'}), or choose a new --output-dir"
            )
    origin = dataset.time_origin(frames.train)
    train_data = dataset.encode(frames.train, vocab, frames, cfg.data.classroom_grouping)
    logger.info(dataset.describe("train", train_data))
    given, cfg = cfg, resolve_steps(cfg, train_data.num_interactions, job.global_batch)
    if (cfg.steps, cfg.warmup_steps) != (given.steps, given.warmup_steps):
        logger.info("training for %d steps with %d of warm-up (%s)", cfg.steps, cfg.warmup_steps,
                    f"{cfg.epochs:g} epochs" if given.steps is None else "the warm-up is cut to leave room for the cosine decay")
    valid_packer = None
    if frames.valid is not None:
        valid_data = dataset.encode(frames.valid, vocab, frames, cfg.data.classroom_grouping)
        logger.info(dataset.describe("valid", valid_data))
        valid_packer = make_packer(valid_data, cfg, vocab, origin)
    data = TrainingData(frames, vocab, origin, make_packer(train_data, cfg, vocab, origin), valid_packer)
    return data, dataclasses.replace(job, cfg=cfg)


def init_state(job: Job, data: TrainingData):
    """The model and optimizer, placed by the rule table: ``(model, optimizer, opt_state, model_config)``."""
    cfg = job.cfg
    model_config = cfg.model_config(data.vocab.logits_size, jax.default_backend())
    check_memory(cfg, model_config, jax.device_count())  # before a batch is packed or a file written
    model = build(cfg.model, model_config, key=jax.random.key(cfg.seed))
    optimizer = make_optimizer(
        model, peak_lr=job.peak_lr, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        decay_all=cfg.decay_all_params, lr_decay=cfg.lr_decay, steps=cfg.steps,
    )
    model = shard_params(model, job.mesh)
    opt_state = shard_params(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), job.mesh)
    return model, optimizer, opt_state, model_config


def compiled_step(job: Job, data: TrainingData, model, optimizer, opt_state):
    """The train step, compiled ahead for this job's batches, before the data pipeline, checkpointer
    and W&B start: the compiler's transient memory (about 450 MB at ``cpu-small``) then adds to the
    smallest the process will be, which lowers the run's peak RSS."""
    cfg = job.cfg
    jax.clear_caches()  # initialisation's eager executables: about 90 MB at cpu-small, for the compiler to reuse
    example = data.train_packer.random_rows(cfg.seed, local_rows(0, job.global_batch, jax.process_index(), jax.process_count()))
    with warnings.catch_warnings():  # the batch's int arrays are donated with the rest, and cannot be reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return make_train_step(optimizer, data.vocab.oov).lower(
            model, opt_state, place_batch(example, job.mesh), jax.random.key(cfg.seed)
        ).compile()
