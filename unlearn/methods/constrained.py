"""Dual ascent on the multipliers: the paper's constrained method (:class:`unlearn.dual.DualAscent`)."""
from __future__ import annotations


from ..config import ConfigError
from ..dual import DualAscent
from .base import Method


class DualAscentMethod(Method):
    """The multipliers move by projected dual ascent (Newton or plain steps, ``method.dual_step``);
    the formulation runs the primal of its Lagrangian at the current multipliers."""

    name = "constrained"
    learnable = True

    def check_config(self, cfg, formulation_cls) -> None:
        try:
            lr = float(cfg.method.dual_lr)
        except (TypeError, ValueError):
            raise ConfigError(f"method.dual_lr must be a number (got {cfg.method.dual_lr!r})") from None
        if not lr > 0:
            raise ConfigError(f"method.dual_lr must be > 0 (got {cfg.method.dual_lr})")

    def build_multipliers(self, formulation) -> DualAscent:
        c = self.cfg
        return DualAscent(formulation.num_constraints, float(c.dual_lr), init=float(c.init),
                          optimizer=str(c.dual_optimizer), projection=formulation.project,
                          kp=float(c.dual_kp), ema_nu=float(c.dual_ema_nu),
                          rule=str(c.dual_step), damping=float(c.newton_damping),
                          max_growth=float(c.newton_max_growth))
