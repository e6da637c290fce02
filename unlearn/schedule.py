"""DDPM noise schedules and log-SNR bookkeeping (formulas.md, notation)."""
from __future__ import annotations

import torch


class NoiseSchedule:
    """Discrete DDPM schedule with timesteps ``t = 0 .. T-1``.

    ``x_t = sqrt(abar[t]) x_0 + sqrt(1 - abar[t]) e`` (the diffusers convention: index 0 is
    the least noisy step). ``log_snr[t] = log(abar[t] / (1 - abar[t]))`` decreases in ``t``.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D tensor with at least two entries")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.log_snr = torch.log(self.abar) - torch.log1p(-self.abar)

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000):
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000):
        """Stable Diffusion's schedule (linear in sqrt(beta))."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2)

    @property
    def T(self) -> int:
        return len(self.betas)

    def abar_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar[t]`` broadcast to the shape of ``like`` (batch first)."""
        a = self.abar.to(like.device)[t.long().to(like.device)].to(like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar_at(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def log_snr_weights(self) -> torch.Tensor:
        """Quadrature weights over log-SNR for the integral of Lemma 2 (formulas.md section 2).

        The weight of step ``t`` is ``(g_{t-1} - g_t) / 2`` with the convention
        ``g_{-1} := g_0 + (g_0 - g_1)`` for the least noisy step.
        """
        g = self.log_snr
        g_prev = torch.cat([g[:1] + (g[0] - g[1]), g[:-1]])
        return (g_prev - g) / 2.0

    def to_dict(self) -> dict:
        return {"T": self.T, "beta_first": float(self.betas[0]), "beta_last": float(self.betas[-1])}


def build_schedule(kind: str, beta_start: float, beta_end: float, num_timesteps: int) -> NoiseSchedule:
    kinds = {"linear": NoiseSchedule.linear, "scaled_linear": NoiseSchedule.scaled_linear}
    if kind not in kinds:
        from .config import ConfigError

        raise ConfigError(f"model.schedule must be one of {sorted(kinds)} (got {kind!r})")
    return kinds[kind](beta_start, beta_end, num_timesteps)
