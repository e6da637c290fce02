"""Gaussian ancestral samplers (DDPM and DDIM(eta)) with exact per-step log-probabilities.

Every step ``t -> s`` is ``x_s ~ N(a x_t - c eps(x_t, t), s^2 I)`` (formulas.md section 2), so
the per-step log-density (with its ``1/s^2`` factor) and the per-step KL between two models are
available for the estimators and for policy gradients. Steps with ``s = 0`` (DDIM's last step)
are deterministic; they are excluded from log-probabilities and path KLs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .models.base import ScoreModel, draw_conditions, restore_conditions
from .schedule import NoiseSchedule


@dataclass
class Trajectory:
    """A sampled chain: ``states[k]`` is the input of step ``k``, ``states[k+1]`` its output."""

    states: list[torch.Tensor]
    timesteps: list[int]
    log_prob: torch.Tensor | None = None  # (N,) sum of per-step log-probs under the sampling model
    eps: list[torch.Tensor] = field(default_factory=list)  # sampling model's eps at each step
    conditions: list = field(default_factory=list)  # the prompt tables' draws (models.base.draw_conditions)

    @property
    def x0(self) -> torch.Tensor:
        return self.states[-1]


class GaussianSampler:
    """A sampler on a subsequence of the schedule's timesteps.

    ``kind="ddpm"``: ancestral DDPM with strided betas ``beta' = 1 - abar_t / abar_s`` and
    variance ``s^2 = beta'`` (``variance="beta"``, the choice of formulas.md) or the posterior
    variance (``variance="posterior"``). ``kind="ddim"``: DDIM with stochasticity ``eta``.
    """

    KINDS = ("ddpm", "ddim")

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 100, kind: str = "ddpm", eta: float = 1.0,
                 variance: str = "beta", timesteps: Sequence[int] | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"sampler.kind must be one of {list(self.KINDS)} (got {kind!r})")
        if variance not in ("beta", "posterior"):
            raise ValueError(f"sampler.variance must be 'beta' or 'posterior' (got {variance!r})")
        self.schedule, self.kind, self.eta, self.variance = schedule, kind, float(eta), variance
        if timesteps is None:
            if not 1 <= num_steps <= schedule.T:
                raise ValueError(f"sampler.num_steps must be in 1..{schedule.T} (got {num_steps})")
            ts = torch.linspace(schedule.T - 1, 0, num_steps).round().long().tolist()
            self.timesteps = sorted(set(ts), reverse=True)
        else:
            ts = [int(t) for t in timesteps]
            if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] > schedule.T - 1 or ts[-1] < 0:
                raise ValueError(f"sampler timesteps must be strictly decreasing within 0..{schedule.T - 1} (got {ts})")
            self.timesteps = ts
        a, c, s = [], [], []
        abar = schedule.abar
        for k, t in enumerate(self.timesteps):
            ab_t = float(abar[t])
            ab_s = float(abar[self.timesteps[k + 1]]) if k + 1 < len(self.timesteps) else 1.0
            if kind == "ddpm":
                alpha = ab_t / ab_s
                beta = 1.0 - alpha
                var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
                a.append(1.0 / math.sqrt(alpha))
                c.append(beta / (math.sqrt(alpha) * math.sqrt(1 - ab_t)))
                s.append(math.sqrt(var))
            else:
                sig = self.eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(max(1 - ab_t / ab_s, 0.0))
                a.append(math.sqrt(ab_s / ab_t))
                c.append(math.sqrt(ab_s) * math.sqrt(1 - ab_t) / math.sqrt(ab_t) - math.sqrt(max(1 - ab_s - sig**2, 0.0)))
                s.append(sig)
        self.a, self.c, self.s = a, c, s

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def from_timestep(self, t: int, num_steps: int | None = None) -> "GaussianSampler":
        """The same kind of sampler started at timestep ``t`` instead of ``T-1``.

        Its timesteps are ``t`` followed by this sampler's timesteps below ``t`` (``num_steps=None``),
        or ``num_steps`` timesteps evenly spaced from ``t`` down to 0. Sample it with
        ``x_T=x_t`` (e.g. ``schedule.add_noise(x0, noise, t)``) to denoise a noised input.
        """
        t = int(t)
        if not 0 <= t <= self.schedule.T - 1:
            raise ValueError(f"start timestep must be in 0..{self.schedule.T - 1} (got {t})")
        if num_steps is None:
            ts = [t] + [s for s in self.timesteps if s < t]
        else:
            if int(num_steps) < 1:
                raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
            ts = sorted(set(torch.linspace(t, 0, int(num_steps)).round().long().tolist()), reverse=True)
        return GaussianSampler(self.schedule, kind=self.kind, eta=self.eta, variance=self.variance, timesteps=ts)

    def stochastic(self, k: int) -> bool:
        return self.s[k] > 0

    def kl_weight(self, k: int) -> float:
        """``c_t^2 / (2 s_t^2)``: per-step KL = weight * ||eps_1 - eps_2||^2 (0 for deterministic steps)."""
        return self.c[k] ** 2 / (2 * self.s[k] ** 2) if self.stochastic(k) else 0.0

    def mean(self, x: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        return self.a[k] * x - self.c[k] * eps

    def step_log_prob(self, x_next: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        """``log N(x_next; a x - c eps, s^2 I)`` per sample (0 for deterministic steps)."""
        if not self.stochastic(k):
            return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        d = x[0].numel()
        r = (x_next - self.mean(x, eps, k)).flatten(1)
        return -(r**2).sum(1) / (2 * self.s[k] ** 2) - 0.5 * d * math.log(2 * math.pi * self.s[k] ** 2)

    def prior(self, n: int, shape: Sequence[int], generator=None, device="cpu", dtype=torch.float32):
        # drawn where the generator lives (the CPU), then moved: the same numbers on every device
        return torch.randn(n, *shape, generator=generator, dtype=dtype).to(device)

    def sample(self, model: ScoreModel, n: int, generator: torch.Generator | None = None, cond=None,
               grad: bool = False, record: bool = False, log_prob: bool = False,
               x_T: torch.Tensor | None = None, callback: Callable | None = None) -> Trajectory:
        """Sample ``n`` chains from ``model``.

        ``grad=True`` keeps the autograd graph through the whole chain (reparameterised
        sampling: gradients of a function of ``x0`` reach the model's parameters).
        ``record=True`` keeps every state (for policy gradients and path KLs).
        ``callback(k, t, x, eps)`` is called at each step (e.g. to accumulate KL terms).
        """
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
        x = x_T if x_T is not None else self.prior(n, model.sample_shape, generator, device)
        drawn = draw_conditions(model, x.shape[0], generator)  # each chain's prompt, where the model has a distribution
        states, eps_list = [x], []
        lp = torch.zeros(x.shape[0], device=x.device) if log_prob else None
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for k, t in enumerate(self.timesteps):
                tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                eps = model.eps(x, tt, cond)
                if callback is not None:
                    callback(k, t, x, eps)
                mean = self.mean(x, eps, k)
                if self.stochastic(k):
                    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                    x_next = mean + self.s[k] * noise
                else:
                    x_next = mean
                if log_prob:
                    lp = lp + self.step_log_prob(x_next.detach() if not grad else x_next, x, eps, k)
                x = x_next if grad else x_next.detach()
                if record:
                    states.append(x)
                    eps_list.append(eps if grad else eps.detach())
        if not record:
            states = [states[0], x]
        return Trajectory(states=states, timesteps=list(self.timesteps), log_prob=lp, eps=eps_list, conditions=drawn)

    def step_terms(self, model: ScoreModel, traj: Trajectory, reference: ScoreModel | None = None, cond=None,
                   ref_cond=None, num_steps: int | None = None, generator: torch.Generator | None = None):
        """Per-sample ``sum_k log p_model(x_{k+1} | x_k)`` and ``sum_k KL_k(model || reference)``
        along a recorded trajectory, in one batched call (differentiable in ``model``).

        States are treated as fixed (stop-gradient). ``num_steps`` < number of stochastic steps
        evaluates a random subset of steps and rescales the sums (unbiased), as DPOK does.
        Returns ``(log_prob, kl)``; ``kl`` is ``None`` without a reference.
        """
        if len(traj.states) != self.num_steps + 1:
            raise ValueError("step_terms needs a trajectory sampled with record=True")
        restore_conditions(traj.conditions)  # each chain's prompt as sampled (a prompt distribution)
        stoch = [k for k in range(self.num_steps) if self.stochastic(k)]
        steps = stoch
        scale = 1.0
        if num_steps is not None and 0 < num_steps < len(stoch):
            perm = torch.randperm(len(stoch), generator=generator)[:num_steps]
            steps = [stoch[int(i)] for i in perm]
            scale = len(stoch) / num_steps
        n = traj.states[0].shape[0]
        x = torch.cat([traj.states[k].detach() for k in steps])
        x_next = torch.cat([traj.states[k + 1].detach() for k in steps])
        tt = torch.cat([torch.full((n,), self.timesteps[k], dtype=torch.long) for k in steps]).to(x.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = torch.tensor([self.a[k] for k in steps], dtype=x.dtype, device=x.device).repeat_interleave(n).view(shape)
        c = torch.tensor([self.c[k] for k in steps], dtype=x.dtype, device=x.device).repeat_interleave(n).view(shape)
        s2 = torch.tensor([self.s[k] ** 2 for k in steps], dtype=x.dtype, device=x.device).repeat_interleave(n)
        eps = model.eps(x, tt, cond)
        d = x[0].numel()
        r = (x_next - (a * x - c * eps)).flatten(1)
        logp = -(r**2).sum(1) / (2 * s2) - 0.5 * d * torch.log(2 * torch.pi * s2)
        logp = logp.view(len(steps), n).sum(0) * scale
        kl = None
        if reference is not None:
            with torch.no_grad():
                e_ref = reference.eps(x, tt, ref_cond)
            w = (c.flatten() ** 2) / (2 * s2)
            kl = (w * ((eps - e_ref).flatten(1) ** 2).sum(1)).view(len(steps), n).sum(0) * scale
        return logp, kl

    def trajectory_log_prob(self, model: ScoreModel, traj: Trajectory, cond=None) -> torch.Tensor:
        """Recompute ``sum_k log p_model(x_{k+1} | x_k)`` along a recorded trajectory (with grad)."""
        return self.step_terms(model, traj, cond=cond)[0]


def build_sampler(schedule: NoiseSchedule, cfg) -> GaussianSampler:
    return GaussianSampler(schedule, num_steps=int(cfg.num_steps), kind=str(cfg.kind), eta=float(cfg.eta),
                           variance=str(cfg.variance))
