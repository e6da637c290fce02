"""Sequential Monte Carlo for geometric products of diffusion models (Feynman-Kac correctors).

The RU target ``p_pre^{1+c} prod_i q_i^{-c_i}`` (``c_i = mu_i / (1 - mu_bar)``) is a product
``prod_k p_k^{a_k}`` with ``sum_k a_k = 1``. Sampling with the composed score ``sum_k a_k s_k`` does
not sample it: the product of the noised marginals is not the marginal of a diffusion. Under the
forward VP process ``dx = -beta x / 2 dt + sqrt(beta) dW`` each marginal obeys the Fokker-Planck
equation; the product ``gamma_t = prod_k p_{k,t}^{a_k}`` obeys it up to the potential

    g(x, t) = beta(t) / 2 * sum_{k<l} a_k a_l ||s_k - s_l||^2,

because the Laplacian terms are linear in ``log gamma`` and cancel when ``sum a_k = 1``. So along the
reverse sampler (reverse time ``tau``) each particle carries ``d log w = -g dtau`` (Feynman-Kac), and
``log Z_0 = log int gamma_0`` is the mean weight's log (``gamma_T`` is ``N(0, I)`` up to ``abar_T``).
With ``s = -eps / sqrt(1 - abar)`` and ``int beta dt = log(abar_s / abar_t)`` over a step ``t -> s``:

    delta log w = -log(abar_s / abar_t) / (2 (1 - abar_t)) * sum_{k<l} a_k a_l ||eps_k - eps_l||^2.

For two Gaussians of unit width this recovers ``log Z_0 = c (1 + c) ||m_p - m_q||^2 / 2`` exactly; the
tests check the sampler against the GMM oracle's exact targets. Particles are resampled
(systematically) whenever their effective sample size falls below ``resample_below`` of ``n``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .models.base import ScoreModel
from .samplers import GaussianSampler


@dataclass
class WeightedParticles:
    """Particles with normalised log-weights, ``log Z`` of their target and the run's ESS history."""

    x: torch.Tensor
    log_w: torch.Tensor  # normalised: logsumexp(log_w) = 0
    log_z: float
    ess_history: list[float]
    resamples: int

    @property
    def ess(self) -> float:
        return float(1.0 / torch.exp(2 * self.log_w).sum())


def systematic_resample(log_w: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` indices: evenly spaced quantiles of the weights' CDF from one uniform offset."""
    w = torch.softmax(log_w.double(), 0)
    u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    cdf = torch.cumsum(w, 0)
    return torch.searchsorted(cdf, u * cdf[-1]).clamp(max=len(w) - 1)


def product_smc(sampler: GaussianSampler, models: Sequence[ScoreModel], coefs: Sequence[float], n: int,
                generator: torch.Generator | None = None, conds: Sequence | None = None,
                resample_below: float = 0.5) -> WeightedParticles:
    """Weighted samples of ``prod_k p_k^{a_k} / Z`` (``coefs`` = ``a``, summing to 1) and ``log Z``."""
    a = torch.as_tensor(list(coefs), dtype=torch.float64)
    if abs(float(a.sum()) - 1.0) > 1e-6:
        raise ValueError(f"product_smc needs coefficients summing to 1 (got {a.tolist()})")
    models = list(models)
    conds = list(conds) if conds is not None else [None] * len(models)
    p = next(iter(models[0].parameters()), None)
    device = p.device if p is not None else "cpu"
    x = sampler.prior(n, models[0].sample_shape, generator, device)
    log_w = torch.zeros(n, dtype=torch.float64)
    log_z, ess_hist, resamples = 0.0, [], 0
    abar = sampler.schedule.abar
    pairs = [(k, l) for k in range(len(models)) for l in range(k + 1, len(models))]
    with torch.no_grad():
        for k, t in enumerate(sampler.timesteps):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = [m.eps(x, tt, c) for m, c in zip(models, conds)]
            ab_t = float(abar[t])
            last = k + 1 == sampler.num_steps
            ab_s = 1.0 if last else float(abar[sampler.timesteps[k + 1]])
            ab_p = ab_t if k == 0 else float(abar[sampler.timesteps[k - 1]])
            # trapezoid over abar of h = ||s_k - s_l||^2 / abar (constant for Gaussian shifts): this point
            # covers half of the interval before it and half of the one after (all of the last one)
            span = (ab_t - ab_p) / 2 + (ab_s - ab_t) * (1.0 if last else 0.5)
            scale = -span / (2.0 * (1.0 - ab_t) * ab_t)
            pot = torch.zeros(n, dtype=torch.float64)
            for i, j in pairs:
                pot += float(a[i] * a[j]) * ((eps[i] - eps[j]).flatten(1).double() ** 2).sum(1).cpu()
            log_w = log_w + scale * pot
            ess = float(1.0 / torch.softmax(log_w, 0).pow(2).sum())
            ess_hist.append(round(ess, 1))
            eps_c = sum(float(w) * e for w, e in zip(a, eps))
            if ess < resample_below * n and k + 1 < sampler.num_steps:
                log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
                idx = systematic_resample(log_w, n, generator).to(x.device)
                x, eps_c = x[idx], eps_c[idx]
                log_w = torch.zeros(n, dtype=torch.float64)
                resamples += 1
            mean = sampler.mean(x, eps_c, k)
            if sampler.stochastic(k):
                x = mean + sampler.s[k] * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            else:
                x = mean
    lse = torch.logsumexp(log_w, 0)
    log_z += float(lse) - math.log(n)
    return WeightedParticles(x=x.detach(), log_w=log_w - lse, log_z=log_z, ess_history=ess_hist,
                             resamples=resamples)
