"""Fixed equal weights on the Lagrangian: the multipliers stay at ``method.multiplier``.

RU: the closed-form composed target at those weights (their sum must be < 1); FU: one fixed weight
on every forget constraint (SISS without importance sampling); LU: the Lagrangian's primal (the
constrained method's, e.g. the weighted primal) at fixed multipliers.
"""
from __future__ import annotations

from ..dual import FixedMultipliers
from .base import Method


class FixedWeights(Method):
    name = "fixed"

    def check_config(self, cfg, formulation_cls) -> None:
        self.fixed_values(formulation_cls, formulation_cls.constraint_count(cfg))

    def build_multipliers(self, formulation) -> FixedMultipliers:
        return FixedMultipliers(self.fixed_values(type(formulation), formulation.num_constraints))
