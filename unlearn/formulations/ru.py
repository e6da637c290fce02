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

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..estimators import pathwise_kl, trajectory_kl
from ..models.base import ComposedScore
from ..utils import progress
from .base import Formulation


@dataclass
class Pool:
    """Samples ``x`` of the target at ``c0`` (normalised log-weights ``base``; ``log Z(c0) = log_z0``)
    with their log-ratios ``llr``. The target at ``c`` is ``p_pre exp(-c . tilt) / Z(c)``, so over the
    pool its weights are ``base - (c - c0) . tilt`` and ``log Z(c) = log_z0 + logsumexp`` of those.
    A pool of pretrained samples has ``c0 = 0``, uniform weights and ``log_z0 = 0``."""

    x: torch.Tensor
    llr: torch.Tensor
    base: torch.Tensor
    c0: torch.Tensor
    log_z0: float

    @classmethod
    def pretrained(cls, x: torch.Tensor, llr: torch.Tensor) -> "Pool":
        n = len(x)
        return cls(x=x, llr=llr, base=torch.full((n,), -math.log(n), dtype=torch.float64),
                   c0=torch.zeros(llr.shape[1], dtype=torch.float64), log_z0=0.0)

    def __len__(self) -> int:
        return len(self.x)

    def weights(self, c: torch.Tensor, tilt: torch.Tensor):
        """``(log w, w, log Z(c))``: self-normalised (log-)weights at ``c``; differentiable in ``c``."""
        logw = self.base - (tilt * (c - self.c0)[None]).sum(1)
        lse = torch.logsumexp(logw, 0)
        return logw - lse, torch.softmax(logw, 0), self.log_z0 + lse

    def state_dict(self) -> dict:
        return {"x": self.x.detach().cpu(), "llr": self.llr, "base": self.base, "c0": self.c0, "log_z0": self.log_z0}


class ReverseKLUnlearning(Formulation):
    name = "ru"
    needs = frozenset({"concepts"})  # what the model family builds for it (unlearn.families.NEEDS)
    sense = "ge"
    has_primal = False
    has_esd_target = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if not self.setup.concepts:
            raise ConfigError("formulation=ru needs a model of each unlearning concept (model.unlearn)")
        self.max_sum = float(self.cfg.max_multiplier_sum)
        if not 0 < self.max_sum < 1:
            raise ConfigError(f"formulation.max_multiplier_sum must be in (0, 1) (got {self.max_sum})")
        self.distilled = False
        self.estimator = str(self.cfg.kl_estimator)
        self.final_mode = str(self.cfg.final_samples)
        if self.setup.model.condition_tables() and (self.estimator == "ratio" or self.final_mode == "resample"):
            raise ConfigError(f"formulation.kl_estimator={self.estimator} / final_samples={self.final_mode}: a pool "
                              f"of pretrained samples keeps no prompt per sample, so a retain distribution needs "
                              f"formulation.kl_estimator=path and formulation.final_samples=composed")
        cap = self.cfg.separation_cap
        self.cap = None if cap is None else float(cap)
        self._pool = self._pre_pool = None
        self.refreshes, self.refresh_log = 0, []

    @classmethod
    def check_config(cls, cfg, method=None):
        super().check_config(cfg, method)
        if cfg.formulation.thresholds is None and float(cfg.formulation.threshold_factor) <= 1.0:
            raise ConfigError(f"formulation.threshold_factor must be > 1 for formulation={cls.name} (the constraint "
                              f"is KL(p || q_i) >= factor x the mean pretrained KL: the separation from the concepts "
                              f"must grow, a factor <= 1 is met on average by the pretrained model itself; "
                              f"got {cfg.formulation.threshold_factor})")
        ref = str(cfg.formulation.threshold_reference)
        if ref not in cls.REFERENCES:
            raise ConfigError(f"formulation.threshold_reference must be one of {list(cls.REFERENCES)} (got {ref!r})")
        est, fin = str(cfg.formulation.kl_estimator), str(cfg.formulation.final_samples)
        if est not in cls.ESTIMATORS:
            raise ConfigError(f"formulation.kl_estimator must be one of {list(cls.ESTIMATORS)} (got {est!r})")
        if fin not in cls.FINALS:
            raise ConfigError(f"formulation.final_samples must be one of {list(cls.FINALS)} (got {fin!r})")
        cap = cfg.formulation.separation_cap
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ConfigError(f"formulation.separation_cap must be null (the paper's KL) or a number > 0 "
                                  f"(nats; got {cap!r})")
            if est != "ratio" or fin != "resample" or int(cfg.formulation.distill_steps or 0) > 0:
                raise ConfigError("formulation.separation_cap needs formulation.kl_estimator=ratio, "
                                  "formulation.final_samples=resample and formulation.distill_steps=0 (the composed "
                                  f"score samples the uncapped target; got kl_estimator={est}, final_samples={fin}, "
                                  f"distill_steps={cfg.formulation.distill_steps})")

    @classmethod
    def constraint_count(cls, cfg):
        """One constraint per concept: as many as the model family's config lists (None: not known
        before the model is built)."""
        from ..families.base import family_class

        return family_class(cfg.model.family).concept_count(cfg.model)

    @classmethod
    def check_multipliers(cls, values, count):
        """Fixed RU multipliers must sum to < 1 (the composed target is proper only then)."""
        total = float(values.double().sum())
        if total >= 1.0:
            n = count if count is not None else len(values)
            raise ConfigError(f"method.multiplier: fixed RU multipliers must sum to < 1 (got sum {total:.4g} over "
                              f"{n} concept(s)); accepted: values in [0, 1) whose sum is < 1")

    @classmethod
    def esd_multipliers(cls, eta):
        """The ESD target ``p_pre prod_i (q_i / p_pre)^-eta_i`` is RU's at ``mu = eta / (1 + sum eta)``."""
        eta = torch.as_tensor(eta, dtype=torch.float64)
        return eta / (1 + eta.sum())

    ESTIMATORS = ("path", "ratio")
    REFERENCES = ("mean", "each")
    FINALS = ("composed", "resample")

    def constraint_names(self):
        if self.cap is not None:
            return [f"KL_cap{self.cap:g}(p||q[{n}])" for n in self.setup.concept_names]
        return [f"KL(p||q[{n}])" for n in self.setup.concept_names]

    # -- the importance-weighted (ratio) estimator -----------------------------------------------
    def _log_ratios(self, x: torch.Tensor) -> torch.Tensor:
        """``llr_j(x) = log q_j(x) - log p_pre(x)`` (Lemma 2), shape (N, m), float64."""
        from ..estimators import log_likelihood_ratio

        with torch.no_grad():
            llr = log_likelihood_ratio(x, self.setup.concepts, self.setup.pretrained,
                                       num_timesteps=int(self.cfg.likelihood_timesteps),
                                       generator=self.gen, cond_q=self.setup.concept_conds or None,
                                       cond_p=self.setup.cond)
        return llr.double()

    def pool(self) -> Pool:
        """The samples the ratio estimates weight: first ``pool_size`` pretrained samples with their
        log-ratios (drawn once); after a re-centring (:meth:`recenter`), SMC samples of the target."""
        if self._pool is None:
            n = int(self.cfg.pool_size)
            x = self.sampler.sample(self.setup.pretrained, n, self.gen, cond=self.setup.cond).x0
            self._pool = self._pre_pool = Pool.pretrained(x, self._log_ratios(x))
        return self._pool

    def _coef(self, mu: torch.Tensor) -> torch.Tensor:
        """``c = mu / (1 - mu_bar)``: the target is ``p_pre exp(-sum_j c_j llr_j) / Z``."""
        mu = torch.as_tensor(mu).double()
        return mu / (1 - mu.sum())

    def _tilt(self, pool: Pool) -> torch.Tensor:
        """The pool's log-ratios the target tilts by: floored at ``-separation_cap`` when capped."""
        return pool.llr if self.cap is None else pool.llr.clamp(min=-self.cap)

    def _weights(self, mu, pool: Pool | None = None):
        """Self-normalised log-weights and weights of the pool at ``mu``, and ``log Z(mu)``."""
        pool = pool or self.pool()
        return pool.weights(self._coef(mu), self._tilt(pool))

    def _ratio_kl(self, mu: torch.Tensor, llr: torch.Tensor | None = None) -> torch.Tensor:
        """``KL(p_rev || p_pre) - E_rev[llr_i]`` at the target of ``mu``: ``KL(p_rev || q_i)`` with the raw
        log-ratios, the capped separation with the floored ones (the default: what the constraints use)."""
        return self._ratio_kl_t(torch.as_tensor(mu).detach(), llr).float()

    def effective_sample_size(self, mu) -> float:
        return float(1.0 / (self._weights(mu)[1] ** 2).sum())

    def _ratio_active(self) -> bool:
        return self.estimator == "ratio" and not self.distilled

    def min_ess(self) -> float:
        """The smallest effective sample size of the pool's weights at which the ratio estimates are
        trusted (``formulation.min_ess`` times the pool size)."""
        return float(self.cfg.min_ess) * len(self.pool())

    def value_jacobian(self, multipliers):
        """Exact on the pool: the ratio estimates are smooth functions of ``mu`` (autograd)."""
        if not self._ratio_active():
            return None
        mu = torch.as_tensor(multipliers, dtype=torch.float64).detach()
        return torch.autograd.functional.jacobian(lambda m: self._ratio_kl_t(m), mu)

    def _ratio_kl_t(self, mu: torch.Tensor, llr: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable in ``mu``: ``E_mu[-c . tilt - llr_i] - log Z(mu)`` over the pool."""
        pool = self.pool()
        tilt = self._tilt(pool)
        llr = tilt if llr is None else llr
        c = self._coef(mu)
        _, w, log_z = pool.weights(c, tilt)
        return (w[:, None] * (-(tilt * c[None]).sum(1, keepdim=True) - llr)).sum(0) - log_z

    def can_recenter(self, final: bool = False) -> bool:
        return (self.cap is None and str(self.cfg.pool_refresh) == "smc" and self._ratio_active()
                and (final or self.refreshes < int(self.cfg.max_pool_refreshes)))

    def final_estimate(self, multipliers):
        """The delivered target's values, from a pool re-centred on it where the last one's weights have spread."""
        self.recenter(multipliers, final=True)
        return self.estimate(multipliers)

    def recenter(self, multipliers, final: bool = False) -> bool:
        """Re-centre the pool on the target of ``multipliers`` once its weights there have spread
        (effective sample size below ``recenter_below`` of the pool): ``pool_refresh: smc`` draws
        ``pool_size`` weighted samples of ``p_pre^{1+c} prod q_i^{-c_i}`` by sequential Monte Carlo along
        the sampler (:func:`~unlearn.smc.product_smc`, which also estimates ``log Z``) and computes their
        log-ratios; later estimates weight that pool. Only the paper's (uncapped) target is such a
        product. A draw whose own weights are degenerate is discarded. Returns whether the pool moved."""
        if self._pool is None or not self.can_recenter(final):
            return False
        mu = torch.as_tensor(multipliers).double()
        if self.effective_sample_size(mu) >= float(self.cfg.recenter_below) * len(self._pool):
            return False
        from ..smc import product_smc

        c = self._coef(mu)
        models = [self.setup.pretrained, *self.setup.concepts]
        conds = [self.setup.cond, *(self.setup.concept_conds or [self.setup.cond] * len(c))]
        r = product_smc(self.sampler, models, [1 + float(c.sum()), *(-c).tolist()], len(self._pool), self.gen,
                        conds=conds)
        self.refreshes += 1
        entry = {"multipliers": [round(float(v), 5) for v in mu], "smc_ess": round(r.ess, 1),
                 "smc_resamples": r.resamples, "log_z": round(r.log_z, 4)}
        if r.ess < self.min_ess():
            self.refresh_log.append({**entry, "kept": False})
            return False
        self._pool = Pool(x=r.x, llr=self._log_ratios(r.x), base=r.log_w, c0=c.clone(), log_z0=r.log_z)
        self.refresh_log.append({**entry, "kept": True})
        return True

    def trusted(self, multipliers) -> bool:
        if not self._ratio_active():
            return True
        return self.effective_sample_size(torch.as_tensor(multipliers)) >= self.min_ess()

    def step_diagnostics(self, multipliers):
        if self._pool is None:
            return {}
        return {"ess": round(self.effective_sample_size(torch.as_tensor(multipliers)), 1), "pool": self.refreshes}

    def support_ess(self, multipliers) -> float:
        """Effective sample size of the *pretrained* pool's weights at ``multipliers``: how much of the
        pretrained model's own samples the target still covers."""
        self.pool()
        return float(1.0 / (self._weights(multipliers, self._pre_pool)[1] ** 2).sum())

    def reliability(self, multipliers):
        """Two failures, each with its reason: the pool's weights are degenerate at the final multipliers
        (the estimates do not hold there), or -- even where SMC re-centred the pool -- the target lies
        where the pretrained model has almost no samples. There the denoisers' scores are extrapolations
        and, for concept models narrower than the pretrained model in some direction, the paper's target
        ``p_pre^{1+c} q^{-c}`` may not be normalisable at all (tails ``exp(-|x|^2 ((1+c)/s_p^2 - c/s_q^2)/2)``);
        the capped separation bounds the weights and keeps the target on the pretrained support."""
        if self._pool is None or not self._ratio_active():
            return None
        mu = torch.as_tensor(multipliers)
        floor = self.min_ess()
        ess = self.effective_sample_size(mu)
        if ess < floor:
            return (f"importance weights are degenerate at the final multipliers (effective sample size {ess:.1f} < "
                    f"formulation.min_ess x pool = {floor:.0f}): the ratio estimates and resampled samples do not "
                    f"hold there; raise formulation.pool_size, set formulation.separation_cap, or lower "
                    f"formulation.threshold_factor")
        support = self.support_ess(mu)
        if self.cap is None and support < floor:
            return (f"the target lies where the pretrained model has almost no samples (pretrained-pool effective "
                    f"sample size {support:.1f} < formulation.min_ess x pool = {floor:.0f}): the denoisers' scores "
                    f"there are extrapolations and the uncapped target may not exist; set formulation.separation_cap "
                    f"(bounded weights) or lower formulation.threshold_factor")
        return None

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

    def factor_thresholds(self, pretrained):
        """The paper's: ``threshold_factor`` times the mean pretrained-to-concept KL, one value for every
        concept; ``threshold_reference: each``: times each concept's own pretrained KL."""
        return factored(pretrained, self.factor, str(self.cfg.threshold_reference))

    def estimate(self, multipliers):
        if self.estimator == "ratio" and not self.distilled:
            return self._ratio_kl(multipliers)
        model = self.setup.model if self.distilled else self.composed(multipliers)
        return self._kl_to_concepts(model)

    def diagnostics(self, multipliers):
        if self._pool is None:
            return {}
        ess = self.effective_sample_size(multipliers)
        out = {"pool_size": len(self._pool), "effective_sample_size": round(ess, 1),
               "pretrained_support_ess": round(self.support_ess(multipliers), 1)}
        if self.refreshes:
            out["pool_refreshes"] = self.refresh_log
        if self.final_mode == "resample" and not self.distilled:
            out["kl_to_pretrained_estimator"] = "importance-weighted over the pool: E_rev[log w] - log E_pre[w]"
        if self.cap is not None:  # the paper's KL(p || q_i) at the capped target, for comparison
            out["kl_to_concepts"] = [round(float(v), 4) for v in self._ratio_kl(multipliers, self._pool.llr)]
        out["min_ess"] = round(self.min_ess(), 1)
        return out

    def final_metrics(self, multipliers) -> dict:
        """With resampled final samples the composed score is not what they show: report
        ``KL(p_rev || p_pre) = E_rev[-c . tilt] - log Z`` over the pool instead of its pathwise KL."""
        if self.final_mode != "resample" or self.distilled:
            return {}
        pool = self.pool()
        c = self._coef(multipliers)
        _, w, log_z = pool.weights(c, self._tilt(pool))
        return {"kl_to_pretrained": float((w * -(self._tilt(pool) * c[None]).sum(1)).sum() - log_z)}

    def _resample(self, pool: Pool, multipliers, n: int, generator) -> torch.Tensor:
        from ..smc import systematic_resample

        logw = self._weights(multipliers, pool)[0]
        idx = systematic_resample(logw, n, generator)
        return pool.x[idx[torch.randperm(n, generator=generator)].to(pool.x.device)]

    def final_samples(self, multipliers, n: int, generator) -> torch.Tensor | None:
        """Systematic resampling of the pool: ``n`` evenly spaced quantiles of the weights' CDF from one
        uniform offset, then one random permutation. Each pool sample appears ``floor`` or ``ceil`` of
        ``n w_j`` times, so the samples follow the weighted pool almost exactly (multinomial resampling
        adds a sampling error of about ``sqrt(share / n)`` to every class share). With the same generator
        state :meth:`pretrained_samples` draws the same quantiles at uniform weights: pretrained and
        unlearned samples are paired, like two samplers started from the same noise (while the pool is
        the pretrained one; a re-centred pool holds other samples)."""
        if self.final_mode != "resample" or self.distilled:
            return None
        return self._resample(self.pool(), multipliers, n, generator)

    def pretrained_samples(self, n: int, generator) -> torch.Tensor | None:
        """The pretrained pool itself at uniform weights, resampled like :meth:`final_samples`."""
        if self.final_mode != "resample" or self.distilled:
            return None
        self.pool()
        return self._resample(self._pre_pool, torch.zeros(self.num_constraints), n, generator)

    def project(self, mu):
        s = float(mu.sum())
        return mu * (self.max_sum / s) if s > self.max_sum else mu

    def final_model(self, multipliers):
        return self.setup.model if self.distilled else self.composed(multipliers)

    def finalize(self, multipliers):
        from ..optim import lr_schedule

        steps = int(self.cfg.distill_steps)
        if steps <= 0:
            return {}
        target = self.composed(multipliers)
        model = self.setup.model
        opt = self.primal_optimizer(model.trainable_parameters(), float(self.cfg.primal_lr))
        sched = lr_schedule(opt, self.cfg, steps)
        n = int(self.cfg.primal_batch_size)
        last = None
        for _ in progress(range(steps), desc="distil RU target", enabled=self.show_progress):
            traj = self.sampler.sample(model, n, self.gen, cond=self.setup.cond, record=True)
            loss = trajectory_kl(model, target, self.sampler, traj, cond=self.setup.cond,
                                 num_steps=self.cfg.grad_timesteps, generator=self.gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            last = loss.item()
        self.distilled = True
        return {"distill_kl": last, **self.distillation_gap(target)}

    @torch.no_grad()
    def distillation_gap(self, target) -> dict:
        """What distillation cost: the path KL from the distilled model to the composed target it
        stands for, on ``batch_size`` fresh trajectories of the distilled model (mean and standard
        error), beside the target's own path KL to the pretrained model for scale."""
        n = int(self.cfg.batch_size)
        kl = pathwise_kl(self.setup.model, [target, self.setup.pretrained], self.sampler, n, self.gen,
                         cond=self.setup.cond).double()
        se = kl.std(0) / n ** 0.5 if n > 1 else torch.zeros(2)
        return {"distilled_kl_to_target": float(kl[:, 0].mean()), "distilled_kl_to_target_stderr": float(se[0]),
                "distilled_kl_to_pretrained": float(kl[:, 1].mean())}

    # -- the exact side ---------------------------------------------------------------------------
    @classmethod
    def oracle_options(cls, cfg):
        return {"ru_cap": cfg.separation_cap}

    @classmethod
    def oracle_log_target(cls, oracle, multipliers, grid=None):
        return oracle.ru_target(multipliers, grid)

    @classmethod
    def oracle_grid(cls, oracle, multipliers):
        return oracle.ru_grid(multipliers)

    @classmethod
    def oracle_values(cls, oracle, multipliers):
        return oracle.ru_values(multipliers)

    @classmethod
    def oracle_thresholds(cls, oracle, factor, reference: str = "mean"):
        """The exact thresholds by the run's own rule (:meth:`factor_thresholds`): ``factor`` times the
        mean pretrained KL (shared), or (``reference="each"``) times each concept's own."""
        return factored(cls.oracle_pretrained_values(oracle), factor, reference)

    @classmethod
    def oracle_dual(cls, oracle, multipliers, thresholds):
        return oracle.ru_dual(multipliers, thresholds)

    @classmethod
    def oracle_multipliers(cls, oracle, thresholds):
        return oracle.solve_dual(oracle.ru_dual, thresholds, oracle.ru_upper_bounds(), max_sum=0.98, name=cls.name)


def factored(pretrained, factor: float, reference: str):
    """``factor`` times the pretrained values (``each``) or times their mean, shared (``mean``); a
    tensor or an array in, the same out."""
    return factor * pretrained if reference == "each" else pretrained * 0 + factor * float(pretrained.mean())
