"""studyrec: STUDY and Individual recommenders in JAX.

``studyrec.load_run(path)`` loads a trained run for inference (see :mod:`studyrec.recommend`). It is
imported on first use, so ``import studyrec`` stays light (no JAX, no W&B).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studyrec.recommend import Run, load_run

__all__ = ["Run", "load_run"]


def __getattr__(name: str):
    if name in __all__:
        from studyrec import recommend

        return getattr(recommend, name)
    raise AttributeError(f"module 'studyrec' has no attribute {name!r}")
