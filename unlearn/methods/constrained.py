"""Dual ascent on the multipliers: the paper's constrained method (:class:`unlearn.dual.DualAscent`)."""
from __future__ import annotations

from omegaconf import OmegaConf

from ..config import ConfigError, as_number
from ..dual import DualAscent
from .base import Method


class DualAscentMethod(Method):
    """The multipliers move by projected dual ascent (Newton or plain steps, ``method.dual_step``);
    the formulation runs the primal of its Lagrangian at the current multipliers."""

    name = "constrained"
    learnable = True

    def check_config(self, cfg, formulation_cls) -> None:
        # method.dual_lr is ${formulation.dual_lr} unless set: the message names the key to change
        via = "; set by formulation.dual_lr" if OmegaConf.is_interpolation(cfg.method, "dual_lr") else ""
        lr = as_number(cfg.method.dual_lr, "method.dual_lr", float, f"a number (the dual learning rate{via})")
        if not lr > 0:
            raise ConfigError(f"method.dual_lr must be > 0 (the dual learning rate{via}; got {cfg.method.dual_lr})")

    def build_multipliers(self, formulation) -> DualAscent:
        c = self.cfg
        return DualAscent(formulation.num_constraints, float(c.dual_lr), init=float(c.init),
                          optimizer=str(c.dual_optimizer), projection=formulation.project,
                          kp=float(c.dual_kp), ema_nu=float(c.dual_ema_nu),
                          rule=str(c.dual_step), damping=float(c.newton_damping),
                          max_growth=float(c.newton_max_growth))
