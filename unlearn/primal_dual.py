"""The primal-dual driver shared by every formulation."""
from __future__ import annotations

import time

import torch

from .distributed import get_dist
from .dual import Multipliers
from .formulations.base import Formulation
from .utils import progress


class PrimalDual:
    """``for each dual step: K primal steps on the Lagrangian; estimate constraints; move mu``."""

    def __init__(self, formulation: Formulation, multipliers: Multipliers, dual_steps: int, primal_steps_per_dual: int,
                 logger=None, show_progress: bool = True, log_every: int = 1, on_step=None):
        self.f, self.mu = formulation, multipliers
        self.dual_steps, self.k = int(dual_steps), int(primal_steps_per_dual)
        self.logger, self.show, self.log_every = logger, show_progress, max(1, int(log_every))
        self.history: list[dict] = []
        self.on_step = on_step  # on_step(step, model) -> dict of evaluation numbers (or None), logged with the step

    def _record(self, step, losses, values, thresholds, mu, elapsed, evaluation=None):
        names = self.f.constraint_names()
        rec = {
            "losses": losses,
            "constraints": {n: {"value": float(v), "threshold": float(b)} for n, v, b in zip(names, values, thresholds)},
            "multipliers": {n: float(m) for n, m in zip(names, mu)},
            "time_s": round(elapsed, 3),
        }
        if evaluation:
            rec["eval"] = evaluation
        self.history.append({"step": step, **rec})
        if self.logger is not None and (step % self.log_every == 0 or step == self.dual_steps):
            self.logger.log(step, rec)

    def run(self):
        t0 = time.time()
        dist = get_dist()  # constraint estimates are averaged over data-parallel ranks
        pre = dist.mean(self.f.pretrained_values())
        thr = self.f.thresholds(pre)
        self.pretrained_values, self.threshold_values = pre, thr
        bar = progress(range(1, self.dual_steps + 1), desc=f"{self.f.name.upper()} primal-dual", enabled=self.show)
        values = pre
        for step in bar:
            mu = self.mu.value()
            losses: dict = {}
            if self.f.has_primal:
                for _ in range(self.k):
                    losses = self.f.primal_step(mu)
            values = dist.mean(self.f.estimate(mu))
            self.mu.update(self.f.violation(values, thr))
            evaluation = self.on_step(step, self.f.final_model(self.mu.value())) if self.on_step else None
            self._record(step, losses, values, thr, mu, time.time() - t0, evaluation)
            bar.set_postfix(c=", ".join(f"{float(v):.3g}/{float(b):.3g}" for v, b in zip(values, thr)),
                            mu=", ".join(f"{float(m):.3g}" for m in self.mu.value()), refresh=False)
        final_mu = self.mu.value()
        extra = self.f.finalize(final_mu)
        if extra:
            values = dist.mean(self.f.estimate(final_mu))
        self.final_values = values
        return final_mu, values, thr, extra
