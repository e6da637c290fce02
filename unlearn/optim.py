"""The primal optimiser and its learning-rate schedule (``formulation.adam_betas``,
``formulation.lr_schedule``, ``formulation.lr_warmup_steps``).

``cosine`` is the cosine schedule with linear warm-up of the paper's tables and the authors' code
(the same multipliers as diffusers' ``get_cosine_schedule_with_warmup``): the rate rises linearly
from 0 over the warm-up steps, then falls as ``0.5 (1 + cos(pi p))`` with the progress ``p`` from 0
to 1 over the remaining steps. ``constant`` keeps it (after the warm-up, if any).
"""
from __future__ import annotations

import math

import torch

from .config import ConfigError

SCHEDULES = ("constant", "cosine")


def lr_multiplier(schedule: str, warmup: int, total: int, step: int) -> float:
    """The learning rate's factor at optimiser step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def check_schedule(cfg, prefix: str = "formulation") -> None:
    """One-line errors for the optimiser keys of a formulation config."""
    if str(cfg.lr_schedule) not in SCHEDULES:
        raise ConfigError(f"{prefix}.lr_schedule must be one of {list(SCHEDULES)} (got {cfg.lr_schedule!r})")
    w = cfg.lr_warmup_steps
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ConfigError(f"{prefix}.lr_warmup_steps must be an integer >= 0 (got {w!r})")
    b = cfg.adam_betas
    try:
        ok = len(b) == 2 and all(0.0 <= float(v) < 1.0 for v in b)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{prefix}.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.999] (got {b!r})")


def adamw(params, cfg, lr: float, weight_decay: float) -> torch.optim.AdamW:
    betas = tuple(float(v) for v in cfg.adam_betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def lr_schedule(opt: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The schedule of ``opt`` over ``total_steps`` optimiser steps, or ``None`` where the rate is constant."""
    schedule, warmup = str(cfg.lr_schedule), int(cfg.lr_warmup_steps)
    if schedule == "constant" and warmup == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(schedule, warmup, int(total_steps), s))
