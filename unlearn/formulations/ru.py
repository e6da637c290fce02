"""RU: reverse-KL constraints (concept unlearning), dual-only algorithm (formulas.md, RU).

For fixed multipliers the Lagrangian minimiser is the composed score
``eps_rev = (eps_pre - sum_i mu_i eps_i) / (1 - mu_bar)``, so the primal step is skipped:
each dual step samples from ``eps_rev``, estimates ``KL(p_rev || q_i)`` along those
trajectories with the pathwise estimator and moves ``mu``. Optionally the final composed model
is distilled into the weights (primal: minimise the pathwise ``KL(p_theta || p_rev)``).
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..estimators import pathwise_kl, trajectory_kl
from ..models.base import ComposedScore
from ..utils import progress
from .base import Formulation


class ReverseKLUnlearning(Formulation):
    name = "ru"
    sense = "ge"
    has_primal = False

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if not self.setup.concepts:
            raise ConfigError("formulation=ru needs a model of each unlearning concept (model.unlearn)")
        self.max_sum = float(self.cfg.get("max_multiplier_sum", 0.95))
        if not 0 < self.max_sum < 1:
            raise ConfigError(f"formulation.max_multiplier_sum must be in (0, 1) (got {self.max_sum})")
        self.distilled = False

    def constraint_names(self):
        return [f"KL(p||q[{n}])" for n in self.setup.concept_names]

    def composed(self, mu: torch.Tensor) -> ComposedScore:
        return ComposedScore.reverse_kl(self.setup.pretrained, self.setup.concepts, mu)

    def _kl_to_concepts(self, model) -> torch.Tensor:
        kl = pathwise_kl(model, self.setup.concepts, self.sampler, int(self.cfg.batch_size), self.gen,
                         cond=self.setup.cond, ref_conds=self.setup.concept_conds or None)
        return kl.mean(0)

    def pretrained_values(self):
        return self._kl_to_concepts(self.setup.pretrained)

    def thresholds(self, pretrained):
        # paper: a shared factor on the average pretrained-to-concept KL
        return torch.full_like(pretrained, self.factor * float(pretrained.mean()))

    def estimate(self, multipliers):
        model = self.setup.model if self.distilled else self.composed(multipliers)
        return self._kl_to_concepts(model)

    def project(self, mu):
        s = float(mu.sum())
        return mu * (self.max_sum / s) if s > self.max_sum else mu

    def baseline_multipliers(self, value):
        v = super().baseline_multipliers(value)
        if float(v.sum()) >= 1.0:
            raise ConfigError(f"method.multiplier: fixed RU multipliers must sum to < 1 "
                              f"(got sum {float(v.sum()):.4g} over {len(v)} concepts)")
        return v

    def final_model(self, multipliers):
        return self.setup.model if self.distilled else self.composed(multipliers)

    def finalize(self, multipliers):
        steps = int(self.cfg.get("distill_steps", 0))
        if steps <= 0:
            return {}
        target = self.composed(multipliers)
        model = self.setup.model
        opt = self.primal_optimizer(model.trainable_parameters(), float(self.cfg.primal_lr))
        n = int(self.cfg.primal_batch_size)
        last = None
        for _ in progress(range(steps), desc="distil RU target", enabled=self.show_progress):
            traj = self.sampler.sample(model, n, self.gen, cond=self.setup.cond, record=True)
            loss = trajectory_kl(model, target, self.sampler, traj, cond=self.setup.cond,
                                 num_steps=self.cfg.get("grad_timesteps"), generator=self.gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
        self.distilled = True
        return {"distill_kl": last}
