"""Loss, optimizer and the jitted training and evaluation steps."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from studyrec.data.packing import Sample
from studyrec.models import DecoderModel, Scores, batched_scores


def schedule(peak: float, warmup: int, decay: str = "rsqrt", steps: int | None = None) -> optax.Schedule:
    """Linear warm-up to ``peak``, then a decay.

    ``rsqrt``: ``peak * sqrt(warmup / step)``, the reference's, with no end. ``cosine``: half a cosine
    from ``peak`` at ``warmup`` to 0 at ``steps``, so a short run ends annealed.
    """
    warmup = max(warmup, 1)
    if decay == "cosine" and steps is None:
        raise ValueError("the cosine decay needs the number of steps")
    if decay not in ("rsqrt", "cosine"):
        raise ValueError(f"unknown learning-rate decay {decay!r}: use rsqrt or cosine")

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        if decay == "rsqrt":
            after = jnp.sqrt(warmup / (step + 0.01))
        else:
            after = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)))
        return peak * jnp.where(step < warmup, step / warmup, after)

    return lr


DECAYED = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "out_kernel"})


def decay_mask(model: DecoderModel):
    """Weight decay on dense kernels only: not on biases, LayerNorm, or embedding tables."""
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "name", None) in DECAYED, params)


def make_optimizer(
    model: DecoderModel,
    *,
    peak_lr: float,
    warmup: int,
    weight_decay: float,
    grad_clip: float | None,
    decay_all: bool,
    lr_decay: str = "rsqrt",
    steps: int | None = None,
) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.98, eps 1e-9) as the reference, with optional clipping and a decay mask."""
    mask = None if decay_all else decay_mask(model)
    adamw = optax.adamw(schedule(peak_lr, warmup, lr_decay, steps), b1=0.9, b2=0.98, eps=1e-9, weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw


def weighted_metrics(scores: Scores, batch: Sample, oov: int, first_only: bool = False) -> dict[str, Float[Array, ""]]:
    """Token sums over the whole (global) batch: loss, correct, correct ignoring OOV, and the weight.

    Targets are every real token (separators and padding excluded, OOV included, as the reference),
    or with ``first_only`` the tokens of each row's first student (the one a focus row is about).
    The loss reads the targets' log-probabilities; only the accuracy's maximum writes out the
    vocabulary. A prediction is correct when no title scores above the target (a tie counts).
    """
    weights = ((batch.segments == 1) if first_only else (batch.segments > 0)).astype(jnp.float32)
    targets = batch.titles
    target = scores.at(targets)
    xent = -target
    # Correct: no title scores above the target (an argmax would materialise an index per title).
    best = jax.lax.stop_gradient(scores).max()
    correct = (jax.lax.stop_gradient(target) >= best).astype(jnp.float32) * weights
    return {
        "loss_sum": jnp.sum(xent * weights),
        "correct": jnp.sum(correct),
        "correct_no_oov": jnp.sum(correct * (targets != oov).astype(jnp.float32)),
        "weight": jnp.sum(weights),
    }


def summarise(sums: dict[str, Array], prefix: str = "") -> dict[str, float]:
    """Token-weighted averages from ``weighted_metrics`` sums."""
    w = max(float(sums["weight"]), 1.0)
    return {
        f"{prefix}loss": float(sums["loss_sum"]) / w,
        f"{prefix}accuracy": float(sums["correct"]) / w,
        f"{prefix}oov_corrected_accuracy": float(sums["correct_no_oov"]) / w,
    }


def make_train_step(optimizer: optax.GradientTransformation, oov: int):
    """``step(model, opt_state, batch, key) -> (model, opt_state, metrics)``, jitted, buffers donated."""

    def loss_fn(model, batch, key):
        sums = weighted_metrics(batched_scores(model, batch, key), batch, oov)
        return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums

    @eqx.filter_jit(donate="all")
    def step(model, opt_state, batch: Sample, key: PRNGKeyArray):
        (_, sums), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch, key)
        with jax.numpy_dtype_promotion("standard"):  # optax raises a Python float to an int32 count (bias correction)
            updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, {**sums, "grad_norm": optax.tree.norm(grads)}

    return step


@eqx.filter_jit
def eval_sums(model: DecoderModel, batch: Sample, oov: int, first_only: bool = False) -> dict[str, Array]:
    """Metric sums of the inference-mode model on one batch."""
    return weighted_metrics(batched_scores(model, batch, None), batch, oov, first_only)
