"""ESD-style target distillation: the model is fitted to the fixed concept-erasing target
``p_pre prod_i (q_i / p_pre)^-eta_i`` with ``eta = method.multiplier`` (score
``eps_pre - sum_i eta_i (eps_qi - eps_pre)``).

LU distils it into the weights (its primal step is the distillation); for RU the target is its own
composed target at ``mu = eta / (1 + sum eta)`` (:meth:`~unlearn.formulations.base.Formulation.esd_multipliers`).
Formulations without concept models (FU) have no such target.
"""
from __future__ import annotations

from ..config import ConfigError
from ..dual import FixedMultipliers
from .base import Method


class ESDDistillation(Method):
    name = "esd"
    target_distillation = True

    def check_config(self, cfg, formulation_cls) -> None:
        if not formulation_cls.has_esd_target:
            from ..formulations.base import formulation_names

            ok = " or ".join(formulation_names(lambda c: c.has_esd_target))
            raise ConfigError(f"method=esd needs concept models (formulation={ok})")
        self.fixed_values(formulation_cls, formulation_cls.constraint_count(cfg))

    def to_multipliers(self, formulation_cls, values):
        return formulation_cls.esd_multipliers(values).float()

    def build_multipliers(self, formulation) -> FixedMultipliers:
        return FixedMultipliers(self.fixed_values(type(formulation), formulation.num_constraints))
