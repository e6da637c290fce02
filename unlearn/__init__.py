"""Constrained unlearning in diffusion models: ``unlearn.run(cfg)`` (see :mod:`unlearn.api`)."""
from .api import build, compose, run

__all__ = ["build", "compose", "run"]
