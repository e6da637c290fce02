"""The interface every formulation implements, shared by the primal-dual driver."""
from __future__ import annotations

from dataclasses import dataclass

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

    def __init__(self, cfg: DictConfig, setup: UnlearningSetup, sampler: GaussianSampler, generator: torch.Generator,
                 fixed_multipliers: bool, show_progress: bool = True):
        self.cfg, self.setup, self.sampler, self.gen = cfg, setup, sampler, generator
        self.fixed = fixed_multipliers
        self.show_progress = show_progress
        factor = float(cfg.threshold_factor)
        if not factor > 0:
            raise ConfigError(f"formulation.threshold_factor must be > 0 (got {factor})")
        self.factor = factor

    @classmethod
    def check_config(cls, cfg: DictConfig, fixed: bool) -> None:
        """Checks that need no model, run before any pretraining (override to add more).
        ``threshold_factor > 0`` is checked by :func:`unlearn.config.validate_config` before this."""
        if fixed:
            vals = cls.fixed_multiplier_values(cfg)
            if any(x < 0 for x in vals):
                raise ConfigError(f"method.multiplier must be >= 0 (got {vals})")

    @staticmethod
    def fixed_multiplier_values(cfg: DictConfig) -> list[float]:
        """``method.multiplier`` as a list of floats (one number gives a one-element list)."""
        from omegaconf import OmegaConf

        v = cfg.method.get("multiplier")
        if v is None:
            raise ConfigError("method.multiplier must be set for method=baseline (a number >= 0, or one per constraint)")
        vals = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        vals = vals if isinstance(vals, list) else [vals]
        try:
            return [float(x) for x in vals]
        except (TypeError, ValueError):
            raise ConfigError(f"method.multiplier must be a number or a list of numbers (got {v!r})") from None

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

    def baseline_multipliers(self, value) -> torch.Tensor:
        v = torch.as_tensor(value, dtype=torch.float32).flatten()
        if v.numel() == 1:
            v = v.expand(self.num_constraints).clone()
        if v.numel() != self.num_constraints:
            raise ConfigError(f"method.multiplier must be one number or a list of {self.num_constraints} "
                              f"(got {v.numel()})")
        if bool((v < 0).any()):
            raise ConfigError(f"method.multiplier must be >= 0 (got {v.tolist()})")
        return v

    # -- primal ------------------------------------------------------------------------------
    def primal_step(self, multipliers: torch.Tensor) -> dict:
        return {}

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
        self.gen.set_state(state["generator"])

    def trainable_state(self) -> dict:
        own = getattr(self.setup.model, "trainable_state", None)  # e.g. LoRA views: adapters only
        if callable(own):
            return own()
        return {k: v.detach().cpu() for k, v in self.setup.model.state_dict().items()}

    def scale_primal_lr(self, factor: float) -> None:
        """Multiply the primal optimiser's learning rate (e.g. to settle the fit after the dual steps)."""
        for group in getattr(getattr(self, "opt", None), "param_groups", []):
            group["lr"] = group["lr"] * float(factor)

    def primal_optimizer(self, params, lr: float, weight_decay: float = 0.0):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, optional gradient-norm clipping (``formulation.grad_clip``), step of ``self.opt``."""
        from ..distributed import get_dist

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        get_dist().average_gradients(self.setup.model.trainable_parameters())  # data-parallel ranks
        clip = float(self.cfg.get("grad_clip", 0.0))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.setup.model.trainable_parameters(), clip)
        self.opt.step()
