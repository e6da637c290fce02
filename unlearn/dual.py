"""Multipliers and how they move: dual ascent (constrained) or fixed weights (baselines).

Dual ascent uses cooper's :class:`~cooper.multipliers.DenseMultiplier` (non-negativity by
projection after each step) and a torch optimiser over it with ``maximize=True``; its gradient
is the constraint violation, so a violated constraint raises its multiplier. We do not use
cooper's ``ConstrainedOptimizer.roll()``: our primal and dual steps run at different rates
(several primal steps per dual step, none at all for RU's dual-only algorithm), and RU needs an
extra projection (``sum mu < 1``) that the formulation supplies.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import ConfigError


class Multipliers:
    """Interface: ``value()`` and ``update(violation)``; ``violation > 0`` means violated."""

    learnable = False

    def value(self) -> torch.Tensor:
        raise NotImplementedError

    def update(self, violation: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"value": self.value().clone()}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class DualAscent(Multipliers):
    """Projected (sub)gradient ascent on the dual, ``mu <- proj(mu + eta_d * violation)``."""

    learnable = True
    OPTIMIZERS = ("sgd", "adam", "nupi")

    def __init__(self, num: int, lr: float, init: float | list = 0.0, optimizer: str = "sgd",
                 projection: Callable[[torch.Tensor], torch.Tensor] | None = None, kp: float = 0.0,
                 ema_nu: float = 0.0):
        import cooper

        if lr <= 0:
            raise ConfigError(f"method.dual_lr must be > 0 (got {lr})")
        if optimizer not in self.OPTIMIZERS:
            raise ConfigError(f"method.dual_optimizer must be one of {list(self.OPTIMIZERS)} (got {optimizer!r})")
        init_t = torch.as_tensor(init, dtype=torch.float32).flatten()
        if init_t.numel() == 1:
            init_t = init_t.expand(num).clone()
        self.multiplier = cooper.multipliers.DenseMultiplier(init=init_t.clone())
        self.multiplier.set_constraint_type(cooper.ConstraintType.INEQUALITY)
        if optimizer == "nupi":  # PI control of the multipliers: Kp damps the oscillations of plain ascent
            self.optimizer = cooper.optim.nuPI(self.multiplier.parameters(), lr=lr, Kp=torch.tensor(float(kp)),
                                               Ki=torch.tensor(1.0), ema_nu=float(ema_nu), maximize=True)
        else:
            opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
            self.optimizer = opt_cls(self.multiplier.parameters(), lr=lr, maximize=True)
        self.projection = projection

    def value(self) -> torch.Tensor:
        return self.multiplier().detach()

    def update(self, violation: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.multiplier.weight.grad = torch.as_tensor(violation, dtype=torch.float32).detach().clone()
        self.optimizer.step()
        self.multiplier.post_step_()
        if self.projection is not None:
            with torch.no_grad():
                self.multiplier.weight.copy_(self.projection(self.multiplier.weight.data))

    def state_dict(self) -> dict:
        return {"value": self.value().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.multiplier.weight.copy_(state["value"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


class FixedMultipliers(Multipliers):
    """The weight-based baselines: multipliers never move (dual step size 0)."""

    def __init__(self, values: torch.Tensor):
        self._value = torch.as_tensor(values, dtype=torch.float32).flatten().clone()

    def value(self) -> torch.Tensor:
        return self._value.clone()

    def update(self, violation: torch.Tensor) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        self._value = state["value"].clone()


def build_multipliers(method_cfg, formulation) -> Multipliers:
    """The method config picks the class (``method._target_``): dual ascent or fixed weights."""
    from hydra.utils import get_class

    target = str(method_cfg.get("_target_", ""))
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"method._target_ must name a multipliers class, e.g. unlearn.dual.DualAscent "
                          f"(got {target!r})") from None
    return cls.from_config(method_cfg, formulation)


def _dual_from_config(cls, cfg, formulation):
    return cls(formulation.num_constraints, float(cfg.dual_lr), init=float(cfg.get("init", 0.0)),
               optimizer=str(cfg.get("dual_optimizer", "sgd")), projection=formulation.project,
               kp=float(cfg.get("dual_kp", 0.0)), ema_nu=float(cfg.get("dual_ema_nu", 0.0)))


def _fixed_from_config(cls, cfg, formulation):
    if cfg.get("multiplier") is None:
        raise ConfigError("method.multiplier must be set for method=baseline (a number >= 0, or one per constraint)")
    from omegaconf import OmegaConf

    value = cfg.multiplier
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    try:
        value = torch.as_tensor(value, dtype=torch.float32)
    except Exception:
        raise ConfigError(f"method.multiplier must be a number or a list of numbers (got {value!r})") from None
    return cls(formulation.baseline_multipliers(value))


DualAscent.from_config = classmethod(_dual_from_config)
FixedMultipliers.from_config = classmethod(_fixed_from_config)
