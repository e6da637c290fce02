"""FU: forward-KL constraints (data unlearning), formulas.md FU.

Primal loss ``E_retain l(x) - sum_i mu_i E_{x ~ q_i} l(x)`` with the denoising loss ``l``; only
samples of each ``q_i`` are needed. Constraint ``i``: the forget loss of ``q_i``'s samples must
rise to ``threshold_factor`` times its pretrained value (the forget loss stands in for
``KL(q_i || p)`` up to a constant). It is measured with fixed evaluation noise (common random
numbers), so the pretrained and the current model are compared on the same draws.
``multipliers: per_sample`` gives each forget sample its own constraint and multiplier.
Baseline (``method=fixed``, the paper's ``method=baseline``): one fixed equal weight for every forget
constraint (SISS without importance sampling).
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..estimators import denoising_loss
from .base import Formulation, OracleTarget, PrimalLoss


class ForwardKLUnlearning(Formulation):
    name = "fu"
    needs = frozenset({"forget_sets"})  # what the model family builds for it (unlearn.families.NEEDS)
    sense = "ge"
    GROUPINGS = ("per_component", "per_sample")
    oracle_comparable = False  # our constraint is on the forget loss, the oracle's on KL(q_i || p)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.grouping = str(self.cfg.multipliers)
        if self.grouping not in self.GROUPINGS:
            raise ConfigError(f"formulation.multipliers must be one of {list(self.GROUPINGS)} (got {self.grouping!r})")
        if not self.setup.forget_sets:
            raise ConfigError("formulation=fu needs forget samples")
        if self.grouping == "per_sample":
            self.groups = [x[j:j + 1] for x in self.setup.forget_sets for j in range(len(x))]
            self.group_names = [f"{n}#{j}" for n, x in zip(self.setup.concept_names, self.setup.forget_sets)
                                for j in range(len(x))]
            self.owner = [i for i, x in enumerate(self.setup.forget_sets) for _ in range(len(x))]
        else:
            self.groups = list(self.setup.forget_sets)
            self.group_names = list(self.setup.concept_names)
            self.owner = list(range(len(self.groups)))
        self.forget = torch.cat(self.groups)
        self.index = torch.cat([torch.full((len(g),), k) for k, g in enumerate(self.groups)])
        # fixed evaluation noise for the constraint estimates (common random numbers)
        k = int(self.cfg.eval_draws)
        g = torch.Generator().manual_seed(int(self.cfg.eval_seed))
        T = self.setup.schedule.T
        self.eval_t = torch.randint(0, T, (k, len(self.forget)), generator=g)
        self.eval_e = torch.randn((k, *self.forget.shape), generator=g)
        # formulation.retain: the model's data (setup.retain_sampler) or pretrained samples (the pool)
        mode = str(self.cfg.retain)
        self.retain_sampler = self.setup.retain_sampler if mode in ("data", "auto") else None
        if mode == "data" and self.retain_sampler is None:
            raise ConfigError("formulation.retain=data needs a model with data of its own or model.retain_folder "
                              "(an image folder); accepted: formulation.retain=model or auto (pretrained samples)")
        self.retain_pool = None
        if self.retain_sampler is None:
            n = int(self.cfg.retain_pool)
            with torch.no_grad():
                self.retain_pool = self.sampler.sample(self.setup.pretrained, n, self.gen, cond=self.setup.cond).x0
        self.opt = self.primal_optimizer(self.setup.model.trainable_parameters(), float(self.cfg.primal_lr),
                                         float(self.cfg.weight_decay))
        self.schedule_primal()

    @classmethod
    def check_config(cls, cfg, method=None):
        super().check_config(cfg, method)
        if cfg.formulation.thresholds is None and float(cfg.formulation.threshold_factor) <= 1.0:
            raise ConfigError(f"formulation.threshold_factor must be > 1 for formulation={cls.name} (the forget loss "
                              f"must rise above its pretrained value: a factor <= 1 is met by the pretrained model "
                              f"itself; got {cfg.formulation.threshold_factor})")
        if str(cfg.formulation.retain) not in ("data", "model", "auto"):
            raise ConfigError(f"formulation.retain must be one of ['data', 'model', 'auto'] "
                              f"(got {cfg.formulation.retain!r})")
        if str(cfg.formulation.multipliers) not in cls.GROUPINGS:
            raise ConfigError(f"formulation.multipliers must be one of {list(cls.GROUPINGS)} "
                              f"(got {cfg.formulation.multipliers!r})")

    def constraint_names(self):
        return [f"forget_loss[{n}]" for n in self.group_names]

    def _group_losses(self, model) -> torch.Tensor:
        per = torch.zeros(len(self.forget))
        with torch.no_grad():
            for t, e in zip(self.eval_t, self.eval_e):
                per += denoising_loss(model, self.forget, t=t, noise=e, cond=self.setup.cond, reduce=False).cpu()
        per /= len(self.eval_t)
        return torch.zeros(len(self.groups)).index_add_(0, self.index, per) / torch.bincount(self.index).float()

    def pretrained_values(self):
        return self._group_losses(self.setup.pretrained)

    def estimate(self, multipliers):
        return self._group_losses(self.setup.model)

    def _retain_batch(self, n):
        if self.retain_sampler is not None:
            return self.retain_sampler(n, self.gen)
        idx = torch.randint(0, len(self.retain_pool), (n,), generator=self.gen)
        return self.retain_pool[idx]

    def primal_loss(self, multipliers):
        """``E_retain l - sum_i mu_i E_{q_i} l`` on one micro-batch; with ``forget_grad_clip > 0`` the
        forget term's gradient is clipped to that norm on its own (SISS), before the retain gradient joins it."""
        model, n = self.setup.model, int(self.cfg.primal_batch_size)
        retain = denoising_loss(model, self._retain_batch(n), self.gen, cond=self.setup.cond)
        nf = int(self.cfg.forget_batch_size)
        idx = torch.randint(0, len(self.forget), (min(nf, len(self.forget)) if nf > 0 else len(self.forget),),
                            generator=self.gen)
        per = denoising_loss(model, self.forget[idx], self.gen, cond=self.setup.cond, reduce=False)
        # sample s carries weight mu_{group(s)} / |group(s)|; the minibatch sum is rescaled to be unbiased
        w = self._sample_weights(multipliers)[idx]
        forget_term = (w * per).sum() * (len(self.forget) / len(idx))
        return PrimalLoss(retain - forget_term, {"retain_loss": retain.item(), "forget_term": forget_term.item()},
                          clipped=((-forget_term, float(self.cfg.forget_grad_clip)),))

    def _sample_weights(self, multipliers) -> torch.Tensor:
        sizes = torch.bincount(self.index, minlength=len(self.groups)).float()
        return (torch.as_tensor(multipliers, dtype=torch.float32) / sizes)[self.index]

    def oracle_target(self, multipliers):
        # the weight on each forget set's empirical distribution: the sum of its samples' weights
        w = self._sample_weights(multipliers)
        comp = torch.tensor([self.owner[int(k)] for k in self.index])
        mu = torch.zeros(len(self.setup.forget_sets)).index_add_(0, comp, w)
        return OracleTarget(self.name, mu.tolist())

    # -- the exact side (KL(q_i || p) of the forget sets' distributions) --------------------------
    @classmethod
    def oracle_log_target(cls, oracle, multipliers, grid=None):
        return oracle.fu_target(multipliers, grid)

    @classmethod
    def oracle_values(cls, oracle, multipliers):
        return oracle.fu_values(multipliers)

    @classmethod
    def oracle_dual(cls, oracle, multipliers, thresholds):
        return oracle.fu_dual(multipliers, thresholds)

    @classmethod
    def oracle_multipliers(cls, oracle, thresholds):
        return oracle.solve_dual(oracle.fu_dual, thresholds, oracle.fu_upper_bounds(), name=cls.name)
