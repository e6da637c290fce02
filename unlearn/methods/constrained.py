"""Dual ascent on the multipliers: the paper's constrained method (:class:`unlearn.dual.DualAscent`)."""
from __future__ import annotations

from omegaconf import OmegaConf

from ..config import ConfigError
from ..dual import DualAscent
from .base import Method


class DualAscentMethod(Method):
    """The multipliers move by projected dual ascent (Newton or plain steps, ``method.dual_step``);
    the formulation runs the primal of its Lagrangian at the current multipliers."""

    name = "constrained"
    learnable = True

    def check_config(self, cfg, formulation_cls) -> None:
        lr = OmegaConf.select(cfg, "method.dual_lr")
        if lr is None:
            return
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise ConfigError(f"method.dual_lr must be a number (got {cfg.method.dual_lr!r})") from None
        if not lr > 0:
            raise ConfigError(f"method.dual_lr must be > 0 (got {cfg.method.dual_lr})")

    def build_multipliers(self, formulation) -> DualAscent:
        c = self.cfg
        return DualAscent(formulation.num_constraints, float(c.dual_lr), init=float(c.get("init", 0.0)),
                          optimizer=str(c.get("dual_optimizer", "sgd")), projection=formulation.project,
                          kp=float(c.get("dual_kp", 0.0)), ema_nu=float(c.get("dual_ema_nu", 0.0)),
                          rule=str(c.get("dual_step", "plain")), damping=float(c.get("newton_damping", 1.0)),
                          max_growth=float(c.get("newton_max_growth", 3.0)))
