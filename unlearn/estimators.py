"""Estimators of formulas.md section 2, written once for every score model.

* :func:`pathwise_kl` - KL between the path measures of two samplers (Lemma 3) with the exact
  per-step weights ``c_t^2 / (2 s_t^2)``.
* :func:`log_likelihood_ratio` - ``log q(x) - log p(x)`` from denoising errors integrated over
  log-SNR (Lemma 2), with common random numbers for both models.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .models.base import ScoreModel, eps_each
from .samplers import GaussianSampler, Trajectory
from .schedule import NoiseSchedule


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    return (v.flatten(1) ** 2).sum(1)


def pathwise_kl(model: ScoreModel, references: Sequence[ScoreModel], sampler: GaussianSampler, n: int,
                generator: torch.Generator | None = None, cond=None, ref_conds: Sequence | None = None,
                return_trajectory: bool = False):
    """Per-trajectory estimates of ``KL(P_model || P_ref)`` for each reference, shape (n, R).

    Trajectories are sampled from ``model``; at each stochastic step the KL between the two
    Gaussian transitions from the same state is ``c_t^2 ||eps_model - eps_ref||^2 / (2 s_t^2)``.
    The mean over trajectories is an unbiased estimate of the path KL (plus the prior KL, which
    is 0 since both start from the same N(0, I)).
    """
    refs = list(references)
    ref_conds = list(ref_conds) if ref_conds is not None else [cond] * len(refs)
    acc = torch.zeros(n, len(refs))

    def cb(k, t, x, eps):
        w = sampler.kl_weight(k)
        if w == 0.0:
            return
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        part = getattr(model, "part", None)  # a composed model's own predictions at this x, reused
        e_ref = [part(ref, x, rc) if part is not None else None for ref, rc in zip(refs, ref_conds)]
        todo = [j for j, e in enumerate(e_ref) if e is None]
        for j, e in zip(todo, eps_each([refs[j] for j in todo], x, tt, [ref_conds[j] for j in todo])):
            e_ref[j] = e
        for j, e in enumerate(e_ref):
            acc[:, j] += w * _sqnorm(eps - e).float().cpu()

    traj = sampler.sample(model, n, generator=generator, cond=cond, callback=cb, record=return_trajectory)
    return (acc, traj) if return_trajectory else acc


def trajectory_kl(model: ScoreModel, reference: ScoreModel, sampler: GaussianSampler, traj: Trajectory,
                  cond=None, ref_cond=None, num_steps: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample path KL along a recorded trajectory, differentiable in ``model``'s parameters.

    The states are treated as fixed (stop-gradient), as in DPOK's KL regulariser.
    """
    return sampler.step_terms(model, traj, reference, cond=cond, ref_cond=ref_cond, num_steps=num_steps,
                              generator=generator)[1]


def log_snr_timesteps(schedule: NoiseSchedule, num: int, generator: torch.Generator | None = None,
                      stratified: bool = True, proposal: torch.Tensor | None = None):
    """Timesteps drawn over log-SNR (stratified) and the importance weight of each.

    Returns ``(t, w)`` with ``sum_k w_k f(t_k)`` an unbiased estimate of
    ``sum_t ((g_{t-1} - g_t) / 2) f(t)``. Without ``proposal`` the draws are uniform over log-SNR;
    ``proposal`` (shape (T,), positive) draws ``t`` with probability proportional to it and
    reweights (see :func:`timestep_proposal`). ``num >= T`` returns the full quadrature.
    """
    wt = schedule.log_snr_weights()
    if num >= schedule.T:
        return torch.arange(schedule.T), wt.float()
    total = float(wt.sum())
    prob = wt / total if proposal is None else proposal.to(torch.float64) / float(proposal.sum())
    cdf = torch.cumsum(prob, 0)
    cdf = cdf / cdf[-1]
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.arange(num, dtype=torch.float64) + u) / num
    t = torch.searchsorted(cdf, u).clamp(max=schedule.T - 1)
    if proposal is None:
        return t, torch.full((num,), total / num)
    return t, (wt[t] / (num * prob[t])).float()


def _log_snr_bins(schedule: NoiseSchedule, bins: int):
    """``bins`` runs of timesteps of equal log-SNR length: each timestep's bin and each bin's middle timestep."""
    wt = schedule.log_snr_weights()
    pos = (torch.cumsum(wt, 0) - wt / 2) / wt.sum()  # each timestep's position in [0, 1] along log-SNR
    of_t = (pos * bins).long().clamp(0, bins - 1)
    mid = torch.searchsorted(pos, (torch.arange(bins, dtype=torch.float64) + 0.5) / bins).clamp(max=schedule.T - 1)
    return of_t, mid


def timestep_proposal(samples: Sequence[torch.Tensor], model_q: Sequence[ScoreModel], model_p: ScoreModel,
                      bins: int = 32, draws: int = 4, floor: float = 0.1, generator: torch.Generator | None = None,
                      cond_q: Sequence | None = None, cond_p=None) -> torch.Tensor:
    """A timestep proposal for :func:`log_likelihood_ratio` fitted on pilot samples ``samples[i] ~ q_i``.

    The estimator's integrand ``D_t = ||e - eps_p||^2 - ||e - eps_q||^2`` (antithetic pairs averaged)
    is largest, and noisiest, in a band of log-SNR that depends on the data. Drawing ``t`` with
    probability proportional to ``w_t sqrt(sum_i E[D_t^2])`` (the variance-minimising importance
    density, measured on ``bins`` log-SNR bins of equal length with ``draws`` noise pairs) instead of
    ``w_t`` lowers the estimator's variance at no cost per estimate (the improved-DDPM trick of
    loss-aware timestep sampling, applied to the likelihood ratio). The pilot samples come from the
    concepts because ``l_i = q_i / p`` matters where ``q_i`` has its mass; elsewhere ``l_i`` is
    near 0 whatever its error in log space. ``floor`` of the mass stays uniform over log-SNR
    (defensive importance sampling), so every timestep keeps a probability of at least
    ``floor * w_t / sum(w)``. Returns a probability vector of shape (T,).
    """
    schedule = model_p.schedule
    wt = schedule.log_snr_weights()
    of_t, mid = _log_snr_bins(schedule, bins)
    cond_q = list(cond_q) if cond_q is not None else [None] * len(model_q)
    m2 = torch.zeros(bins, dtype=torch.float64)
    mb = int(getattr(model_p, "max_batch", 0) or 0) or 65536
    for x, q, cq in zip(samples, model_q, cond_q):
        n = x.shape[0]
        if n == 0:
            continue
        per_chunk = max(1, mb // (2 * draws * n))  # bins per batch of the models
        for b0 in range(0, bins, per_chunk):
            tb = mid[b0:b0 + per_chunk]
            k = len(tb) * draws
            e = torch.randn((k, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
            e = torch.cat([e, -e])
            t_rows = tb.repeat_interleave(draws).repeat(2).repeat_interleave(n).to(x.device)
            e_rows = e.reshape(2 * k * n, *x.shape[1:])
            xt = schedule.add_noise(x.repeat(2 * k, *([1] * (x.ndim - 1))), e_rows, t_rows)
            with torch.no_grad():
                d = _sqnorm(e_rows - model_p.eps(xt, t_rows, cond_p)) - _sqnorm(e_rows - q.eps(xt, t_rows, cq))
            d = d.view(2, len(tb), draws * n).to(torch.float64).mean(0)  # antithetic pairs averaged
            m2[b0:b0 + len(tb)] += (d**2).mean(1).cpu()
    shape = wt * m2.sqrt()[of_t]
    if not torch.isfinite(shape).all() or float(shape.sum()) <= 0:
        return wt / wt.sum()
    return (1 - floor) * shape / shape.sum() + floor * wt / wt.sum()


def log_likelihood_ratio(x: torch.Tensor, model_q: ScoreModel | Sequence[ScoreModel], model_p: ScoreModel,
                         num_timesteps: int = 64, num_noise: int = 1, generator: torch.Generator | None = None,
                         cond_q=None, cond_p=None, stratified: bool = True, antithetic: bool = True,
                         chunk_rows: int = 65536, proposal: torch.Tensor | None = None) -> torch.Tensor:
    """``log q(x) - log p(x)`` for each sample (Lemma 2), shape (N,) or (N, m) for a list of q.

    ``sum_t w_t E_e[||e - eps_p(x_t, t)||^2 - ||e - eps_q(x_t, t)||^2]`` with
    ``w_t = (g_{t-1} - g_t) / 2`` and ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) e``; the same ``t``
    and ``e`` for every model (common random numbers), ``t`` stratified uniformly over log-SNR (or
    over ``proposal``, :func:`timestep_proposal`), and, with ``antithetic``, each noise ``e`` paired
    with ``-e``. Differentiable in ``x``.
    """
    single = isinstance(model_q, ScoreModel)
    qs = [model_q] if single else list(model_q)
    cond_qs = cond_q if (not single and isinstance(cond_q, (list, tuple))) else [cond_q] * len(qs)
    schedule = model_p.schedule
    n = x.shape[0]
    ts, ws = [], []
    for _ in range(num_noise):
        t, w = log_snr_timesteps(schedule, num_timesteps, generator, stratified, proposal)
        ts.append(t)
        ws.append(w / num_noise)
    ts, ws = torch.cat(ts), torch.cat(ws)
    e = torch.randn((len(ts), *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    if antithetic:
        ts, ws, e = torch.cat([ts, ts]), torch.cat([ws, ws]) / 2, torch.cat([e, -e])
    out = torch.zeros(n, len(qs), device=x.device, dtype=x.dtype)
    mb = getattr(model_p, "max_batch", None)  # image models: a few batches of the UNet per chunk
    if mb:
        chunk_rows = min(chunk_rows, 4 * int(mb))
    per_chunk = max(1, chunk_rows // max(n, 1))
    for s in range(0, len(ts), per_chunk):
        tt = ts[s:s + per_chunk].to(x.device)
        ee = e[s:s + per_chunk]
        k = len(tt)
        t_rows = tt.repeat_interleave(n)
        xt = schedule.add_noise(x.repeat(k, *([1] * (x.ndim - 1))), ee.reshape(k * n, *x.shape[1:]), t_rows)
        e_rows = ee.reshape(k * n, *x.shape[1:])
        e_all = eps_each([model_p, *qs], xt, t_rows, [cond_p, *cond_qs])  # views of one network: one call
        err_p = _sqnorm(e_rows - e_all[0]).view(k, n)
        w = ws[s:s + per_chunk].to(x.device, x.dtype)[:, None]
        for j, e_q in enumerate(e_all[1:]):
            err_q = _sqnorm(e_rows - e_q).view(k, n)
            out[:, j] = out[:, j] + (w * (err_p - err_q)).sum(0)
    return out[:, 0] if single else out


def denoising_loss(model: ScoreModel, x: torch.Tensor, generator: torch.Generator | None = None, cond=None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None, reduce: bool = True):
    """``E_{t,e} ||e - eps(sqrt(abar_t) x + sqrt(1-abar_t) e, t)||^2`` (t uniform), per sample or mean."""
    n = x.shape[0]
    sched = model.schedule
    if t is None:
        t = torch.randint(0, sched.T, (n,), generator=generator).to(x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    per = _sqnorm(noise - model.eps(sched.add_noise(x, noise, t), t, cond)) / x[0].numel()
    return per.mean() if reduce else per
