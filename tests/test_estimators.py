"""Samplers and estimators against the GMM's exact answers (exact denoisers, no training)."""
import math

import numpy as np
import pytest
import torch

from unlearn.estimators import log_likelihood_ratio, log_snr_timesteps, pathwise_kl, timestep_proposal
from unlearn.models.gmm import ExactGMMScore, GaussianMixture, GMMOracle
from unlearn.samplers import GaussianSampler
from unlearn.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear()
GMM = GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5, 0.5, 0.5], [1, 1, 1])
ORACLE = GMMOracle(GMM, [2])
PRE = ExactGMMScore(GMM, SCHED)
Q = ExactGMMScore(ORACLE.concepts[0], SCHED)


def test_exact_eps_matches_noisy_score():
    """eps = -sqrt(1 - abar) * grad log p_t, with p_t the noised mixture in closed form."""
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    for t in (0, 300, 999):
        abar = float(SCHED.abar[t])
        xr = x.clone().requires_grad_(True)
        logp = GMM.noisy(abar).log_prob(xr).sum()
        (g,) = torch.autograd.grad(logp, xr)
        eps = PRE.eps(x, torch.full((64,), t))
        assert torch.allclose(eps, -math.sqrt(1 - abar) * g, atol=1e-8)


def test_step_log_prob_and_kl_are_gaussian():
    """Per-step log-density includes the 1/s^2 factor; per-step KL = KL of two Gaussians."""
    s = GaussianSampler(SCHED, 50, "ddpm")
    k = 10
    x = torch.randn(8, 2)
    e1, e2 = torch.randn(8, 2), torch.randn(8, 2)
    m1, m2 = s.mean(x, e1, k), s.mean(x, e2, k)
    x_next = m1 + s.s[k] * torch.randn(8, 2)
    ref = torch.distributions.Normal(m1, s.s[k]).log_prob(x_next).sum(1)
    assert torch.allclose(s.step_log_prob(x_next, x, e1, k), ref, atol=1e-4)
    kl_ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s.s[k]),
                                               torch.distributions.Normal(m2, s.s[k])).sum(1)
    kl = s.kl_weight(k) * ((e1 - e2) ** 2).sum(1)
    assert torch.allclose(kl, kl_ref, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_x0_parametrisation(eta):
    s = GaussianSampler(SCHED, 20, "ddim", eta=eta)
    x, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for k in range(s.num_steps - 1):
        t, u = s.timesteps[k], s.timesteps[k + 1]
        ab_t, ab_s = float(SCHED.abar[t]), float(SCHED.abar[u])
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        ref = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - s.s[k] ** 2) * eps
        assert torch.allclose(s.mean(x, eps, k), ref, atol=1e-10)
        assert (s.s[k] == 0) == (eta == 0)


def test_ddpm_samples_match_mixture():
    s = GaussianSampler(SCHED, 50, "ddpm")
    x = s.sample(PRE, 4000, torch.Generator().manual_seed(0)).x0
    mass = np.bincount(GMM.nearest_component(x).numpy(), minlength=3) / 4000
    assert np.allclose(mass, 1 / 3, atol=0.03)
    from unlearn.models.gmm_setup import GMMEvaluator

    m = GMMEvaluator(GMM, [2], ORACLE).evaluate(x, "lu", [0.0])
    assert m["kl_to_pretrained"] < 0.05  # grid-KDE KL of exact-score samples to the exact density
    assert m["kl_retained_part"] < 0.05  # the retained part of the pretrained model is the retained mixture
    assert abs(m["expected_likelihood"] - 1.0) < 0.1


def test_pathwise_kl_matches_exact_kl():
    """DDPM with s_t^2 = beta_t and the exact weights: path KL -> KL(p_pre || q) (5%)."""
    exact = float(ORACLE.pretrained_values("ru")[0])
    kl = pathwise_kl(PRE, [Q], GaussianSampler(SCHED, 1000, "ddpm"), 1500, torch.Generator().manual_seed(1))
    est, se = float(kl.mean()), float(kl.std()) / math.sqrt(len(kl))
    assert abs(est - exact) < 0.05 * exact + 3 * se, (est, exact)


def test_pathwise_kl_of_a_composition_reuses_its_parts_and_agrees():
    """A path KL from the RU composition to its own concepts reuses the concepts' predictions the
    composition just made at each state (one evaluation per step, not two) and gives the same numbers."""
    from unlearn.models.base import ComposedScore

    class Counted(ExactGMMScore):
        calls = 0

        def eps(self, x, t, cond=None):
            Counted.calls += 1
            return super().eps(x, t, cond)

    q1, q2 = Counted(ORACLE.concepts[0], SCHED), Counted(GMM.subset([0]), SCHED)
    comp = ComposedScore.reverse_kl(PRE, [q1, q2], torch.tensor([0.2, 0.1]))
    s = GaussianSampler(SCHED, 25, "ddpm")

    class Opaque(ComposedScore):  # the same composition without the reuse
        def part(self, *a):
            return None

    opaque = Opaque(list(comp.models), comp.weights)
    Counted.calls = 0
    a = pathwise_kl(comp, [q1, q2], s, 64, torch.Generator().manual_seed(3))
    reused = Counted.calls
    Counted.calls = 0
    b = pathwise_kl(opaque, [q1, q2], s, 64, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.mean() > 0
    assert reused == 2 * s.num_steps and Counted.calls == 4 * s.num_steps - 2 * (s.num_steps - sum(
        s.stochastic(k) for k in range(s.num_steps)))


def test_pathwise_kl_is_zero_for_identical_models():
    kl = pathwise_kl(PRE, [PRE], GaussianSampler(SCHED, 20), 16)
    assert float(kl.abs().max()) == 0.0


def test_log_likelihood_ratio_matches_exact():
    """Lemma 2 with the full quadrature over the schedule and common random numbers."""
    x = torch.tensor([[0.0, 3.0], [2.0, 0.0], [0.5, 2.5], [-1.0, 1.0]])
    exact = (ORACLE.log_q(x)[:, 0] - ORACLE.log_pre(x)).numpy()
    est = log_likelihood_ratio(x, Q, PRE, num_timesteps=1000, num_noise=8,
                               generator=torch.Generator().manual_seed(0)).numpy()
    tol = 0.15 + 0.03 * np.abs(exact)
    assert np.all(np.abs(est - exact) < tol), (est, exact)


def test_log_likelihood_ratio_stratified_unbiased():
    """Stratified log-SNR sampling: mean over repeats converges to the exact log-ratio."""
    x = torch.tensor([[0.0, 3.0], [0.3, 2.6]]).repeat(400, 1)
    exact = (ORACLE.log_q(x[:2])[:, 0] - ORACLE.log_pre(x[:2])).numpy()
    est = log_likelihood_ratio(x, Q, PRE, num_timesteps=16, generator=torch.Generator().manual_seed(3))
    mean = est.view(400, 2).mean(0).numpy()
    assert np.all(np.abs(mean - exact) < 0.1), (mean, exact)


def test_timestep_proposal_is_unbiased_and_halves_the_noise_on_the_concept():
    """The fitted timestep proposal (importance sampling over log-SNR, pilot samples of q): the
    mean over repeats still converges to the exact log-ratio (within 0.05), and on samples of q,
    where l = q/p matters, one estimate's error has at most 0.65x the standard deviation of the
    uniform-over-log-SNR estimator (measured: 0.35 vs 0.62 with 32 strata)."""
    g = torch.Generator().manual_seed(0)
    prop = timestep_proposal([ORACLE.concepts[0].sample(64, g)], [Q], PRE, generator=g)
    assert prop.shape == (SCHED.T,) and abs(float(prop.sum()) - 1) < 1e-9
    assert float((prop / (SCHED.log_snr_weights() / SCHED.log_snr_weights().sum())).min()) >= 0.1 - 1e-9  # floor
    x = ORACLE.concepts[0].sample(2000, g)
    exact = (ORACLE.log_q(x)[:, 0] - ORACLE.log_pre(x)).double()
    err = {}
    for name, pr in [("uniform", None), ("proposal", prop)]:
        reps = torch.stack([log_likelihood_ratio(x, Q, PRE, num_timesteps=32, generator=g, proposal=pr).double()
                            for _ in range(4)])
        assert abs(float((reps.mean(0) - exact).mean())) < 0.05, name
        err[name] = float((reps[0] - exact).std())
    assert err["proposal"] < 0.65 * err["uniform"], err


def test_log_snr_timesteps_with_a_proposal_reweight_exactly():
    """Drawn from a proposal, the importance weights give the same expectation as the quadrature."""
    wt = SCHED.log_snr_weights()
    prop = torch.linspace(1.0, 3.0, SCHED.T, dtype=torch.float64)
    f = torch.sin(torch.arange(SCHED.T, dtype=torch.float64) / 90.0)
    exact = float((wt * f).sum())
    g = torch.Generator().manual_seed(1)
    est = np.mean([float((w.double() * f[t]).sum()) for t, w in
                   (log_snr_timesteps(SCHED, 16, g, proposal=prop) for _ in range(400))])
    assert abs(est - exact) < 0.02 * abs(exact) + 0.01, (est, exact)


def test_log_snr_weights_integrate_the_log_snr_range():
    w = SCHED.log_snr_weights()
    g = SCHED.log_snr
    total = float((g[0] - g[-1]) / 2 + (g[0] - g[1]) / 2)
    assert abs(float(w.sum()) - total) < 1e-9


@pytest.mark.parametrize("layout", ["blocks", "uneven", "per_row", "single"])
def test_resnet_fast_inference_path_matches_the_autograd_path(layout):
    """Without autograd the ResNet denoiser embeds each run of equal timesteps once, adds and
    activates in place and works in ``row_chunk``-row chunks: same numbers as the autograd path
    (which the training steps use), and that path's gradients are those of the plain formula."""
    from unlearn.models.resnet import ResNetDenoiser

    g = torch.Generator().manual_seed(0)
    model = ResNetDenoiser(2, NoiseSchedule.linear(), gaussian_skip=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.row_chunk = 48  # several chunks, runs of t cut by chunk borders
    n = 200
    x = torch.randn(n, 2, generator=g)
    t = {"blocks": torch.arange(8).repeat_interleave(25) * 100,
         "uneven": torch.tensor([3] * 7 + [500] * 150 + [999] * 43),
         "per_row": torch.randint(0, 1000, (n,), generator=g),
         "single": torch.tensor(250)}[layout]
    with torch.no_grad():
        fast = model.eps(x, t)
    xg = x.clone().requires_grad_(True)
    slow = model.eps(xg, t)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    # the plain formula, block by block, per row
    tt = model._timesteps(t, x)
    emb = model.time_embed(tt)
    h = model.inp(xg)
    for blk in model.blocks:
        h = h + blk.fc2(blk.act(blk.fc1(blk.norm(h)) + blk.emb(emb)))
    a = model.schedule.abar_at(tt, x)
    ref = model.out(h) + (1 - a).sqrt() * (xg - a.sqrt() * model.skip_mean) / (a * model.skip_var + 1 - a)
    assert torch.allclose(slow, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(n, 2, generator=g)
    g1 = torch.autograd.grad((slow * w).sum(), [xg, *model.parameters()], retain_graph=True)
    g2 = torch.autograd.grad((ref * w).sum(), [xg, *model.parameters()])
    for a1, a2 in zip(g1, g2):
        assert torch.allclose(a1, a2, atol=1e-4, rtol=1e-4)
