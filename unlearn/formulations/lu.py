"""LU: likelihood constraints (formulas.md, LU).

``min KL(p || p_pre)  s.t.  E_p[l_i] <= b_i`` with ``l_i = q_i / p_pre`` estimated from
denoising errors (Lemma 2). The primal step minimises
``E_p[sum_i lam_i l_i(x_0)] + KL(p || p_pre)``: the reward term by a DPOK-style policy gradient
with a batch-mean baseline (``gradient: policy``) or by back-propagation through the sampler
(``gradient: reparam``); the KL term is the pathwise KL along the model's own trajectories.
Under a method that distils a fixed target (``method=esd``, LU's paper baseline ``method=baseline``)
the primal step instead distils the ESD-style concept-erasing target ``eps_pre + eta (eps_pre - eps_q)``
(= RU with ``mu = eta / (1 + eta)``).
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..estimators import _sqnorm, denoising_loss, log_likelihood_ratio, timestep_proposal, trajectory_kl
from ..models.base import ComposedScore, restore_conditions
from ..samplers import Trajectory
from .base import Formulation, OracleTarget, PrimalLoss
from .ru import ReverseKLUnlearning


class LikelihoodUnlearning(Formulation):
    name = "lu"
    needs = frozenset({"concepts"})  # what the model family builds for it (unlearn.families.NEEDS)
    sense = "le"
    paper_baseline = "esd"  # the paper's LU baseline distils the ESD-style target
    has_esd_target = True
    exact_constraint_metric = "expected_likelihood"
    GRADIENTS = ("policy", "reparam", "weighted")
    MIN_CURVATURE_SAMPLES = 32  # samples an estimate needs before its covariance sets the Newton dual step
    LIKELIHOODS = ("estimator", "exact")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if not self.setup.concepts:
            raise ConfigError("formulation=lu needs a model of each unlearning concept (model.unlearn)")
        self._check_choices(self.cfg)
        self.gradient = str(self.cfg.gradient)
        self.likelihood_mode = str(self.cfg.likelihood)
        if self.likelihood_mode == "exact" and self.setup.oracle is None:
            raise ConfigError("formulation.likelihood=exact needs a model with an exact oracle (model=gmm, dim <= 2)")
        self.kl_weight = float(self.cfg.kl_weight)
        gs = self.cfg.grad_timesteps
        self.grad_steps = int(gs) if gs else None  # sampler steps per primal gradient (None: all)
        # policy gradient: also pass the path KL through the score-function term (its dependence on
        # the visited states), not only its direct gradient as DPOK does
        self.full_kl_gradient = bool(self.cfg.full_kl_gradient)
        self.anchor = bool(self.cfg.weighted_anchor)  # gradient=weighted: see _weighted_loss
        self.correction_min_t = int(self.cfg.weighted_correction_min_t or 0)
        self._pool = None  # gradient=weighted: pretrained samples and their likelihoods, drawn once
        self._pool_conditions: list = []  # the pool samples' prompts where the retain set is a distribution
        self._pool_groups: list = []  # per table, each pool sample's pretrained reference (reference_ids)
        self.pool_refined = 0  # how many pool samples got the refined likelihood estimate
        self._proposal = None  # the likelihood estimator's timestep proposal, fitted once (likelihood_pilot)
        self._esd_buffer: list = []  # target distillation: trajectories drawn ahead (esd_refresh_every)
        self.opt = self.primal_optimizer(self.setup.model.trainable_parameters(), float(self.cfg.primal_lr),
                                         float(self.cfg.weight_decay))
        self.schedule_primal()
        self.adversary = Adversary(self.cfg.robust, self.setup, self.gen) if int(self.cfg.robust.steps) > 0 else None

    @classmethod
    def check_config(cls, cfg, method=None):
        super().check_config(cfg, method)
        f = cfg.formulation
        if f.thresholds is None and float(f.threshold_factor) >= 1.0:
            raise ConfigError(f"formulation.threshold_factor must be < 1 for formulation={cls.name} (the constraint "
                              f"is E_p[l_i] <= factor x its pretrained value: a factor >= 1 is met by the pretrained "
                              f"model itself and nothing is unlearned; got {f.threshold_factor})")
        cls._check_choices(f)
        reuse = int(f.esd_refresh_every)
        distils = bool(getattr(method, "target_distillation", False))
        if distils and int(f.primal_steps_per_dual) % reuse:  # only the ESD-style primal uses it
            raise ConfigError(f"formulation.esd_refresh_every ({reuse}) must divide formulation.primal_steps_per_dual "
                              f"({f.primal_steps_per_dual}) for method={method.label}: each dual step starts with "
                              f"fresh trajectories")

    @classmethod
    def esd_multipliers(cls, eta):
        """LU's multipliers of the ESD-style target are its strengths ``eta`` (:meth:`esd_target`)."""
        return torch.as_tensor(eta)

    @classmethod
    def _check_choices(cls, f):
        if str(f.gradient) not in cls.GRADIENTS:
            raise ConfigError(f"formulation.gradient must be one of {list(cls.GRADIENTS)} (got {f.gradient!r})")
        if str(f.likelihood) not in cls.LIKELIHOODS:
            raise ConfigError(f"formulation.likelihood must be one of {list(cls.LIKELIHOODS)} (got {f.likelihood!r})")
        rb = f.robust
        if isinstance(rb.steps, bool) or not isinstance(rb.steps, int) or rb.steps < 0:
            raise ConfigError(f"formulation.robust.steps must be an integer >= 0 (0: off; got {rb.steps!r})")
        if rb.steps > 0 and str(f.gradient) != "weighted":
            raise ConfigError(f"formulation.robust.steps > 0 needs formulation.gradient=weighted (got {f.gradient!r})")
        if rb.steps > 0 and not 0.0 <= float(rb.share) < 1.0:
            raise ConfigError(f"formulation.robust.share must be in [0, 1) (got {rb.share!r})")
        if rb.radius is not None:  # (soft_conditions loads the diffusers classes: only when there is a radius)
            from ..models.soft_conditions import check_radius

            check_radius(rb.radius, "formulation.robust.radius")
        if not isinstance(f.weighted_anchor, bool):
            raise ConfigError(f"formulation.weighted_anchor must be true or false (got {f.weighted_anchor!r})")
        tmin = f.weighted_correction_min_t
        if not isinstance(tmin, int) or isinstance(tmin, bool) or tmin < 0:
            raise ConfigError(f"formulation.weighted_correction_min_t must be an integer timestep >= 0 (got {tmin!r})")
        reuse = f.esd_refresh_every
        if not isinstance(reuse, int) or reuse < 1:
            raise ConfigError(f"formulation.esd_refresh_every must be an integer >= 1 (got {reuse!r})")
        if int(f.likelihood_pilot or 0) < 0:
            raise ConfigError(f"formulation.likelihood_pilot must be >= 0 samples (0: uniform timesteps; got {f.likelihood_pilot})")
        floor = float(f.likelihood_proposal_floor)
        if not 0.0 < floor <= 1.0:
            raise ConfigError(f"formulation.likelihood_proposal_floor must be in (0, 1] (got {floor})")

    def constraint_names(self):
        return [f"E_p[l({n})]" for n in self.setup.concept_names]

    # -- likelihood ----------------------------------------------------------------------------
    def likelihood(self, x: torch.Tensor, num_noise: int | None = None) -> torch.Tensor:
        """``l_i(x) = q_i(x) / p_pre(x)``, shape (N, m); differentiable in ``x`` for reparam."""
        if self.likelihood_mode == "exact":
            return torch.exp(self.setup.oracle.log_l(x)).to(x.dtype)
        concepts, reference, conds = self._ratio_models()
        llr = log_likelihood_ratio(x, concepts, reference,
                                   num_timesteps=int(self.cfg.likelihood_timesteps),
                                   num_noise=int(num_noise or self.cfg.likelihood_noise), generator=self.gen,
                                   antithetic=bool(self.cfg.antithetic),
                                   cond_q=conds, cond_p=self.setup.cond,
                                   proposal=self.timestep_proposal())
        # exp() of a noisy log-ratio is heavy-tailed; clipping l trades a small bias for far less variance
        clip = self.cfg.likelihood_clip
        return torch.exp(llr).clamp(max=float(clip)) if clip else torch.exp(llr)

    def _ratio_models(self):
        """The models of ``l_i = q_i / p``: the concepts, the reference (the family's unconditional model,
        default the pretrained model) and the concepts' conditioning (None: none)."""
        concepts = list(self.setup.concepts)
        reference = self.setup.likelihood_reference or self.setup.pretrained
        return concepts, reference, (list(self.setup.concept_conds) if self.setup.concept_conds else None)

    def timestep_proposal(self):
        """The estimator's timestep proposal (:func:`~unlearn.estimators.timestep_proposal`), fitted
        once on ``likelihood_pilot`` samples of each concept model; ``None`` (uniform over log-SNR)
        with ``likelihood_pilot: 0``. Drawn on the first likelihood estimate, i.e. in
        :meth:`pretrained_values`, so a resumed run fits the same proposal."""
        n = int(self.cfg.likelihood_pilot or 0)
        if n <= 0 or self.likelihood_mode == "exact":
            return None
        if self._proposal is None:
            concepts, reference, conds = self._ratio_models()
            with torch.no_grad():
                pilot = [self.sampler.sample(q, n, self.gen, cond=c).x0
                         for q, c in zip(concepts, conds or [None] * len(concepts))]
            self._proposal = timestep_proposal(pilot, concepts, reference, generator=self.gen,
                                               floor=float(self.cfg.likelihood_proposal_floor),
                                               cond_q=conds, cond_p=self.setup.cond)
        return self._proposal

    def _expected_likelihood(self, model, n: int | None = None) -> torch.Tensor:
        n, b = int(n or self.cfg.batch_size), int(self.cfg.batch_size)
        parts = []
        for k in range(0, n, b):  # batches of batch_size (memory), one mean
            x = self.sampler.sample(model, min(b, n - k), self.gen, cond=self.setup.cond).x0
            with torch.no_grad():
                parts.append(self.likelihood(x).detach().double().cpu())
        self._last_l = torch.cat(parts)  # per-sample l of the last estimate (its spread: the dual's curvature)
        return self._last_l.mean(0).float()

    def value_jacobian(self, multipliers):
        """``d E[l_i] / d lam_j = -Cov(l_i, l_j)`` at the target ``p_pre exp(-sum lam l) / Z`` (an
        exponential family in ``lam``), estimated by the covariance of the last estimate's samples."""
        l = getattr(self, "_last_l", None)
        if l is None or len(l) < self.MIN_CURVATURE_SAMPLES:  # too few for a covariance: plain dual steps
            return None
        c = l - l.mean(0, keepdim=True)
        return -(c.T @ c) / (len(l) - 1)

    def standard_error(self) -> torch.Tensor | None:
        """Standard error of each entry of the last estimate."""
        l = getattr(self, "_last_l", None)
        return None if l is None or len(l) < 2 else l.std(0) / len(l) ** 0.5

    def pretrained_values(self):
        """``E_pre[l_i]`` (exactly 1 for exact likelihoods) with the run's estimator, on
        ``reference_samples`` samples (default ``final_batch_size``, else ``batch_size``): the threshold is
        ``threshold_factor`` times it, so its sampling error is the threshold's (``l`` is large on the
        concept's share ``w`` of the samples and about 0 elsewhere: relative error ``sqrt((1/w - 1) / n)``,
        0.09 at ``w = 1/3`` and ``n = 256``). Its standard error is kept for the summary."""
        n = self.cfg.reference_samples or self.cfg.final_batch_size or None
        values = self._expected_likelihood(self.setup.pretrained, n)
        self.reference_se, self._reference_n = self.standard_error(), len(self._last_l)
        return values

    def _constrained_model(self):
        """The model the constraint is estimated on: the trained one under its retain condition, or
        (``robust.steps > 0``) under the adversarial condition found by a few more attack steps now."""
        return self.setup.model if self.adversary is None else self.adversary.attack(self.setup.model)

    def estimate(self, multipliers):
        return self._expected_likelihood(self._constrained_model())

    def final_estimate(self, multipliers):
        """On ``final_batch_size`` samples (default ``batch_size``): a single batch's estimate is noisy
        (GMM: std about 0.05 at a threshold of 0.1 with 256 samples)."""
        return self._expected_likelihood(self._constrained_model(), self.cfg.final_batch_size or None)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.adversary is not None:
            state["adversary"] = self.adversary.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.adversary is not None and "adversary" in state:
            self.adversary.load_state_dict(state["adversary"])

    def finalize(self, multipliers):
        """``final_primal_steps`` more primal steps at the final multipliers (e.g. their average over
        the last dual steps, ``train.final_multipliers=average``), so the model is their Lagrangian
        minimiser; the constraint is then estimated again."""
        k = int(self.cfg.final_primal_steps or 0)
        if k <= 0:
            return {}
        losses = {}
        for _ in range(k):
            losses = self.primal_step(torch.as_tensor(multipliers))
        return {"final_primal_steps": k, "final_primal_loss": float(losses.get("loss", float("nan")))}

    # -- primal --------------------------------------------------------------------------------
    def esd_target(self, multipliers) -> ComposedScore:
        """ESD: ``eps_pre - sum_i eta_i (eps_qi - eps_ref)`` with the likelihood's models ``q_i`` and
        reference (GMM: ``(1 + eta) eps_pre - eta eps_q``; text: ESD's ``eps(c_from) - eta (eps(c) - eps(none))``)."""
        eta = torch.as_tensor(multipliers, dtype=torch.float32)
        concepts = list(self.setup.concepts)
        reference = self.setup.likelihood_reference
        if reference is None:
            return ComposedScore([self.setup.pretrained, *concepts], torch.cat([(1 + eta.sum()).view(1), -eta]))
        return ComposedScore([self.setup.pretrained, *concepts, reference],
                             torch.cat([torch.ones(1), -eta, eta.sum().view(1)]))

    def primal_loss(self, multipliers):
        model, n = self.setup.model, int(self.cfg.primal_batch_size)
        cond = self.setup.cond
        if self.distils_target:
            traj = self._esd_trajectories(n)
            loss = trajectory_kl(model, self.esd_target(multipliers), self.sampler, traj, cond=cond,
                                 num_steps=self.grad_steps, generator=self.gen).mean()
            out = {"esd_kl": loss.item()}
        elif self.gradient == "weighted":
            x, l = self._weighted_pool()
            m = int(self.cfg.weighted_batch_size)
            idx = torch.randint(0, x.shape[0], (m,), generator=self.gen)
            restore_conditions([(tab, d[idx]) for tab, d in self._pool_conditions])
            # self-normalised importance weights of the target p_pre exp(-sum lam l) / Z (eq. 7), per prompt
            logw = -(l[idx] * multipliers[None]).sum(1)
            w = prompt_normalised_weights(logw, [g[idx] for g in self._pool_groups]).to(x.device)
            loss = self._weighted_loss(x[idx], w)
            if self.adversary is not None and self.adversary.view is not None:
                # the adversarial condition fitted to the same target: anchored to the retain prompt's
                share = float(self.cfg.robust.share)
                loss = (1 - share) * loss + share * self._weighted_loss(x[idx], w, self.adversary.view)
            out = {"ess": (1.0 / (w**2).sum()).item() / m}
        elif self.gradient == "policy":
            traj = self.sampler.sample(model, n, self.gen, cond=cond, record=True)
            with torch.no_grad():
                reward = (self.likelihood(traj.x0) * multipliers[None]).sum(1)
            logp, kl = self.sampler.step_terms(model, traj, self.setup.pretrained, cond=cond, ref_cond=cond,
                                               num_steps=self.grad_steps, generator=self.gen)
            cost = reward + (self.kl_weight * kl.detach() if self.full_kl_gradient else 0.0)
            adv = cost - cost.mean()
            loss = (adv * logp).mean() + self.kl_weight * kl.mean()
            out = {"penalty": reward.mean().item(), "kl": kl.mean().item()}
        else:
            traj = self.sampler.sample(model, n, self.gen, cond=cond, grad=True, record=True)
            penalty = (self.likelihood(traj.x0) * multipliers[None]).sum(1).mean()
            # pathwise KL on the reparameterised states: its gradient includes the states' dependence
            kl = 0.0
            for k, t in enumerate(self.sampler.timesteps):
                w = self.sampler.kl_weight(k)
                if w == 0.0:
                    continue
                x = traj.states[k]
                tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                kl = kl + w * ((traj.eps[k] - self.setup.pretrained.eps(x, tt, cond)) ** 2).flatten(1).sum(1)
            loss = penalty + self.kl_weight * kl.mean()
            out = {"penalty": penalty.item(), "kl": kl.mean().item()}
        return PrimalLoss(loss, out)

    def _weighted_loss(self, x0: torch.Tensor, w: torch.Tensor, model=None) -> torch.Tensor:
        """The weighted primal's loss on pool samples ``x0`` with self-normalised weights ``w``.

        Plain (``weighted_anchor: false``): ``sum_j w_j ||eps_theta(x_t^j) - e_j||^2``, minimised by the
        target's denoiser ``E[w e | x_t] / E[w | x_t]`` -- under the *pool's* posterior, so at
        ``lam = 0`` it fits the finite pool (and the sampler's bias) rather than staying put.
        Anchored (``weighted_anchor: true``): ``mean_j ||eps_theta - eps_pre||^2 + sum_j (w_j - 1/m)
        ||eps_theta - e_j||^2``, a control variate with the same minimiser
        ``(eps_pre - E[e | x_t] + E[w e | x_t]) / E[w | x_t]`` where the pool follows ``p_pre``
        (``E[e | x_t] = eps_pre``); uniform weights give ``eps_pre`` itself, so only the reweighting
        moves the model (the first term is the path KL's integrand on the pool's states).
        ``weighted_correction_min_t``: the second term only at ``t >=`` it (below, the pool's
        posterior is one image, so the term mostly fits that image's noise); the plain loss ignores it.
        ``model``: the trained model under another condition (default: its own), fitted to the same target."""
        model, cond, m = model if model is not None else self.setup.model, self.setup.cond, x0.shape[0]
        if not self.anchor:
            return (w * denoising_loss(model, x0, self.gen, cond=cond, reduce=False)).sum()
        sched = model.schedule
        t = torch.randint(0, sched.T, (m,), generator=self.gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=self.gen, dtype=x0.dtype).to(x0.device)
        xt = sched.add_noise(x0, noise, t)
        pred = model.eps(xt, t, cond)
        with torch.no_grad():
            ref = self.setup.pretrained.eps(xt, t, cond)
        size = x0[0].numel()  # per-dimension, as denoising_loss
        to_pre, to_noise = _sqnorm(pred - ref) / size, _sqnorm(pred - noise) / size
        coef = w - 1.0 / m
        if self.correction_min_t > 0:  # below it, the pool's posterior is one image: the correction only memorises
            coef = coef * (t >= self.correction_min_t)
        return to_pre.mean() + (coef * to_noise).sum()

    def _esd_trajectories(self, n: int):
        """The ESD-style primal's trajectories of the model: ``esd_refresh_every`` (k) batches of
        ``n`` drawn in one call every k primal steps, one batch per step. The distilled target is
        fixed, so the minimiser of the loss does not depend on where the states come from; states
        up to k - 1 steps old are as good a training distribution, and one large sampling batch
        is several times cheaper than k small ones on a CPU."""
        k = int(self.cfg.esd_refresh_every or 1)
        if not self._esd_buffer:
            traj = self.sampler.sample(self.setup.model, n * k, self.gen, cond=self.setup.cond, record=True)
            self._esd_buffer = [Trajectory(states=[s[i * n:(i + 1) * n] for s in traj.states],
                                           timesteps=traj.timesteps, log_prob=None,
                                           eps=[e[i * n:(i + 1) * n] for e in traj.eps],
                                           conditions=[(tab, d[i * n:(i + 1) * n]) for tab, d in traj.conditions])
                                for i in range(k)]
        traj = self._esd_buffer.pop(0)
        restore_conditions(traj.conditions)  # its rows' prompts, where the model has a prompt distribution
        return traj

    def prepare(self):
        if self.gradient == "weighted" and not self.distils_target:  # drawn before step 1, so a resume redraws it alike
            self._weighted_pool()

    def _weighted_pool(self):
        """``weighted_pool`` samples of the pretrained model with their estimated ``l_i`` (no grad).

        ``exp(-lam l)`` is convex in ``l``: noise in the estimated ``l`` weakens the weighting (Jensen)
        and raises the multipliers. Only samples with a sizeable ``l`` matter there, so each sample's
        ``l`` is first screened with ``likelihood_noise`` draws per stratum and, where some ``l_i``
        exceeds ``weighted_refine_above``, estimated again, independently of the screen (no
        selection bias), with ``weighted_likelihood_noise`` draws. ``weighted_refine_above: null``
        gives every sample ``weighted_likelihood_noise`` draws."""
        if self._pool is None:
            n, b = int(self.cfg.weighted_pool), int(self.cfg.batch_size)
            draws = int(self.cfg.weighted_likelihood_noise)
            above = self.cfg.weighted_refine_above
            xs, drawn = [], []
            for k in range(0, n, b):
                traj = self.sampler.sample(self.setup.pretrained, min(b, n - k), self.gen, cond=self.setup.cond)
                xs.append(traj.x0.detach())
                drawn.append(traj.conditions)
            x = torch.cat(xs)
            # each pool sample's prompt (a retain distribution): the weighted fit denoises it under that prompt
            self._pool_conditions = [(tab, torch.cat([d[j][1] for d in drawn])) for j, (tab, _) in enumerate(drawn[0])]
            self._pool_groups = [reference_ids(tab, d) for tab, d in self._pool_conditions]

            def estimate(pts, noise):
                with torch.no_grad():
                    return torch.cat([self.likelihood(pts[k:k + b], num_noise=noise).float().cpu()
                                      for k in range(0, len(pts), b)])

            if above is None:
                l = estimate(x, draws)
                self.pool_refined = n
            else:
                l = estimate(x, int(self.cfg.likelihood_noise))
                sel = (l > float(above)).any(1).nonzero().flatten()
                if len(sel):
                    l[sel] = estimate(x[sel.to(x.device)], draws)
                self.pool_refined = int(len(sel))
            self._pool = (x, l)
        return self._pool

    def diagnostics(self, multipliers) -> dict:
        out = {}
        se = getattr(self, "reference_se", None)
        if se is not None:
            out["reference_samples"] = int(self._reference_n)
            out["reference_standard_error"] = [round(float(v), 5) for v in se]
        if self._pool is not None:
            out.update(weighted_pool=int(self._pool[0].shape[0]), weighted_pool_refined=self.pool_refined)
        return out

    def oracle_target(self, multipliers):
        if self.distils_target:  # ESD target p_pre^{1+eta} q^{-eta} = RU target with mu = eta / (1 + eta)
            ru = ReverseKLUnlearning
            return OracleTarget(ru.name, ru.esd_multipliers(multipliers).tolist())
        return OracleTarget(self.name, [float(v) for v in multipliers])

    # -- the exact side ---------------------------------------------------------------------------
    @classmethod
    def oracle_log_target(cls, oracle, multipliers, grid=None):
        return oracle.lu_target(multipliers, grid)

    @classmethod
    def oracle_values(cls, oracle, multipliers):
        return oracle.lu_values(multipliers)

    @classmethod
    def oracle_dual(cls, oracle, multipliers, thresholds):
        return oracle.lu_dual(multipliers, thresholds)

    @classmethod
    def oracle_multipliers(cls, oracle, thresholds):
        return oracle.solve_dual(oracle.lu_dual, thresholds, oracle.lu_upper_bounds(), name=cls.name)


class Adversary:
    """``formulation.robust``: the soft condition of an adversarial-prompt attack (the family's
    :class:`~unlearn.models.soft_conditions.SoftCondition`, raising its judge's concept score through a
    few-step deterministic sampler), kept across dual steps and advanced ``robust.steps`` steps before
    each constraint estimate, so the constraint is ``E[l]`` under the attack's condition. The weighted
    primal also fits the model under that condition to the retain prompt's target (``robust.share``)."""

    def __init__(self, rc, setup, gen):
        from ..models.soft_conditions import SoftCondition, check_radius
        from ..samplers import GaussianSampler

        judge = setup.concept_judge
        if setup.soft_condition is None or judge is None or judge.log_prob is None:
            raise ConfigError(f"formulation.robust.steps > 0 needs a model with a condition to attack and a "
                              f"differentiable judge of the concepts (model {setup.name} has "
                              f"{'no condition' if setup.soft_condition is None else 'no such judge'}); accepted: "
                              f"formulation.robust.steps=0, or model=digits / digits_sd")
        self.steps, self.batch, self.gen = int(rc.steps), int(rc.batch_size), gen
        self.radius = check_radius(rc.radius, "formulation.robust.radius")
        self.log_prob = judge.log_prob
        self.soft: SoftCondition = setup.soft_condition()
        self.opt = torch.optim.Adam(self.soft.parameters(), lr=float(rc.lr))
        self.sampler = GaussianSampler(setup.schedule, num_steps=int(rc.sampler_steps), kind="ddim", eta=0.0)
        self.view = None
        self.losses: list[float] = []

    def attack(self, model):
        from ..models.diffusers_models import recondition
        from ..models.soft_conditions import ascent_step, weights_fixed

        with weights_fixed(model):  # the model is fixed while the condition learns
            for _ in range(self.steps):
                self.losses.append(ascent_step(model, self.soft, self.log_prob, self.sampler, self.batch, self.gen,
                                               self.opt, self.radius))
        with torch.no_grad():
            self.view = recondition(model, self.soft.condition(guided=True))
        return self.view

    def state_dict(self) -> dict:
        return {"condition": [p.detach().clone() for p in self.soft.parameters()], "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.soft.parameters(), state["condition"]):
                p.copy_(v)
        self.opt.load_state_dict(state["optimizer"])


def reference_ids(table, drawn: torch.Tensor) -> torch.Tensor:
    """Each row's pretrained reference as a group id: the prompt the pool's table reads it as (a retain
    prompt, or its anchor: prompts with one anchor share one normalising constant)."""
    names = sorted(set(table.prompts))
    return torch.tensor([names.index(p) for p in table.prompts], dtype=torch.long)[drawn.cpu().long()]


def prompt_normalised_weights(logw: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Self-normalised weights ``softmax(logw)`` within each group of rows, times the group's share of
    the batch (``prompts``: one group id per row from each table; none: a plain softmax).

    The prompt distribution is fixed, so the Lagrangian's minimiser is a tilt per prompt,
    ``p*(x | c) = p_pre(x | r(c)) exp(-sum lam l(x)) / Z_r(c)`` (``r(c)``: the prompt's pretrained
    reference, itself or its anchor), whose normalising constant depends on the reference only. One
    softmax over the whole batch would fit the joint tilt instead, whose prompt marginal moves: a
    prompt whose samples all carry a large ``l`` (the concept's own prompt) would lose its weight and
    stay where it was."""
    if not prompts:
        return torch.softmax(logw, 0)
    key = torch.stack([d.to(logw.device).long() for d in prompts], 1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    w = torch.empty_like(logw)
    for g in range(int(group.max()) + 1):
        sel = group == g
        w[sel] = torch.softmax(logw[sel], 0) * (sel.sum() / len(logw))
    return w

