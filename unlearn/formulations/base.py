"""The interface every formulation implements, shared by the primal-dual driver."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..models.base import ScoreModel
from ..samplers import GaussianSampler
from ..setup import UnlearningSetup


@dataclass
class OracleTarget:
    """Which exact target (oracle formulation name and multipliers) a run aims at."""

    formulation: str
    multipliers: list[float]


FORMULATIONS: dict[str, type["Formulation"]] = {}  # name -> class, filled as the modules are imported


@dataclass
class PrimalLoss:
    """One micro-batch's primal loss. ``clipped``: terms of ``loss`` whose gradient is clipped to its own
    norm before it joins the rest (``(term, max_norm)``; SISS clips the forget term's gradient alone)."""
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)
    clipped: tuple = ()


def _import_builtin() -> None:
    """Import every module of :mod:`unlearn.formulations` (each registers its class on import), so
    a new formulation is one module and its config."""
    import importlib
    import pkgutil

    from .. import formulations as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "base":
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def formulation_class(formulation) -> type["Formulation"]:
    """A formulation class, or the registered one of that name (e.g. an :class:`OracleTarget`'s)."""
    if isinstance(formulation, type) and issubclass(formulation, Formulation):
        return formulation
    _import_builtin()
    try:
        return FORMULATIONS[str(formulation)]
    except KeyError:
        raise ValueError(f"formulation must be one of {sorted(FORMULATIONS)} (got {formulation!r})") from None


def formulation_names(keep=lambda cls: True) -> list[str]:
    """The registered formulations' names (those ``keep`` accepts), sorted."""
    _import_builtin()
    return sorted(n for n, c in FORMULATIONS.items() if keep(c))


class Formulation:
    """An unlearning problem: objective, constraints and the primal step of its Lagrangian.

    Constraints are ``value >= threshold`` (``sense = "ge"``: RU, FU) or
    ``value <= threshold`` (``sense = "le"``: LU). ``violation`` is positive when violated, so
    the dual update is always ``mu <- proj(mu + eta_d * violation)``.
    """

    name: str = ""
    sense: str = "ge"
    has_primal: bool = True
    needs: frozenset = frozenset()  # what the model family must build: "concepts" and/or "forget_sets"
    oracle_comparable: bool = True  # do the oracle's thresholds mean the same as ours?
    paper_baseline: str = "fixed"   # the registered method ``method=baseline`` runs (the paper's baseline)
    has_esd_target: bool = False    # concept models give the ESD-style target (method=esd)
    exact_constraint_metric: str | None = None  # the model family's metric that is this constraint, exactly

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            FORMULATIONS[cls.name] = cls

    def __init__(self, cfg: DictConfig, setup: UnlearningSetup, sampler: GaussianSampler, generator: torch.Generator,
                 method=None, show_progress: bool = True):
        """``method``: the :class:`~unlearn.methods.base.Method` solving this problem (``None``: the
        Lagrangian's primal, as under dual ascent)."""
        self.cfg, self.setup, self.sampler, self.gen = cfg, setup, sampler, generator
        self.method = method
        self.show_progress = show_progress
        factor = float(cfg.threshold_factor)
        if not factor > 0:
            raise ConfigError(f"formulation.threshold_factor must be > 0 (got {factor})")
        self.factor = factor

    @property
    def distils_target(self) -> bool:
        """Whether the method has the primal distil a fixed target (ESD-style) instead of minimising
        the Lagrangian."""
        return bool(getattr(self.method, "target_distillation", False))

    @classmethod
    def check_config(cls, cfg: DictConfig, method=None) -> None:
        """Checks that need no model, run before any pretraining (override to add more).
        ``threshold_factor > 0`` is checked by :func:`unlearn.config.validate_config` before this;
        ``method.multiplier`` by the method (:meth:`~unlearn.methods.base.Method.fixed_values`)."""
        from ..optim import check_schedule

        f = cfg.formulation
        check_schedule(f)
        if cls.has_primal:
            k = f.grad_accumulation
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"formulation.grad_accumulation must be an integer >= 1 (got {k!r})")
        cg = f.concept_guidance
        if str(cg) != "sampling" and (isinstance(cg, bool) or not isinstance(cg, (int, float)) or not cg >= 1):
            raise ConfigError(f"formulation.concept_guidance must be 'sampling' (the sampling roles' "
                              f"model.guidance_scale) or a number >= 1 (1: the plain conditional model; got {cg!r})")
        if f.thresholds is not None:
            try:
                ok = len(f.thresholds) > 0 and all(float(v) == float(v) for v in f.thresholds)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"formulation.thresholds must be null or a list of numbers, one per constraint "
                                  f"(got {f.thresholds!r})")

    @classmethod
    def constraint_count(cls, cfg: DictConfig) -> int | None:
        """The number of constraints the config gives, where it is known before the model is built."""
        return None

    @classmethod
    def check_multipliers(cls, values: torch.Tensor, count: int | None) -> None:
        """The formulation's own condition on fixed multipliers (raise a ConfigError naming
        ``method.multiplier``); ``count``: the number of constraints where known."""

    @classmethod
    def esd_multipliers(cls, eta: torch.Tensor) -> torch.Tensor:
        """This formulation's multipliers of the ESD-style target with strengths ``eta`` (``has_esd_target``)."""
        raise NotImplementedError(f"formulation {cls.name} has no ESD-style target")

    # -- constraints -------------------------------------------------------------------------
    def constraint_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_constraints(self) -> int:
        return len(self.constraint_names())

    def estimate(self, multipliers: torch.Tensor) -> torch.Tensor:
        """Current constraint values (the dual subgradient's ingredients)."""
        raise NotImplementedError

    def pretrained_values(self) -> torch.Tensor:
        raise NotImplementedError

    def thresholds(self, pretrained: torch.Tensor) -> torch.Tensor:
        """``formulation.thresholds`` where given (one absolute value per constraint), else
        :meth:`factor_thresholds` (``threshold_factor`` times the pretrained values)."""
        given = self.cfg.thresholds
        if given is None:
            return self.factor_thresholds(pretrained)
        values = [float(v) for v in given]
        if len(values) != len(pretrained):
            raise ConfigError(f"formulation.thresholds needs one value per constraint ({len(pretrained)}: "
                              f"{self.constraint_names()}; got {len(values)})")
        return torch.tensor(values, dtype=pretrained.dtype)

    def factor_thresholds(self, pretrained: torch.Tensor) -> torch.Tensor:
        return self.factor * pretrained

    def violation(self, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return thresholds - values if self.sense == "ge" else values - thresholds

    def satisfied(self, values: torch.Tensor, thresholds: torch.Tensor, rel_tol: float) -> list[bool]:
        slack = rel_tol * thresholds.abs()
        ok = values >= thresholds - slack if self.sense == "ge" else values <= thresholds + slack
        return [bool(v) for v in ok]

    def project(self, mu: torch.Tensor) -> torch.Tensor:
        return mu

    def value_jacobian(self, multipliers: torch.Tensor) -> torch.Tensor | None:
        """``d value_i / d mu_j`` at the target of ``multipliers`` as the last :meth:`estimate` saw it
        (the dual's curvature, for :class:`~unlearn.dual.DualAscent`'s Newton rule); ``None``: unknown."""
        return None

    def dual_jacobian(self, multipliers: torch.Tensor) -> torch.Tensor | None:
        """``d violation / d mu`` (``None``: unknown): :meth:`value_jacobian` with the constraints' sense."""
        j = self.value_jacobian(multipliers)
        if j is None:
            return None
        return -j if self.sense == "ge" else j

    def standard_error(self) -> torch.Tensor | None:
        """Standard error of each value of the last :meth:`estimate` (``None``: not known)."""
        return None

    def trusted(self, multipliers: torch.Tensor) -> bool:
        """Whether this formulation's constraint estimates hold at ``multipliers`` (e.g. RU's importance
        weights keep enough effective samples there). The dual rule keeps its iterates where they do."""
        return True

    def recenter(self, multipliers: torch.Tensor) -> bool:
        """Move the estimators to ``multipliers`` where :meth:`trusted` fails there (e.g. RU's pool drawn
        anew at that target); returns whether they are trusted now. Default: cannot."""
        return False

    def step_diagnostics(self, multipliers: torch.Tensor) -> dict:
        """Numbers logged with each dual step (e.g. the effective sample size of importance weights)."""
        return {}

    def reliability(self, multipliers: torch.Tensor) -> str | None:
        """``None`` when the final estimates can be trusted at ``multipliers``, else one line saying
        why not and which setting to change; such a run is reported ``unreliable``, never as met."""
        return None

    # -- primal ------------------------------------------------------------------------------
    def primal_loss(self, multipliers: torch.Tensor) -> PrimalLoss | None:
        """One micro-batch's loss of the primal step (``None``: no primal, e.g. RU dual-only)."""
        return None

    def primal_step(self, multipliers: torch.Tensor) -> dict:
        """One optimiser update from ``formulation.grad_accumulation`` micro-batches of
        :meth:`primal_loss` (their gradients averaged); returns the micro-batches' mean stats."""
        k = int(self.cfg.grad_accumulation)
        stats: dict = {}
        for j in range(k):
            part = self.primal_loss(multipliers)
            if part is None:
                return {}
            if j == 0:
                self.opt.zero_grad(set_to_none=True)
            self._backward(part, k)
            for key, v in {"loss": part.loss.item(), **part.stats}.items():
                stats[key] = stats.get(key, 0.0) + float(v) / k
        self._update()
        return stats

    def finalize(self, multipliers: torch.Tensor) -> dict:
        """After the last dual step (e.g. RU's optional distillation)."""
        return {}

    def final_estimate(self, multipliers: torch.Tensor) -> torch.Tensor:
        """The constraint values reported for the final model (default: one more :meth:`estimate`)."""
        return self.estimate(multipliers)

    def final_model(self, multipliers: torch.Tensor) -> ScoreModel:
        """The unlearned model whose samples are evaluated."""
        return self.setup.model

    def diagnostics(self, multipliers: torch.Tensor) -> dict:
        """Extra numbers for summary.json (e.g. an importance sampler's effective sample size)."""
        return {}

    def pretrained_samples(self, n: int, generator) -> torch.Tensor | None:
        """The pretrained model's samples to compare :meth:`final_samples` with, when they come from
        the same source (RU: the pool at uniform weights); ``None``: sample the pretrained model."""
        return None

    def final_metrics(self, multipliers: torch.Tensor) -> dict:
        """Metrics of the unlearned distribution the formulation knows better than a sampler of
        :meth:`final_model` can measure (e.g. RU's importance-weighted ``kl_to_pretrained`` when its
        final samples are resampled). A metric measured on the final samples replaces these."""
        return {}

    def final_samples(self, multipliers: torch.Tensor, n: int, generator) -> torch.Tensor | None:
        """Samples of the unlearned distribution when they do not come from ``final_model``."""
        return None

    def oracle_target(self, multipliers: torch.Tensor) -> OracleTarget | None:
        return OracleTarget(self.name, [float(v) for v in multipliers])

    # -- the exact side (a model family with an oracle: the GMM's grid quadrature) ---------------
    # Each formulation states its exact problem through the oracle's named primitives; the oracle's
    # by-name methods (``GMMOracle.target_log_density("ru", ...)``) look the class up in the registry.
    @classmethod
    def oracle_options(cls, cfg: DictConfig) -> dict:
        """Keyword arguments of the oracle that this formulation's config sets (e.g. RU's cap)."""
        return {}

    @classmethod
    def oracle_log_target(cls, oracle, multipliers, grid=None):
        """``(grid, log-density)``: the exact optimal target at ``multipliers``, normalised on ``grid``
        (default: the grid the target needs)."""
        raise NotImplementedError(f"formulation {cls.name} has no exact target")

    @classmethod
    def oracle_grid(cls, oracle, multipliers):
        """The grid the exact target needs where it reaches beyond the mixture's (``None``: it does not)."""
        return None

    @classmethod
    def oracle_values(cls, oracle, multipliers):
        """The constraint quantities at the exact target of ``multipliers`` (a numpy array)."""
        raise NotImplementedError(f"formulation {cls.name} has no exact constraint values")

    @classmethod
    def oracle_pretrained_values(cls, oracle):
        """The exact constraint quantities of the pretrained model (multipliers 0)."""
        import numpy as np

        return cls.oracle_values(oracle, np.zeros(len(oracle.concepts)))

    @classmethod
    def oracle_thresholds(cls, oracle, factor: float):
        """The exact thresholds at ``threshold_factor`` (default ``factor`` times each pretrained value)."""
        return factor * cls.oracle_pretrained_values(oracle)

    @classmethod
    def oracle_dual(cls, oracle, multipliers, thresholds):
        """The exact dual function and its gradient (the constraints' slack): ``(value, gradient)``."""
        raise NotImplementedError(f"formulation {cls.name} has no exact dual")

    @classmethod
    def oracle_multipliers(cls, oracle, thresholds):
        """The exact optimal multipliers for ``thresholds`` (the maximiser of :meth:`oracle_dual`)."""
        raise NotImplementedError(f"formulation {cls.name} has no exact optimal multipliers")

    # -- checkpoints ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Draw what is computed once from ``self.gen`` before the first dual step (e.g. LU's
        weighted pool). The driver calls it after :meth:`pretrained_values`, in a fresh and in a
        resumed run alike and before a checkpoint's generator state is restored, so a resumed run
        holds the same draws as an uninterrupted one. Lazily drawn state must be drawn here (or in
        :meth:`pretrained_values`), or be part of :meth:`state_dict`."""

    def _trainable_named(self) -> dict:
        """The parameters the primal optimiser trains, by name (e.g. LoRA adapters only)."""
        ids = {id(p) for p in self.setup.model.trainable_parameters()}
        return {n: p for n, p in self.setup.model.named_parameters() if id(p) in ids}

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue: the trainable parameters only (never the frozen
        base), the primal optimiser's state (``self.opt`` where there is one) and the generator.
        Subclasses with more state extend this and :meth:`load_state_dict`."""
        state = {"trainable": {n: p.detach().cpu().clone() for n, p in self._trainable_named().items()},
                 "generator": self.gen.get_state()}
        if getattr(self, "opt", None) is not None:
            state["optimizer"] = self.opt.state_dict()
        if getattr(self, "sched", None) is not None:
            state["lr_schedule"] = self.sched.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        params = self._trainable_named()
        saved = state["trainable"]
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise ValueError(f"trainable parameters differ (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in params.items():
                if saved[n].shape != p.shape:
                    raise ValueError(f"trainable parameter {n} has shape {tuple(saved[n].shape)}, "
                                     f"expected {tuple(p.shape)}")
                p.copy_(saved[n])
        if "optimizer" in state and getattr(self, "opt", None) is not None:
            self.opt.load_state_dict(state["optimizer"])
        if "lr_schedule" in state and getattr(self, "sched", None) is not None:
            self.sched.load_state_dict(state["lr_schedule"])
        self.gen.set_state(state["generator"])

    def trainable_state(self) -> dict:
        own = getattr(self.setup.model, "trainable_state", None)  # e.g. LoRA views: adapters only
        if callable(own):
            return own()
        return {k: v.detach().cpu() for k, v in self.setup.model.state_dict().items()}

    def scale_primal_lr(self, factor: float) -> None:
        """Multiply the primal optimiser's learning rate (e.g. to settle the fit after the dual steps);
        the schedule ends there: the rate stays at ``factor`` times its peak."""
        groups = getattr(getattr(self, "opt", None), "param_groups", [])
        sched = getattr(self, "sched", None)
        peaks = list(sched.base_lrs) if sched is not None else [g["lr"] for g in groups]
        self.sched = None
        for group, peak in zip(groups, peaks):
            group["lr"] = peak * float(factor)

    def primal_optimizer(self, params, lr: float, weight_decay: float = 0.0):
        """AdamW with ``formulation.adam_betas`` (its schedule: :meth:`schedule_primal`)."""
        from ..optim import adamw

        return adamw(params, self.cfg, lr, weight_decay)

    def schedule_primal(self, total_steps: int | None = None) -> None:
        """Attach the learning-rate schedule to ``self.opt`` (called once the optimiser exists)."""
        from ..optim import lr_schedule

        if total_steps is None:
            total_steps = int(self.cfg.dual_steps) * int(self.cfg.primal_steps_per_dual)
        self.sched = lr_schedule(self.opt, self.cfg, total_steps)

    def _params(self) -> list:
        """The optimiser's parameters (the trainable ones), without walking the whole network each step."""
        return [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]

    def _backward(self, part: PrimalLoss, k: int) -> None:
        """Accumulate one micro-batch's gradient (``1/k`` of the update); each clipped term's gradient
        is clipped to its norm on this micro-batch before it is added."""
        terms = [(t, float(c)) for t, c in part.clipped if float(c) > 0]
        params = self._params() if terms else []
        rest = part.loss
        for term, max_norm in terms:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            scale = min(1.0, max_norm / (float(norm) + 1e-6)) / k
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g * scale if p.grad is None else p.grad + g * scale
            rest = rest - term
        (rest / k).backward()

    def _update(self) -> None:
        """The optimiser step after the micro-batches: data-parallel averaging, the total gradient's
        clip (``formulation.grad_clip``), the step and the schedule's step."""
        from ..distributed import get_dist

        get_dist().average_gradients(self._params())  # data-parallel ranks
        clip = float(self.cfg.grad_clip)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params(), clip)
        self.opt.step()
        if getattr(self, "sched", None) is not None:
            self.sched.step()
