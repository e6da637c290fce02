"""The paper's weight-based baseline of each formulation (``method=baseline``).

Each formulation names its baseline (``Formulation.paper_baseline``, a registered method): the
ESD-style distillation for LU, fixed equal weights for RU and FU. The run is that method's, with
this config (``method.multiplier``).
"""
from __future__ import annotations

from .base import Method, method_class


class PaperBaseline(Method):
    name = "baseline"

    def resolve(self, formulation_cls):
        return method_class(formulation_cls.paper_baseline)(self.cfg)
