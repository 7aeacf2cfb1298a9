"""The single list of model names: the CLI, the benchmarks and ``load_run`` read it.

A model registers itself with :func:`register`; what it needs and sees is declared on its class
(see :class:`~studyrec.models.decoder.DecoderModel`), so nothing outside ``models`` asks which
class it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from jaxtyping import PRNGKeyArray

from studyrec.models.config import ModelConfig
from studyrec.models.decoder import DecoderModel

MODELS: dict[str, type[DecoderModel]] = {}
"""Registered models by name, in registration order."""

M = TypeVar("M", bound=type[DecoderModel])


def register(name: str) -> Callable[[M], M]:
    """A class decorator that makes a :class:`DecoderModel` subclass trainable and loadable as ``name``."""

    def add(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, DecoderModel)):
            raise TypeError(f"model {name!r}: {cls!r} is not a studyrec.models.DecoderModel subclass")
        if MODELS.get(name, cls) is not cls:
            raise ValueError(f"model name {name!r} is taken by {MODELS[name].__module__}.{MODELS[name].__qualname__}")
        MODELS[name] = cls
        return cls

    return add


def model_class(name: str) -> type[DecoderModel]:
    """The class registered as ``name``; a ValueError lists the names there are."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)} (a custom model must be registered with "
            "studyrec.models.register before it is used)"
        ) from None


def build(name: str, config: ModelConfig, *, key: PRNGKeyArray) -> DecoderModel:
    """A fresh model by registered name, e.g. ``"study-reference"``, ``"individual"`` or ``"study"``."""
    if not config.resolved:
        raise ValueError(
            f"ModelConfig(vocab_size={config.vocab_size}, own_bias={config.own_bias!r}, dtype={config.dtype!r}) is not "
            "resolved; give a vocab_size and no 'auto' (ModelConfig.resolve does both)"
        )
    cls = model_class(name)
    if config.memory_size and not cls.reads_memory:
        raise ValueError(f"model {name!r} reads no classroom memory: give it memory_size=0")
    return cls(config, key=key)



def memory_options(name: str, config: ModelConfig) -> dict | None:
    """The ``ClassroomMemory`` options (size, days, max_reads) that model ``name`` reads under
    ``config``, or None when it reads no classroom memory."""
    if not (model_class(name).reads_memory and config.memory_size):
        return None
    return {"size": config.memory_size, "days": config.memory_days, "max_reads": config.memory_reads}
