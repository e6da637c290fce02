"""KL to the pretrained model and expected likelihood of the unlearning concepts, for any ScoreModel.

Thin wrappers over :mod:`unlearn.estimators` (formulas.md section 2), batched and seeded:

* :func:`kl_to_pretrained` - ``KL(P_model || P_pre)`` between the sampler's path measures
  (Lemma 3, exact weights ``c_t^2 / (2 s_t^2)``), averaged over trajectories of the model. It
  bounds the KL between the final samples' distributions from above; it needs a stochastic
  sampler (DDPM or DDIM with eta > 0).
* :func:`expected_likelihood` - for each concept ``i``, ``E_{x ~ model}[q_i(x) / p_pre(x)]`` with
  ``log q_i - log p_pre`` from denoising errors (Lemma 2), and the mean log-ratio. For
  text-to-image models ``q_i`` is the pretrained model conditioned on concept ``i`` and
  ``p_pre`` the pretrained model with the run's conditioning (``cond``), as in the LU formulation.
* :func:`concept_likelihood` - the per-sample ratio ``q_i(x)/p_pre(x)``: the score of the
  retain-set filter (:func:`unlearn.metrics.kid.retain_mask`).

Seeds: trajectories use a generator on the model's device seeded with ``seed``; the
likelihood estimator's timesteps and noises use a CPU generator seeded with ``seed + 1``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..estimators import log_likelihood_ratio, pathwise_kl
from ..models.base import ScoreModel
from ..samplers import GaussianSampler


def model_device(model: ScoreModel) -> torch.device:
    """The device of a model's parameters (or buffers, for parameter-free exact models)."""
    p = next(iter(model.parameters()), None)
    if p is None:
        b = next(iter(model.buffers()), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


def _batches(n: int, batch_size: int | None):
    bs = int(batch_size) if batch_size else n
    for i in range(0, n, bs):
        yield min(bs, n - i)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    se = float(v.std(0) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean(0)), se


def sampler_protocol(sampler: GaussianSampler) -> dict:
    return {"kind": sampler.kind, "num_steps": sampler.num_steps, "eta": sampler.eta, "variance": sampler.variance,
            "first_timestep": sampler.timesteps[0], "T": sampler.schedule.T}


def kl_to_pretrained(model: ScoreModel, pretrained: ScoreModel, sampler: GaussianSampler, n: int, seed: int = 0,
                     cond=None, pretrained_cond: Any = "same", batch_size: int | None = None) -> dict:
    """Pathwise ``KL(P_model || P_pre)``: ``value`` (mean over ``n`` trajectories), ``stderr``, ``n``."""
    if not any(sampler.stochastic(k) for k in range(sampler.num_steps)):
        raise ValueError("the pathwise KL needs a stochastic sampler (DDPM, or DDIM with eta > 0)")
    ref_cond = cond if isinstance(pretrained_cond, str) and pretrained_cond == "same" else pretrained_cond
    gen = torch.Generator().manual_seed(int(seed))
    parts = [pathwise_kl(model, [pretrained], sampler, b, gen, cond=cond, ref_conds=[ref_cond])[:, 0]
             for b in _batches(int(n), batch_size)]
    kl = torch.cat(parts)
    mean, se = _mean_se(kl)
    return {"value": mean, "stderr": se, "n": int(n)}


def concept_likelihood(x: torch.Tensor, concepts: Sequence[ScoreModel], pretrained: ScoreModel, seed: int = 0,
                       cond=None, concept_conds: Sequence | None = None, num_timesteps: int = 32,
                       num_noise: int = 1, antithetic: bool = True, batch_size: int | None = None) -> torch.Tensor:
    """``log q_i(x) - log p_pre(x)`` per sample and concept, shape (N, m) (exponentiate for the ratio)."""
    gen = torch.Generator().manual_seed(int(seed))
    conds = list(concept_conds) if concept_conds else None
    out = []
    i = 0
    for b in _batches(len(x), batch_size):
        with torch.no_grad():
            out.append(log_likelihood_ratio(x[i:i + b], list(concepts), pretrained, num_timesteps=int(num_timesteps),
                                            num_noise=int(num_noise), generator=gen, cond_q=conds, cond_p=cond,
                                            antithetic=bool(antithetic)).cpu())
        i += b
    return torch.cat(out)


def expected_likelihood(model: ScoreModel, concepts: Sequence[ScoreModel], pretrained: ScoreModel,
                        sampler: GaussianSampler, n: int, seed: int = 0, cond=None,
                        concept_conds: Sequence | None = None, num_timesteps: int = 32, num_noise: int = 1,
                        antithetic: bool = True, batch_size: int | None = None) -> dict:
    """``E_model[q_i / p_pre]`` per concept (``per_concept``), their mean (``value``), the mean
    log-ratio per concept (``mean_log_ratio``), standard errors, ``n``."""
    if not concepts:
        raise ValueError("expected_likelihood needs at least one concept model")
    gen = torch.Generator().manual_seed(int(seed))
    xs = [sampler.sample(model, b, gen, cond=cond).x0 for b in _batches(int(n), batch_size)]
    x = torch.cat(xs)
    llr = concept_likelihood(x, concepts, pretrained, seed + 1, cond, concept_conds, num_timesteps, num_noise,
                             antithetic, batch_size).double()
    ratio = torch.exp(llr)
    r_mean = ratio.mean(0)
    r_se = ratio.std(0) / math.sqrt(len(ratio)) if len(ratio) > 1 else torch.full_like(r_mean, float("nan"))
    l_mean = llr.mean(0)
    l_se = llr.std(0) / math.sqrt(len(llr)) if len(llr) > 1 else torch.full_like(l_mean, float("nan"))
    return {"value": float(r_mean.mean()), "per_concept": r_mean.tolist(), "stderr": r_se.tolist(),
            "mean_log_ratio": l_mean.tolist(), "mean_log_ratio_stderr": l_se.tolist(), "n": int(n)}
