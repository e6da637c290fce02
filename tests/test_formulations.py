"""Formulations and the dual loop on exact GMM denoisers: multipliers against the oracle."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from unlearn.dual import DualAscent, FixedMultipliers
from unlearn.formulations.ru import Pool, ReverseKLUnlearning
from unlearn.models.base import ScoreModel
from unlearn.models.gmm import ExactGMMScore, GaussianMixture, GMMOracle
from unlearn.models.gmm_setup import GMMEvaluator
from unlearn.primal_dual import PrimalDual
from unlearn.samplers import GaussianSampler
from unlearn.schedule import NoiseSchedule
from unlearn.setup import UnlearningSetup

SCHED = NoiseSchedule.linear()


def formulation_cfg(name: str, **overrides):
    """``configs/formulation/<name>.yaml`` with ``overrides``: the code reads every key from there."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs" / "formulation"
    return OmegaConf.merge(OmegaConf.load(root / f"{name}.yaml"), overrides)


def exact_setup(g, idx, ru_cap=None):
    o = GMMOracle(g, idx, ru_cap=ru_cap)
    pre = ExactGMMScore(g, SCHED)
    qs = [ExactGMMScore(c, SCHED) for c in o.concepts]
    return UnlearningSetup("gmm", pre, pre, qs, [str(i) for i in idx], [], oracle=o), o


GEOMETRIES = [
    (GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5] * 3, [1, 1, 1]), [2]),
    (GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5, 0.5, 0.5], [0.5, 0.3, 0.2]), [1, 2]),
]


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("g,idx", GEOMETRIES)
def test_ru_dual_only_ratio_estimator_finds_oracle_multipliers(g, idx, cap):
    """Dual-only RU with the importance-weighted KL: multipliers within 10% (+0.003) of the optimum,
    for the paper's KL and for the capped separation (``separation_cap``; the oracle's grid target)."""
    setup, o = exact_setup(g, idx, ru_cap=cap)
    cfg = formulation_cfg("ru", threshold_factor=1.3, batch_size=256, max_multiplier_sum=0.95, kl_estimator="ratio",
                          final_samples="resample", pool_size=4096, likelihood_timesteps=32, separation_cap=cap)
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 50), torch.Generator().manual_seed(0), None, False)
    lr = 0.002 if cap is None else 0.02  # capped values are O(1) nats, the KLs O(20)
    mu, values, thr, _ = PrimalDual(f, DualAscent(len(idx), lr, projection=f.project), 150, 0,
                                    show_progress=False).run()
    opt = o.optimal_multipliers("ru", o.thresholds("ru", 1.3))
    assert np.allclose(mu.numpy(), opt, rtol=0.1, atol=0.003), (mu, opt)
    assert np.allclose(thr.numpy(), o.thresholds("ru", 1.3), rtol=0.06)  # estimated vs exact thresholds
    x = f.final_samples(mu, 4000, torch.Generator().manual_seed(1))
    assert GMMEvaluator(g, idx, o).evaluate(x, "ru", mu.tolist())["kl_to_target"] < 0.1
    grid, logp = o.target_log_density("ru", mu.numpy())
    exact_kl = grid.kl(logp, grid.normalize_log(o.log_pre(grid.points)))
    assert abs(f.final_metrics(mu)["kl_to_pretrained"] - exact_kl) < 0.1 * exact_kl + 0.01, (f.final_metrics(mu), exact_kl)


def test_ru_resampling_is_systematic_and_paired_with_the_pretrained_samples():
    """Each pool sample appears floor or ceil of n w_j times (multinomial resampling would miss by
    about sqrt(n w_j)); the pretrained samples are the pool at uniform weights, drawn from the same
    quantiles, so where the weights are flat the two sets hold the same samples."""
    setup, _ = exact_setup(*GEOMETRIES[1])
    cfg = formulation_cfg("ru", threshold_factor=1.3, batch_size=16, kl_estimator="ratio", final_samples="resample")
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 10), torch.Generator().manual_seed(0), None, False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    llr = torch.randn(200, 2, generator=g, dtype=torch.float64) * 2
    llr[100:] = -3.0  # half the pool: equal log-ratios, so equal weights there
    f._pool = f._pre_pool = Pool.pretrained(x, llr)
    mu = torch.tensor([0.2, 0.1])
    n = 1000
    w = f._weights(mu)[1]
    xs, xp = f.final_samples(mu, n, torch.Generator().manual_seed(5)), f.pretrained_samples(n, torch.Generator().manual_seed(5))
    for samples, weights in ((xs, w), (xp, torch.full((200,), 1 / 200, dtype=torch.float64))):
        idx = torch.cdist(samples, x).argmin(1)
        counts = torch.bincount(idx, minlength=200).double()
        assert bool(((counts - n * weights).abs() < 1 + 1e-9).all()), (counts - n * weights).abs().max()
    assert not torch.equal(xs[:10], xs.sort(0).values[:10])  # permuted, not in pool order
    # paired: the same generator state draws the same quantiles and permutation, so at nearly uniform
    # weights most positions hold the same pool sample; an independent draw matches about 1 in 200
    near = f.final_samples(torch.tensor([0.005, 0.0]), n, torch.Generator().manual_seed(5))
    assert float((near == xp).all(1).double().mean()) > 0.5
    other = f.final_samples(torch.tensor([0.005, 0.0]), n, torch.Generator().manual_seed(6))
    assert float((other == xp).all(1).double().mean()) < 0.05


def test_ru_projection_keeps_target_proper():
    setup, _ = exact_setup(*GEOMETRIES[1])
    cfg = formulation_cfg("ru", threshold_factor=50.0, batch_size=16, max_multiplier_sum=0.9)
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 10), torch.Generator().manual_seed(0), None, False)
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


def _weighted_lu(setup, anchor: bool):
    from unlearn.formulations.lu import LikelihoodUnlearning

    # grad_clip 0 and all sampler steps: the settings this check was written with
    cfg = formulation_cfg("lu", gradient="weighted", likelihood="exact", weighted_anchor=anchor, primal_lr=1e-3,
                          threshold_factor=0.5, batch_size=64, likelihood_timesteps=8, likelihood_noise=1,
                          grad_clip=0.0, grad_timesteps=None)
    return LikelihoodUnlearning(cfg, setup, GaussianSampler(SCHED, 10), torch.Generator().manual_seed(0), None, False)


def test_anchored_weighted_primal_leaves_the_pretrained_model_alone_at_uniform_weights():
    """weighted_anchor: with uniform weights (lam = 0) the loss and its gradient are exactly 0 at the
    pretrained model, whatever the pool; the plain weighted loss fits the pool (non-zero gradient)."""
    import copy

    from unlearn.models.resnet import ResNetDenoiser

    g, idx = GEOMETRIES[0]
    torch.manual_seed(0)
    net = ResNetDenoiser(2, SCHED, num_layers=2, hidden=32)
    pre = copy.deepcopy(net).requires_grad_(False)
    setup = UnlearningSetup("gmm", pre, net, [ExactGMMScore(c, SCHED) for c in GMMOracle(g, idx).concepts], ["2"], [],
                            oracle=GMMOracle(g, idx))
    x0 = g.sample(256, torch.Generator().manual_seed(1)).float()
    w = torch.full((256,), 1 / 256)
    for anchor in (True, False):
        f = _weighted_lu(setup, anchor)
        net.zero_grad()
        loss = f._weighted_loss(x0, w)
        loss.backward()
        gnorm = sum(float(p.grad.norm()) for p in net.parameters() if p.grad is not None)
        if anchor:
            assert float(loss) == 0.0 and gnorm == 0.0
        else:
            assert float(loss) > 0.1 and gnorm > 1e-3


@pytest.mark.parametrize("right_reference", [True, False])
def test_anchored_weighted_loss_differs_from_the_plain_one_by_a_constant(right_reference):
    """The anchored loss minus the plain one is ``mean_j 2 f(x_t^j).(e_j - eps_pre(x_t^j))`` plus terms
    without f: for pool samples of p_pre and the exact eps_pre its expectation does not depend on the
    model f, so both losses have the same minimiser (the target's denoiser). Checked between two
    models f1, f2 (a random ResNet and the exact denoiser of the mixture without the unlearned
    component) on 20,000 exact mixture samples, at the weights exp(-l) of the exact l, against 4
    standard errors; with a wrong reference (a shifted mixture's exact denoiser) the difference is
    far outside them, so the check can fail."""
    from unlearn.models.gmm import GaussianMixture as GM
    from unlearn.models.resnet import ResNetDenoiser

    g, idx = GEOMETRIES[0]
    o = GMMOracle(g, idx)
    torch.manual_seed(0)
    f1 = ResNetDenoiser(2, SCHED, num_layers=2, hidden=32)
    f2 = ExactGMMScore(GM(g.means[:2].tolist(), g.stds[:2].tolist(), [1, 1]), SCHED)
    ref = ExactGMMScore(g if right_reference else GM((g.means + 0.7).tolist(), g.stds.tolist(), [1, 1, 1]), SCHED)
    setup = UnlearningSetup("gmm", ref, f1, [ExactGMMScore(c, SCHED) for c in o.concepts], ["2"], [], oracle=o)
    f = _weighted_lu(setup, True)
    m = 20000
    x0 = g.sample(m, torch.Generator().manual_seed(1)).float()
    w = torch.softmax(-torch.exp(o.log_l(x0)).float().squeeze(-1), 0)

    def loss(model, anchor):
        f.setup.model, f.anchor = model, anchor
        f.gen.manual_seed(5)  # the same t and noise for every loss
        with torch.no_grad():
            return float(f._weighted_loss(x0, w))

    delta = (loss(f1, True) - loss(f2, True)) - (loss(f1, False) - loss(f2, False))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, SCHED.T, (m,), generator=gen)
    e = torch.randn(x0.shape, generator=gen)
    xt = SCHED.add_noise(x0, e, t)
    with torch.no_grad():
        per = (2 * (f1.eps(xt, t) - f2.eps(xt, t)) * (e - ref.eps(xt, t))).sum(1) / 2
    assert delta == pytest.approx(float(per.mean()), abs=1e-4)  # the code computes the formula above
    se = float(per.std()) / m**0.5
    assert abs(loss(f1, False) - loss(f2, False)) > 50 * se  # the two models' losses differ by far more
    if right_reference:
        assert abs(delta) < 4 * se, (delta, se)
    else:
        assert abs(delta) > 8 * se, (delta, se)


def _default_ru(g, idx, factor, dual_steps=40, **overrides):
    """Dual-only RU with the formulation's and the constrained method's default settings (their YAML)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    cfg = formulation_cfg("ru", threshold_factor=factor, **overrides)
    method = OmegaConf.load(root / "method" / "constrained.yaml")
    setup, o = exact_setup(g, idx)
    f = ReverseKLUnlearning(cfg, setup, GaussianSampler(SCHED, 50), torch.Generator().manual_seed(0), None, False)
    dual = DualAscent(len(idx), float(cfg.dual_lr), projection=f.project, rule=str(method.dual_step),
                      damping=float(method.newton_damping), max_growth=float(method.newton_max_growth))
    mu, values, thr, extra = PrimalDual(f, dual, dual_steps, 0, show_progress=False).run()
    return f, o, mu, values, thr, extra


def test_ru_with_a_threshold_per_concept_finds_the_oracle_multipliers():
    """``threshold_reference: each``: concept i must move ``factor`` times its own pretrained KL away. On a
    mixture where the paper's shared threshold (the mean) leaves the nearer concept's constraint
    inactive (mixture 1, factor 1.5: exact multipliers 0.026 and 0), both are active (0.0103, 0.0040)
    and the default RU finds them within 20% (+0.003), every exact constraint within 10% of its threshold."""
    from unlearn.models.gmm import draw_mixture

    m = draw_mixture(1)
    g = GaussianMixture(m["means"], m["stds"], m["weights"])
    f, o, mu, values, thr, extra = _default_ru(g, m["unlearn"], 1.5, threshold_reference="each")
    pre = ReverseKLUnlearning.oracle_pretrained_values(o)
    b = ReverseKLUnlearning.oracle_thresholds(o, 1.5, "each")  # the oracle's, by the run's own rule
    assert np.allclose(b, 1.5 * pre) and not np.allclose(b, o.thresholds("ru", 1.5))
    opt = o.optimal_multipliers("ru", b)
    assert np.all(opt > 3e-3) and o.optimal_multipliers("ru", o.thresholds("ru", 1.5))[1] < 1e-4
    assert np.allclose(thr.numpy(), b, rtol=0.05), (thr, b)  # estimated pretrained KLs, each its own threshold
    assert np.allclose(mu.numpy(), opt, rtol=0.2, atol=0.003), (mu, opt)
    exact = o.constraint_values("ru", mu.numpy())
    assert np.all(np.abs(exact - b) < 0.1 * b), (exact, b)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_ru_on_random_mixtures_with_default_settings(seed):
    """Mixtures no setting was tuned on (``draw_mixture``), whose optima reweight the pretrained model
    so far that its own samples cannot carry the target (seed 0: pool ESS 1.1 at the first Newton
    step; seed 7: the second concept's KL must rise from 26 to 102 nats; seed 1: a mild one, whose second
    constraint is inactive at the optimum): with exact denoisers the
    default RU (Newton dual steps, the pool re-centred by SMC) finds multipliers within 20% (+0.003)
    of the oracle's and ends with every exact constraint value within 10% of its exact threshold. Both
    targets lie where the pretrained model has almost no samples (KL 4.6 and 19 nats from it), so the
    run calls itself unreliable with that reason: with trained denoisers the same runs miss by 24-58%
    (their scores there are extrapolations), and the estimator cannot tell exact scores from learned."""
    from unlearn.models.gmm import draw_mixture

    m = draw_mixture(seed)
    factor = {0: 1.62, 1: 1.69, 7: 1.26}[seed]
    g = GaussianMixture(m["means"], m["stds"], m["weights"])
    f, o, mu, values, thr, extra = _default_ru(g, m["unlearn"], factor)
    b = o.thresholds("ru", factor)
    opt = o.optimal_multipliers("ru", b)
    assert np.allclose(mu.numpy(), opt, rtol=0.2, atol=0.003), (mu, opt)
    exact = o.constraint_values("ru", mu.numpy())
    active = opt > 1e-3
    assert np.all(np.abs(exact[active] - b[active]) < 0.1 * b[active]), (exact, b)
    assert np.all(exact >= 0.9 * b), (exact, b)
    assert f.trusted(mu) and not extra["dual"]["oscillating"]
    if seed == 1:
        assert f.reliability(mu) is None and f.support_ess(mu) > 0.3 * len(f.pool())
        return
    assert f.refreshes >= 1 and f.support_ess(mu) < f.min_ess()
    assert "pretrained model has almost no samples" in f.reliability(mu)


class ResidualScore(ScoreModel):
    """A trainable model that starts exactly at ``base``: ``base.eps + net.eps`` with the ResNet's
    output layer at zero (no pretraining needed)."""

    def __init__(self, base, hidden=32):
        super().__init__()
        from unlearn.models.resnet import ResNetDenoiser

        self.base, self.schedule, self.sample_shape = base, base.schedule, base.sample_shape
        self.net = ResNetDenoiser(base.sample_shape[0], base.schedule, num_layers=2, hidden=hidden, time_embed_dim=16)

    def eps(self, x, t, cond=None):
        return self.base.eps(x, t) + self.net.eps(x, t)


def _lu(g, idx, overrides=None, seed=0):
    from pathlib import Path

    from unlearn.formulations.lu import LikelihoodUnlearning

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "formulation" / "lu.yaml")
    cfg.merge_with(overrides or {})
    o = GMMOracle(g, idx)
    pre = ExactGMMScore(g, SCHED)
    setup = UnlearningSetup("gmm", pre, ResidualScore(pre), [ExactGMMScore(c, SCHED) for c in o.concepts],
                            [str(i) for i in idx], [], oracle=o)
    f = LikelihoodUnlearning(cfg, setup, GaussianSampler(SCHED, 100), torch.Generator().manual_seed(seed), None, False)
    return f, o


def test_lu_reference_is_precise_enough_for_its_factor():
    """The pretrained ``E[l]`` that sets LU's threshold, on ``reference_samples`` samples (exact ``l``,
    exact denoisers): within 4 standard errors (+1% for the sampler) of its exact value 1, and its
    reported standard error is the sampling error ``sqrt((1/w - 1)/n)`` (within 15%): 0.022 with
    4,096 samples, where 256 give 0.088 -- a threshold 9% off at one standard error."""
    g = GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5] * 3, [1, 1, 1])
    f, _ = _lu(g, [2], {"likelihood": "exact", "reference_samples": 4096})
    pre = float(f.pretrained_values()[0])
    se = float(f.reference_se[0])
    expected_se = ((3 - 1) / 4096) ** 0.5
    assert abs(se - expected_se) < 0.15 * expected_se, (se, expected_se)
    assert abs(pre - 1.0) < 4 * se + 0.01, (pre, se)
    f256, _ = _lu(g, [2], {"likelihood": "exact", "batch_size": 256})
    f256.pretrained_values()
    assert float(f256.reference_se[0]) > 3 * se and f256.diagnostics(torch.zeros(1))["reference_samples"] == 256
