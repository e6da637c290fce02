"""Formulations and the dual loop on exact GMM denoisers: multipliers against the oracle."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from unlearn.dual import DualAscent, FixedMultipliers
from unlearn.formulations.ru import ReverseKLUnlearning
from unlearn.models.gmm import ExactGMMScore, GaussianMixture, GMMOracle
from unlearn.models.gmm_setup import GMMEvaluator
from unlearn.primal_dual import PrimalDual
from unlearn.samplers import GaussianSampler
from unlearn.schedule import NoiseSchedule
from unlearn.setup import UnlearningSetup

SCHED = NoiseSchedule.linear()


def exact_setup(g, idx):
    o = GMMOracle(g, idx)
    pre = ExactGMMScore(g, SCHED)
    qs = [ExactGMMScore(c, SCHED) for c in o.concepts]
    return UnlearningSetup("gmm", pre, pre, qs, [str(i) for i in idx], [], oracle=o), o


GEOMETRIES = [
    (GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5] * 3, [1, 1, 1]), [2]),
    (GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5, 0.5, 0.5], [0.5, 0.3, 0.2]), [1, 2]),
]


@pytest.mark.parametrize("g,idx", GEOMETRIES)
def test_ru_dual_only_ratio_estimator_finds_oracle_multipliers(g, idx):
    """Dual-only RU with the importance-weighted KL: multipliers within 10% (+0.003) of the optimum."""
    setup, o = exact_setup(g, idx)
    cfg = OmegaConf.create(dict(threshold_factor=1.3, batch_size=256, max_multiplier_sum=0.95, kl_estimator="ratio",
                                final_samples="resample", pool_size=4096, likelihood_timesteps=32))
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 50), torch.Generator().manual_seed(0), False, False)
    mu, values, thr, _ = PrimalDual(f, DualAscent(len(idx), 0.002, projection=f.project), 150, 0,
                                    show_progress=False).run()
    opt = o.optimal_multipliers("ru", o.thresholds("ru", 1.3))
    assert np.allclose(mu.numpy(), opt, rtol=0.1, atol=0.003), (mu, opt)
    assert np.allclose(thr.numpy(), o.thresholds("ru", 1.3), rtol=0.06)  # estimated vs exact thresholds
    x = f.final_samples(mu, 4000, torch.Generator().manual_seed(1))
    assert GMMEvaluator(g, idx, o).evaluate(x, "ru", mu.tolist())["kl_to_target"] < 0.1


def test_ru_projection_keeps_target_proper():
    setup, _ = exact_setup(*GEOMETRIES[1])
    cfg = OmegaConf.create(dict(threshold_factor=50.0, batch_size=16, max_multiplier_sum=0.9))
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 10), torch.Generator().manual_seed(0), False, False)
    d = DualAscent(2, 1.0, projection=f.project)
    d.update(torch.tensor([5.0, 5.0]))
    assert float(d.value().sum()) <= 0.9 + 1e-6 and bool((d.value() >= 0).all())


def test_dual_ascent_direction_and_projection():
    d = DualAscent(2, 0.5)
    d.update(torch.tensor([1.0, -1.0]))  # first violated, second satisfied
    assert d.value().tolist() == pytest.approx([0.5, 0.0])
    f = FixedMultipliers(torch.tensor([0.3]))
    f.update(torch.tensor([10.0]))
    assert f.value().tolist() == pytest.approx([0.3])


def test_composed_score_is_exact_for_equal_variance_gaussians():
    """For Gaussians with equal variance the composed noisy score is the noisy target's score."""
    from unlearn.models.base import ComposedScore

    p = GaussianMixture([[0.0, 0.0]], [0.7], [1])
    q = GaussianMixture([[1.0, 2.0]], [0.7], [1])
    mu = 0.3
    target = GaussianMixture([((np.array([0.0, 0.0]) - mu * np.array([1.0, 2.0])) / (1 - mu)).tolist()], [0.7], [1])
    comp = ComposedScore.reverse_kl(ExactGMMScore(p, SCHED), [ExactGMMScore(q, SCHED)], torch.tensor([mu]))
    x = torch.randn(32, 2, dtype=torch.float64)
    for t in (0, 400, 900):
        tt = torch.full((32,), t)
        assert torch.allclose(comp.eps(x, tt), ExactGMMScore(target, SCHED).eps(x, tt), atol=1e-6)


def test_nupi_dual_optimizer_moves_like_ascent():
    d = DualAscent(1, 0.5, optimizer="nupi", kp=0.0)
    d.update(torch.tensor([1.0]))
    d.update(torch.tensor([1.0]))
    assert d.value().item() == pytest.approx(1.0)
    d.update(torch.tensor([-5.0]))
    assert d.value().item() == 0.0  # projected onto mu >= 0
