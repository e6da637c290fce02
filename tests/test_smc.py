"""Sequential Monte Carlo for products of diffusion models against exact answers."""
import math

import numpy as np
import pytest
import torch

from unlearn.models.gmm import ExactGMMScore, GaussianMixture, GMMOracle, draw_mixture
from unlearn.samplers import GaussianSampler
from unlearn.schedule import NoiseSchedule
from unlearn.smc import product_smc, systematic_resample

SCHED = NoiseSchedule.linear()


def test_two_gaussians_log_z_is_exact_in_closed_form():
    """``int N(0,1)^{1+c} N(m,1)^{-c} = exp(c (1 + c) m^2 / 2)`` and the target is ``N(-c m, 1)``; the
    product of the noised marginals is a diffusion marginal here, so the weights stay flat."""
    p = GaussianMixture([[0.0, 0.0]], [1.0], [1.0])
    q = GaussianMixture([[2.0, 0.0]], [1.0], [1.0])
    c = 0.5
    r = product_smc(GaussianSampler(SCHED, 50), [ExactGMMScore(p, SCHED), ExactGMMScore(q, SCHED)], [1 + c, -c],
                    4096, torch.Generator().manual_seed(0))
    exact = c * (1 + c) * 4.0 / 2
    assert abs(r.log_z - exact) < 0.01 * exact, (r.log_z, exact)
    assert r.ess > 0.99 * 4096
    mean = (torch.exp(r.log_w)[:, None] * r.x.double()).sum(0)
    assert abs(float(mean[0]) + c * 2.0) < 0.1 and abs(float(mean[1])) < 0.1, mean


@pytest.mark.parametrize("seed,mu", [(0, [0.028, 0.294]), (7, [0.0, 0.5])])
def test_mixture_product_against_the_oracle(seed, mu):
    """RU targets of random mixtures (geometries no setting was tuned on) at multipliers near their
    optima: ``log Z`` within 2% and each ``E[log q_i - log p_pre]`` within 10% of the grid's values,
    where the composed score alone (no weights, no resampling) misses the first by 21% (seed 0)."""
    m = draw_mixture(seed)
    g = GaussianMixture(m["means"], m["stds"], m["weights"])
    o = GMMOracle(g, m["unlearn"])
    mu_t = torch.tensor(mu, dtype=torch.float64)
    grid = o.grid(o._ru_spread(mu_t))
    logr = o._ru_log_target(grid.points, mu_t)
    log_z = float(torch.logsumexp(logr, 0)) + math.log(grid.dv)
    ell = grid.expect(grid.normalize_log(logr), o.log_l(grid.points)).numpy()
    c = (mu_t / (1 - mu_t.sum())).tolist()
    models = [ExactGMMScore(g, SCHED)] + [ExactGMMScore(q, SCHED) for q in o.concepts]
    r = product_smc(GaussianSampler(SCHED, 50), models, [1 + sum(c), *[-x for x in c]], 4096,
                    torch.Generator().manual_seed(0))
    est = (torch.exp(r.log_w)[:, None] * o.log_l(r.x.double())).sum(0).numpy()
    assert abs(r.log_z - log_z) < 0.02 * abs(log_z), (r.log_z, log_z)
    assert np.all(np.abs(est - ell) < 0.1 * np.abs(ell)), (est, ell)
    if seed == 0:
        composed = product_smc(GaussianSampler(SCHED, 50), models, [1 + sum(c), *[-x for x in c]], 4096,
                               torch.Generator().manual_seed(0), resample_below=0.0)
        plain = o.log_l(composed.x.double()).mean(0).numpy()  # the composed score's own samples
        assert abs(plain[0] - ell[0]) > 0.15 * abs(ell[0]), (plain, ell)


def test_systematic_resampling_counts():
    logw = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64))
    idx = systematic_resample(logw, 8, torch.Generator().manual_seed(0))
    assert torch.bincount(idx, minlength=4).tolist() == [4, 2, 1, 1]


def test_coefficients_must_sum_to_one():
    p = ExactGMMScore(GaussianMixture([[0.0, 0.0]], [1.0], [1.0]), SCHED)
    with pytest.raises(ValueError, match="summing to 1"):
        product_smc(GaussianSampler(SCHED, 5), [p, p], [1.0, 0.5], 8)
