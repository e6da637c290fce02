"""The exact side: targets, constraint values, dual functions and optimal multipliers."""
import math

import numpy as np
import pytest
import torch

from unlearn.formulations.base import formulation_class
from unlearn.formulations.fu import ForwardKLUnlearning as FU
from unlearn.formulations.lu import LikelihoodUnlearning as LU
from unlearn.formulations.ru import ReverseKLUnlearning as RU
from unlearn.models.gmm import GaussianMixture, GMMOracle

GMM = GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5, 0.5, 0.5], [1, 1, 1])
OTHER = GaussianMixture([[-2.5, 0], [2, 0.5], [0, 3]], [0.5, 0.4, 0.6], [0.5, 0.3, 0.2])


def test_pretrained_expected_likelihood_is_one():
    """E_pre[q / p_pre] = 1 exactly, the paper's normalisation."""
    for g, idx in [(GMM, [2]), (OTHER, [1, 2])]:
        assert np.allclose(LU.oracle_pretrained_values(GMMOracle(g, idx)), 1.0, atol=1e-6)


def test_fu_pretrained_kl_is_log_inverse_weight_for_separated_components():
    o = GMMOracle(GMM, [2])
    assert abs(FU.oracle_pretrained_values(o)[0] - math.log(3)) < 0.01


@pytest.mark.parametrize("form,mu", [("ru", [0.3]), ("lu", [2.0]), ("fu", [0.2])])
def test_targets_are_normalised_and_follow_their_formula(form, mu):
    o = GMMOracle(GMM, [2])
    grid, logp = formulation_class(form).oracle_log_target(o, mu)
    assert abs(float(torch.exp(logp).sum()) * grid.dv - 1) < 1e-9
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    lp, lq = GMM.log_prob(x), GMM.subset([2]).log_prob(x)
    if form == "ru":
        un = (lp - mu[0] * lq) / (1 - mu[0])
    elif form == "lu":
        un = lp - mu[0] * torch.exp(lq - lp)
    else:
        un = torch.log(torch.exp(lp) - mu[0] * torch.exp(lq))
    # ratio of target densities at two points equals the ratio of the unnormalised formula
    idx = [int(np.argmin(((grid.points.numpy() - p.numpy()) ** 2).sum(1))) for p in x]
    ref_un = []
    for i in idx:
        p = grid.points[i:i + 1]
        lp_, lq_ = GMM.log_prob(p), GMM.subset([2]).log_prob(p)
        ref_un.append(float((lp_ - mu[0] * lq_) / (1 - mu[0]) if form == "ru" else
                            (lp_ - mu[0] * torch.exp(lq_ - lp_) if form == "lu" else
                             torch.log(torch.exp(lp_) - mu[0] * torch.exp(lq_)))))
    assert abs(float(logp[idx[0]] - logp[idx[1]]) - (ref_un[0] - ref_un[1])) < 1e-9
    assert torch.isfinite(un).all()


def test_invalid_multipliers_are_rejected():
    o = GMMOracle(GMM, [2])
    with pytest.raises(ValueError, match="sum of multipliers < 1"):
        RU.oracle_log_target(o, [1.0])
    with pytest.raises(ValueError, match="p_pre >= sum"):
        FU.oracle_log_target(o, [0.5])  # the component's weight is 1/3
    with pytest.raises(ValueError, match="expected 1 multipliers"):
        LU.oracle_log_target(o, [0.5, 0.5])


@pytest.mark.parametrize("form", ["ru", "lu", "fu"])
def test_dual_gradient_matches_finite_differences(form):
    o, F = GMMOracle(OTHER, [1, 2]), formulation_class(form)
    mu = np.array([0.05, 0.04]) if form != "lu" else np.array([0.7, 0.3])
    b = F.oracle_thresholds(o, {"ru": 1.3, "lu": 0.3, "fu": 1.5}[form])
    _, grad = F.oracle_dual(o, mu, b)
    h = 1e-5
    for i in range(2):
        e = np.zeros(2)
        e[i] = h
        fd = (F.oracle_dual(o, mu + e, b)[0] - F.oracle_dual(o, mu - e, b)[0]) / (2 * h)
        assert abs(fd - grad[i]) < 1e-3 * max(1, abs(grad[i])), (form, i, fd, grad[i])


@pytest.mark.parametrize("form,factor", [("ru", 1.3), ("lu", 0.2), ("fu", 1.5)])
def test_optimal_multipliers_make_active_constraints_tight(form, factor):
    """KKT: at the optimum each constraint holds, with equality where its multiplier is > 0."""
    F = formulation_class(form)
    for g, idx in [(GMM, [2]), (OTHER, [1, 2])]:
        o = GMMOracle(g, idx)
        b = F.oracle_thresholds(o, factor)
        mu = F.oracle_multipliers(o, b)
        val = F.oracle_values(o, mu)
        for m_i, v, b_i in zip(mu, val, b):
            if m_i > 1e-6:
                assert abs(v - b_i) < 1e-3 * abs(b_i), (form, mu, val, b)
            elif F.sense == "le":
                assert v <= b_i * (1 + 1e-3)
            else:
                assert v >= b_i * (1 - 1e-3)


def test_lu_keeps_retained_modes_and_ru_pushes_them():
    """Paper Figure 1: LU leaves retained modes in place, RU moves them away from q."""
    o = GMMOracle(GMM, [2])
    grid, lu = LU.oracle_log_target(o, LU.oracle_multipliers(o, LU.oracle_thresholds(o, 0.1)))
    pts = grid.points
    mean_lu = (torch.exp(lu)[:, None] * pts).sum(0) * grid.dv
    grid_r, ru = RU.oracle_log_target(o, [0.3])
    pr = grid_r.points
    right = pr[:, 0] > 0.5
    w = torch.exp(ru) * right
    mean_right_ru = (w[:, None] * pr).sum(0) / w.sum()
    assert float(mean_lu[1]) < 0.5  # the q mode at (0, 3) is gone: mean y drops from 1 to ~0
    assert float(mean_right_ru[1]) < -0.3 and float(mean_right_ru[0]) > 2.3  # pushed away from (0, 3)


def test_capped_ru_separation_against_monte_carlo_and_its_limits():
    """``ru_cap``: the capped separation ``KL(p||p_pre) + E_p[min(-llr_i, C)]`` on the grid equals a Monte
    Carlo average with exact densities at the pretrained model (5 standard errors), the paper's KL for a
    cap no sample reaches (1e-3), and the dual gradient of the capped problem matches finite differences."""
    o = GMMOracle(OTHER, [1, 2], ru_cap=2.0)
    x = OTHER.sample(200_000, torch.Generator().manual_seed(0)).double()
    f = (-o.log_l(x)).clamp(max=2.0)  # at p = p_pre the KL term is 0
    mc, se = f.mean(0).numpy(), (f.std(0) / math.sqrt(len(f))).numpy()
    pre = RU.oracle_pretrained_values(o)
    assert np.all(np.abs(pre - mc) < 5 * se + 1e-3), (pre, mc, se)
    assert np.all(pre < RU.oracle_pretrained_values(GMMOracle(OTHER, [1, 2])) - 5)  # the cap bites
    mu = np.array([0.2, 0.1])
    far = GMMOracle(OTHER, [1, 2], ru_cap=1e4)
    assert np.allclose(RU.oracle_values(far, mu), RU.oracle_values(GMMOracle(OTHER, [1, 2]), mu), atol=1e-3)
    b = RU.oracle_thresholds(o, 1.3)
    _, grad = RU.oracle_dual(o, mu, b)
    for i in range(2):
        e = np.zeros(2)
        e[i] = 1e-5
        fd = (RU.oracle_dual(o, mu + e, b)[0] - RU.oracle_dual(o, mu - e, b)[0]) / 2e-5
        assert abs(fd - grad[i]) < 1e-3 * max(1, abs(grad[i])), (i, fd, grad[i])
    with pytest.raises(ValueError, match="ru_cap"):
        GMMOracle(OTHER, [1, 2], ru_cap=0.0)


@pytest.mark.parametrize("F", [RU, LU, FU], ids=lambda F: F.name)
def test_the_oracle_by_name_is_the_formulations_own(F):
    """``GMMOracle.<quantity>(name, ...)`` looks the formulation up in the registry: the same numbers as
    the formulation's own ``oracle_*`` methods; only RU's target needs a wider grid; an unknown name fails."""
    o = GMMOracle(OTHER, [1, 2])
    mu = np.array([0.05, 0.04])
    b = F.oracle_thresholds(o, {"ru": 1.3, "lu": 0.3, "fu": 1.5}[F.name])
    assert np.array_equal(o.thresholds(F.name, {"ru": 1.3, "lu": 0.3, "fu": 1.5}[F.name]), b)
    assert np.array_equal(o.constraint_values(F.name, mu), F.oracle_values(o, mu))
    assert np.array_equal(o.pretrained_values(F.name), F.oracle_values(o, np.zeros(2)))
    assert o.dual_function(F.name, mu, b)[0] == F.oracle_dual(o, mu, b)[0]
    assert torch.equal(o.target_log_density(F.name, mu)[1], F.oracle_log_target(o, mu)[1])
    assert np.array_equal(o.optimal_multipliers(F.name, b), F.oracle_multipliers(o, b))
    assert (o.target_grid(F.name, mu) is not None) == (F is RU)
    with pytest.raises(ValueError, match="formulation must be one of"):
        o.thresholds("xyz", 1.0)
