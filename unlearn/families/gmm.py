"""The Gaussian-mixture testbed: exact densities, scores and the oracle (implementation in
:mod:`unlearn.models.gmm_setup`)."""
from __future__ import annotations

from ..models.gmm_setup import build_gmm_setup, validate_gmm_config
from .base import Family, register_family


@register_family("gmm")
class GaussianMixtureFamily(Family):
    """ResNet MLP denoisers pretrained (cached) on the mixture and on each unlearned component."""

    double = "gmm"

    @classmethod
    def validate(cls, m) -> None:
        validate_gmm_config(m)

    @classmethod
    def concept_count(cls, m) -> int:
        return len(m.unlearn)

    def setup(self):
        return build_gmm_setup(self.cfg, show_progress=self.show, needs=self.needs)
