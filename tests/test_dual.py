"""The dual step rules on problems with known answers."""
import pytest
import torch

from unlearn.dual import DualAscent


def linear_problem(scale: float, b=(2.0, 1.0)):
    """Constraints ``g(mu) = scale * (g0 + J mu) >= scale * b`` (sense ">="), optimum ``J^{-1}(b - g0)``."""
    g0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    J = torch.tensor([[4.0, 1.0], [0.5, 2.0]], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    opt = torch.linalg.solve(J, b - g0)

    def violation(mu):
        return scale * (b - (g0 + J @ mu.double()))

    return violation, -scale * J, opt


def run(rule, violation, jac, steps=30, lr=0.1, **kw):
    d = DualAscent(2, lr, rule=rule, **kw)
    for _ in range(steps):
        mu = d.value()
        d.update(violation(mu).float(), jacobian=jac if rule == "newton" else None)
    return d


@pytest.mark.parametrize("scale", [0.1, 1.0, 100.0])
def test_newton_converges_whatever_the_units(scale):
    """Constraints of any scale: the Newton rule lands on the optimum (a linear problem: at once, within
    its growth cap); plain steps of a fixed size diverge or crawl as the scale changes."""
    violation, jac, opt = linear_problem(scale)
    d = run("newton", violation, jac, steps=8)
    assert torch.allclose(d.value().double(), opt, atol=1e-5), (d.value(), opt)
    plain = run("plain", violation, None, steps=8, lr=0.1)
    assert not torch.allclose(plain.value().double(), opt, atol=1e-2)  # 0.1 is right for no scale at all
    assert d.oscillation([[0.0, 0.0]] * 8)["oscillating"] is False


def test_plain_steps_oscillate_and_are_reported():
    violation, _, opt = linear_problem(1.0)
    d = DualAscent(2, 0.6)  # above the stable step 2 / 4.4 for the larger curvature: a cycle through 0
    hist = []
    for _ in range(40):
        d.update(violation(d.value()).float())
        hist.append(d.value().tolist())
    osc = d.oscillation(hist)
    assert osc["oscillating"] and max(osc["sign_flip_share"]) > 0.9, osc


def test_newton_caps_growth_and_halving():
    """A positive multiplier at most triples (``max_growth=3``) and at most halves per step; one at 0 may
    leave 0 by the full step; a satisfied constraint at 0 does not move."""
    d = DualAscent(3, 1.0, rule="newton", init=[0.1, 0.1, 0.0])
    jac = -torch.eye(3, dtype=torch.float64) * 1e-3  # tiny curvature: huge Newton steps
    d.update(torch.tensor([1.0, -1.0, 0.5]), jacobian=jac)
    assert torch.allclose(d.value(), torch.tensor([0.3, 0.05, 500.0]), rtol=1e-5), d.value()
    d2 = DualAscent(1, 1.0, rule="newton")
    d2.update(torch.tensor([-1.0]), jacobian=-torch.eye(1, dtype=torch.float64))
    assert float(d2.value()) == 0.0


def test_a_curvature_of_the_wrong_sign_still_ascends():
    d = DualAscent(1, 1.0, rule="newton", init=0.5)
    d.update(torch.tensor([-1.0]), jacobian=torch.tensor([[+2.0]], dtype=torch.float64))  # says "increase"
    assert float(d.value()) < 0.5  # the constraint holds with slack: the multiplier falls


def test_trusted_region_and_recentering():
    """Steps stop where ``trusted`` fails (halving the step); ``recenter`` then sees the new iterate."""
    seen = []
    d = DualAscent(1, 1.0, rule="newton")
    d.update(torch.tensor([1.0]), jacobian=-torch.eye(1, dtype=torch.float64) * 0.5,  # Newton: 0 -> 2
             trusted=lambda mu: float(mu[0]) <= 0.3, recenter=lambda mu: seen.append(float(mu[0])) or True)
    assert 0.2 < float(d.value()) <= 0.3 and seen == [float(d.value())]
    assert d.rules_used == ["newton+trust+recenter"]


def test_bad_rule_settings_are_config_errors():
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="method.dual_step"):
        DualAscent(1, 0.1, rule="secant")
    with pytest.raises(ConfigError, match="method.newton_damping"):
        DualAscent(1, 0.1, rule="newton", damping=0.0)
    with pytest.raises(ConfigError, match="method.newton_max_growth"):
        DualAscent(1, 0.1, rule="newton", max_growth=1.0)


def test_sign_flips_within_the_noise_are_not_oscillation():
    """Violations that flip sign but stay within two standard errors of 0 (an estimate's noise near
    the optimum) do not count; the same flips beyond them do."""
    def run_flips(se):
        d = DualAscent(1, 0.1, rule="newton", init=1.0)
        hist = []
        for k in range(20):
            v = torch.tensor([0.05 if k % 2 else -0.05])
            d.update(v, jacobian=-torch.eye(1, dtype=torch.float64) * 0.01, noise=torch.tensor([se]))
            hist.append(d.value().tolist())
        return d.oscillation(hist)

    assert run_flips(0.1)["oscillating"] is False and run_flips(0.1)["sign_flip_share"] == [0.0]
    assert run_flips(0.001)["sign_flip_share"] == [1.0]
