"""Multipliers and how they move: dual ascent (constrained) or fixed weights (baselines).

The methods (``unlearn/methods/``) build them from ``cfg.method``.

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

    def update(self, violation: torch.Tensor, jacobian: torch.Tensor | None = None,
               trusted: Callable[[torch.Tensor], bool] | None = None,
               recenter: Callable[[torch.Tensor], bool] | None = None,
               noise: torch.Tensor | None = None) -> None:
        """``jacobian``: ``d violation / d mu`` where the formulation knows it; ``trusted(mu)``: whether
        its estimates hold at ``mu``; ``recenter(mu)``: move them there if it can (returns whether it
        moved them); ``noise``: the standard error of each violation. A rule keeps its iterates where
        the estimates hold."""
        raise NotImplementedError

    def oscillation(self, history_mu: list[list[float]]) -> dict:
        return {}

    def set_value(self, mu: torch.Tensor) -> None:
        """Put the multipliers at ``mu`` (e.g. their average, before the final fit continues from it)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"value": self.value().clone()}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class DualAscent(Multipliers):
    """Projected ascent on the dual: ``mu <- proj(mu + step)``, the step from one of two rules.

    ``rule="newton"`` (the default): ``step = -damping * H^{-1} v`` with ``v`` the violation and
    ``H = dv/dmu`` the dual's curvature, which the formulation estimates where it can
    (:meth:`~unlearn.formulations.base.Formulation.dual_jacobian`: RU's ratio estimator exactly on its
    pool, LU from the covariance of the likelihoods under the model). The step has the multipliers'
    own units whatever the units of the constraints, so the same setting converges on constraints
    of 20 nats and of 200. Where the formulation knows the standard error ``se`` of its estimates
    (LU), each entry of the step is multiplied by ``v^2 / (v^2 + se^2)``: a violation within the
    estimate's noise moves its multiplier little, so the iterates do not random-walk on the noise. Only the active constraints (``mu > 0`` or violated) enter the solve;
    each multiplier at most ``max_growth``-folds and at most halves per step (a constraint that
    hardly responds has a tiny curvature and would otherwise jump). Where the formulation has no
    curvature the step is the ``plain`` one. Every step is shortened (halved, up to 30 times)
    until ``trusted(mu)`` holds -- the formulation's estimators are reliable there (e.g. RU's
    importance weights keep their effective sample size); then ``recenter(mu)`` lets the formulation
    move its estimator to the new iterate (RU: a new importance pool drawn by sequential Monte Carlo
    once the old one's weights have spread), so the next step is trusted further on.

    ``rule="plain"``: ``step = lr * v`` through a torch optimiser (``sgd``, ``adam`` or cooper's
    PI controller ``nupi``), the paper's dual ascent; its step size carries the constraints' units.

    Every update records whether each violation changed sign; :meth:`oscillation` summarises the
    sign flips and the multipliers' spread over the second half of the run.
    """

    learnable = True
    OPTIMIZERS = ("sgd", "adam", "nupi")
    RULES = ("newton", "plain")

    def __init__(self, num: int, lr: float, init: float | list = 0.0, optimizer: str = "sgd",
                 projection: Callable[[torch.Tensor], torch.Tensor] | None = None, kp: float = 0.0,
                 ema_nu: float = 0.0, rule: str = "plain", damping: float = 1.0, max_growth: float = 3.0):
        import cooper

        if lr <= 0:
            raise ConfigError(f"method.dual_lr must be > 0 (got {lr})")
        if optimizer not in self.OPTIMIZERS:
            raise ConfigError(f"method.dual_optimizer must be one of {list(self.OPTIMIZERS)} (got {optimizer!r})")
        if rule not in self.RULES:
            raise ConfigError(f"method.dual_step must be one of {list(self.RULES)} (got {rule!r})")
        if not 0 < damping <= 1:
            raise ConfigError(f"method.newton_damping must be in (0, 1] (got {damping})")
        if not max_growth > 1:
            raise ConfigError(f"method.newton_max_growth must be > 1 (got {max_growth})")
        self.rule, self.damping, self.max_growth, self.lr = rule, float(damping), float(max_growth), float(lr)
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
        self.signs: list[list[int]] = []  # sign of each violation at each update
        self.rules_used: list[str] = []   # which rule each update took ("newton", "plain"), and "+trust" when shortened

    def value(self) -> torch.Tensor:
        return self.multiplier().detach()

    def set_value(self, mu: torch.Tensor) -> None:
        self._set(torch.as_tensor(mu, dtype=torch.float32))

    def _set(self, mu: torch.Tensor) -> None:
        with torch.no_grad():
            self.multiplier.weight.copy_(mu)
        self.multiplier.post_step_()  # non-negativity
        if self.projection is not None:
            with torch.no_grad():
                self.multiplier.weight.copy_(self.projection(self.multiplier.weight.data))

    def _plain(self, violation: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.multiplier.weight.grad = violation.clone()
        self.optimizer.step()
        self.multiplier.post_step_()
        if self.projection is not None:
            with torch.no_grad():
                self.multiplier.weight.copy_(self.projection(self.multiplier.weight.data))
        return self.value()

    def newton_step(self, mu: torch.Tensor, violation: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
        """``-damping H^{-1} v`` over the active constraints, each entry capped (see the class)."""
        mu64, v, h = mu.double(), violation.double(), torch.as_tensor(jacobian, dtype=torch.float64)
        active = (mu64 > 0) | (v > 0)
        step = torch.zeros_like(mu64)
        if not bool(active.any()):
            return step
        idx = active.nonzero().flatten()
        sub = h[idx][:, idx]
        scale = sub.diagonal().abs().clamp(min=1e-300)
        sub = sub - 1e-9 * torch.diag(scale)  # H is negative (semi)definite: keep it invertible
        diag = -sub.diagonal().abs().clamp(min=1e-12 * float(scale.max()))  # per constraint, right sign
        cur = mu64[idx]
        lo = -0.5 * cur  # a positive multiplier at most halves per step ...
        hi = torch.where(cur > 0, (self.max_growth - 1) * cur, torch.full_like(cur, float("inf")))  # ... or grows
        try:
            d = self.damping * -torch.linalg.solve(sub, v[idx])
        except RuntimeError:
            d = None
        # the coupled step where it is an ascent direction within the caps; else each constraint on its own
        # (capping single entries of a coupled step would turn its direction)
        if (d is None or not bool(torch.isfinite(d).all()) or float(v[idx] @ d) < 0
                or bool(((d < lo) | (d > hi)).any())):
            d = torch.minimum(torch.maximum(self.damping * -v[idx] / diag, lo), hi)
        # no usable curvature (e.g. every sample of an estimate alike): that entry takes the plain step
        flat = ~torch.isfinite(d) | ~(sub.diagonal().abs() > 0) | ~torch.isfinite(sub.diagonal())
        d = torch.where(flat, self.lr * v[idx], d)
        step[idx] = d
        return step

    def update(self, violation: torch.Tensor, jacobian: torch.Tensor | None = None,
               trusted: Callable[[torch.Tensor], bool] | None = None,
               recenter: Callable[[torch.Tensor], bool] | None = None,
               noise: torch.Tensor | None = None) -> None:
        violation = torch.as_tensor(violation, dtype=torch.float32).detach().flatten()
        # a violation within two standard errors of 0 has no sign: flips on the noise are not oscillation
        sig = torch.ones_like(violation, dtype=torch.bool) if noise is None else \
            violation.abs() > 2 * torch.as_tensor(noise, dtype=torch.float32).flatten()
        self.signs.append([int(torch.sign(v)) if k else 0 for v, k in zip(violation, sig)])
        old = self.value().clone()
        if self.rule == "newton" and jacobian is not None:
            step = self.newton_step(old, violation, jacobian)
            if noise is not None:  # shrink each entry by its violation's signal-to-noise ratio
                v2, se2 = violation.double() ** 2, torch.as_tensor(noise, dtype=torch.float64).flatten() ** 2
                step = step * v2 / (v2 + se2).clamp(min=1e-300)
            self._set((old.double() + step).float())
            used = "newton"
        else:
            self._plain(violation)
            used = "plain"
        new = self.value().clone()
        if trusted is not None and not trusted(new):  # the largest fraction of the step the estimates hold at
            step = new - old
            for _ in range(30):
                step = step / 2
                if trusted(old + step):
                    break
            else:
                step = torch.zeros_like(step)
            self._set(old + step)
            used += "+trust"
        if recenter is not None and recenter(self.value().clone()):
            used += "+recenter"  # the formulation moved its estimator to the new iterate
        self.rules_used.append(used)

    def oscillation(self, history_mu: list[list[float]]) -> dict:
        """Over the second half of the updates: the share of consecutive sign flips of each violation
        while its multiplier is positive (among pairs of violations beyond two standard errors), and
        each multiplier's range over its mean; ``oscillating`` when both are large (> 0.6, > 0.5)."""
        n = len(self.signs)
        if n < 4:
            return {}
        half = self.signs[n // 2:]
        mus = torch.tensor(history_mu[len(history_mu) - len(half):], dtype=torch.float64)
        flips, spread = [], []
        for i in range(len(half[0])):
            s = [row[i] for row in half]
            pos = mus[:, i] > 0
            pairs = [(a, b) for k, (a, b) in enumerate(zip(s, s[1:]))
                     if (bool(pos[k]) or bool(pos[k + 1])) and a != 0 and b != 0]
            flips.append(round(sum(a * b < 0 for a, b in pairs) / max(len(pairs), 1), 3))
            m = float(mus[:, i].mean())
            spread.append(round(float(mus[:, i].max() - mus[:, i].min()) / m, 3) if m > 0 else 0.0)
        osc = [f > 0.6 and r > 0.5 for f, r in zip(flips, spread)]
        return {"sign_flip_share": flips, "multiplier_spread": spread, "oscillating": any(osc)}

    def state_dict(self) -> dict:
        return {"value": self.value().clone(), "optimizer": self.optimizer.state_dict(), "signs": list(self.signs),
                "rules_used": list(self.rules_used)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.multiplier.weight.copy_(state["value"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.signs = [list(r) for r in state.get("signs", [])]
        self.rules_used = list(state.get("rules_used", []))


class FixedMultipliers(Multipliers):
    """The weight-based baselines: multipliers never move (dual step size 0)."""

    def __init__(self, values: torch.Tensor):
        self._value = torch.as_tensor(values, dtype=torch.float32).flatten().clone()

    def value(self) -> torch.Tensor:
        return self._value.clone()

    def update(self, violation: torch.Tensor, jacobian=None, trusted=None, recenter=None, noise=None) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        self._value = state["value"].clone()

    def set_value(self, mu: torch.Tensor) -> None:
        return None
