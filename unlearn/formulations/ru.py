"""RU: reverse-KL constraints (concept unlearning), dual-only algorithm (formulas.md, RU).

For fixed multipliers the Lagrangian minimiser is known in closed form, so the primal step is
skipped and each dual step only estimates ``KL(p_rev || q_i)`` and moves ``mu``. Two estimators:

* ``kl_estimator: path`` (the paper's): sample the composed score
  ``eps_rev = (eps_pre - sum_i mu_i eps_i) / (1 - mu_bar)`` and estimate the pathwise KL to each
  ``q_i`` along those trajectories (Lemma 3). Composing noisy scores does not sample the
  Corollary-1 target exactly (it moves modes but hardly reweights them; see README), so the
  multipliers it finds differ from the exact optimum.
* ``kl_estimator: ratio``: the Corollary-1 target is ``p_rev = p_pre w / Z`` with
  ``w = exp(-sum_j mu_j llr_j / (1 - mu_bar))``, ``llr_j = log q_j - log p_pre`` (Lemma 2). Over a
  fixed pool of pretrained samples (log-ratios computed once) the KLs follow by self-normalised
  importance weighting: ``KL(p_rev || q_i) = E_rev[-sum_j c_j llr_j - llr_i] - log E_pre[w]``.

Capped separation (``separation_cap: C``, not in the paper; needs the ratio estimator and
resampled final samples): each constraint becomes ``KL(p || p_pre) + E_p[min(log p_pre/q_i, C)]
>= b``, i.e. ``llr_i`` floored at ``-C`` everywhere above. A sample counts as separated from
concept ``i`` once ``q_i/p_pre <= e^-C``; separating it further earns nothing, so the target
``p_pre exp(-sum_j c_j max(llr_j, -C))`` is flat on everything already far from every concept
instead of favouring what the concept models find *least* like a concept (see README, digits).
``C = None`` is the paper's ``KL(p || q_i)``.

Final samples: ``final_samples: composed`` (the composed-score sampler, or the distilled model)
or ``resample`` (importance resampling of the pool with ``w``: samples of ``p_rev`` itself).
Optionally the final composed model is distilled into the weights (``distill_steps``).
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
        self.estimator = str(self.cfg.get("kl_estimator", "path"))
        self.final_mode = str(self.cfg.get("final_samples", "composed"))
        cap = self.cfg.get("separation_cap")
        self.cap = None if cap is None else float(cap)
        self._pool = None

    @classmethod
    def check_config(cls, cfg, fixed):
        super().check_config(cfg, fixed)
        est, fin = str(cfg.formulation.get("kl_estimator", "path")), str(cfg.formulation.get("final_samples", "composed"))
        if est not in cls.ESTIMATORS:
            raise ConfigError(f"formulation.kl_estimator must be one of {list(cls.ESTIMATORS)} (got {est!r})")
        if fin not in cls.FINALS:
            raise ConfigError(f"formulation.final_samples must be one of {list(cls.FINALS)} (got {fin!r})")
        if fixed:
            vals = cls.fixed_multiplier_values(cfg)
            m = len(cfg.model.unlearn) if cfg.model.get("unlearn") is not None else 1
            total = sum(vals) if len(vals) > 1 else vals[0] * m  # one number applies to every concept
            if total >= 1.0:
                raise ConfigError(f"method.multiplier: fixed RU multipliers must sum to < 1 (got {total:.4g} "
                                  f"for {m} concept(s)); accepted: values in [0, 1) whose sum is < 1")
        cap = cfg.formulation.get("separation_cap")
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ConfigError(f"formulation.separation_cap must be null (the paper's KL) or a number > 0 "
                                  f"(nats; got {cap!r})")
            if est != "ratio" or fin != "resample" or int(cfg.formulation.get("distill_steps", 0) or 0) > 0:
                raise ConfigError("formulation.separation_cap needs formulation.kl_estimator=ratio, "
                                  "formulation.final_samples=resample and formulation.distill_steps=0 (the composed "
                                  f"score samples the uncapped target; got kl_estimator={est}, final_samples={fin}, "
                                  f"distill_steps={cfg.formulation.get('distill_steps', 0)})")

    ESTIMATORS = ("path", "ratio")
    FINALS = ("composed", "resample")

    def constraint_names(self):
        if self.cap is not None:
            return [f"KL_cap{self.cap:g}(p||q[{n}])" for n in self.setup.concept_names]
        return [f"KL(p||q[{n}])" for n in self.setup.concept_names]

    # -- the importance-weighted (ratio) estimator -----------------------------------------------
    def pool(self):
        """Pretrained samples and their log-ratios ``llr_j = log q_j - log p_pre`` (computed once)."""
        if self._pool is None:
            from ..estimators import log_likelihood_ratio

            n = int(self.cfg.get("pool_size", 4096))
            x = self.sampler.sample(self.setup.pretrained, n, self.gen, cond=self.setup.cond).x0
            with torch.no_grad():
                llr = log_likelihood_ratio(x, self.setup.concepts, self.setup.pretrained,
                                           num_timesteps=int(self.cfg.get("likelihood_timesteps", 32)),
                                           generator=self.gen, cond_q=self.setup.concept_conds or None,
                                           cond_p=self.setup.cond)
            self._pool = (x, llr.double())
        return self._pool

    def _pool_llr(self) -> torch.Tensor:
        """The pool's log-ratios the constraints use: floored at ``-separation_cap`` when capped."""
        _, llr = self.pool()
        return llr if self.cap is None else llr.clamp(min=-self.cap)

    def _log_weights(self, mu: torch.Tensor) -> torch.Tensor:
        c = mu.double() / (1 - float(mu.sum()))
        return -(self._pool_llr() * c[None]).sum(1)

    def _ratio_kl(self, mu: torch.Tensor, llr: torch.Tensor | None = None) -> torch.Tensor:
        """``KL(p_rev || p_pre) - E_rev[llr_i]`` at the target of ``mu``: ``KL(p_rev || q_i)`` with the raw
        log-ratios, the capped separation with the floored ones (the default: what the constraints use)."""
        llr = self._pool_llr() if llr is None else llr
        logw, w, log_z = self._weights(mu)
        return ((w[:, None] * (logw[:, None] - llr)).sum(0) - log_z).float()

    def _weights(self, mu):
        """Log-weights, self-normalised weights and ``log E_pre[w]`` of the pool at ``mu``."""
        logw = self._log_weights(torch.as_tensor(mu))
        log_z = torch.logsumexp(logw, 0) - torch.log(torch.tensor(float(len(logw)), dtype=torch.float64))
        return logw, torch.softmax(logw, 0), log_z

    def effective_sample_size(self, mu) -> float:
        return float(1.0 / (self._weights(mu)[1] ** 2).sum())

    def composed(self, mu: torch.Tensor) -> ComposedScore:
        return ComposedScore.reverse_kl(self.setup.pretrained, self.setup.concepts, mu)

    def _kl_to_concepts(self, model) -> torch.Tensor:
        """Pathwise KL(P_model || P_{q_i}) along the model's own trajectories."""
        kl = pathwise_kl(model, self.setup.concepts, self.sampler, int(self.cfg.batch_size), self.gen,
                         cond=self.setup.cond, ref_conds=self.setup.concept_conds or None)
        return kl.mean(0)

    def pretrained_values(self):
        if self.estimator == "ratio":
            return self._ratio_kl(torch.zeros(len(self.setup.concepts)))
        return self._kl_to_concepts(self.setup.pretrained)

    def thresholds(self, pretrained):
        # paper: a shared factor on the average pretrained-to-concept KL
        return torch.full_like(pretrained, self.factor * float(pretrained.mean()))

    def estimate(self, multipliers):
        if self.estimator == "ratio" and not self.distilled:
            return self._ratio_kl(multipliers)
        model = self.setup.model if self.distilled else self.composed(multipliers)
        return self._kl_to_concepts(model)

    def diagnostics(self, multipliers):
        if self._pool is None:
            return {}
        ess = self.effective_sample_size(multipliers)
        out = {"pool_size": len(self._pool[0]), "effective_sample_size": round(ess, 1)}
        if self.final_mode == "resample" and not self.distilled:
            out["kl_to_pretrained_estimator"] = "importance-weighted over the pool: E_rev[log w] - log E_pre[w]"
        if self.cap is not None:  # the paper's KL(p || q_i) at the capped target, for comparison
            out["kl_to_concepts"] = [round(float(v), 4) for v in self._ratio_kl(multipliers, self._pool[1])]
        if ess < 0.05 * len(self._pool[0]):
            out["warning"] = ("importance weights are degenerate (ESS < 5% of the pool): the ratio estimates and "
                              "resampled samples are unreliable; raise formulation.pool_size or use kl_estimator=path")
        return out

    def final_metrics(self, multipliers) -> dict:
        """With resampled final samples the composed score is not what they show: report
        ``KL(p_rev || p_pre) = E_rev[log w] - log E_pre[w]`` over the pool instead of its pathwise KL."""
        if self.final_mode != "resample" or self.distilled:
            return {}
        logw, w, log_z = self._weights(multipliers)
        return {"kl_to_pretrained": float((w * logw).sum() - log_z)}

    def final_samples(self, multipliers, n: int, generator) -> torch.Tensor | None:
        """Systematic resampling of the pool: ``n`` evenly spaced quantiles of the weights' CDF from one
        uniform offset, then one random permutation. Each pool sample appears ``floor`` or ``ceil`` of
        ``n w_j`` times, so the samples follow the weighted pool almost exactly (multinomial resampling
        adds a sampling error of about ``sqrt(share / n)`` to every class share). With the same generator
        state :meth:`pretrained_samples` draws the same quantiles at uniform weights: pretrained and
        unlearned samples are paired, like two samplers started from the same noise."""
        if self.final_mode != "resample" or self.distilled:
            return None
        x, _ = self.pool()
        w = self._weights(multipliers)[1]
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
        cdf = torch.cumsum(w, 0)
        idx = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=len(w) - 1)
        return x[idx[torch.randperm(n, generator=generator)]]

    def pretrained_samples(self, n: int, generator) -> torch.Tensor | None:
        """The pool itself at uniform weights, resampled like :meth:`final_samples` (paired with it)."""
        return self.final_samples(torch.zeros(self.num_constraints), n, generator)

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
