"""Slow checks (minutes): trained GMM runs against the oracle. Run with `make test-slow`."""
import numpy as np
import pytest

from conftest import compose_cfg
from unlearn.train import train

pytestmark = pytest.mark.slow

OTHER = ["model.means=[[-2,0],[2,0],[0,3]]", "model.stds=[0.5,0.5,0.5]", "model.weights=[0.5,0.3,0.2]",
         "model.unlearn=[1,2]"]


def _run(overrides, tmp_path):
    return train(compose_cfg(["logger=none", "progress=false"] + overrides, tiny=False), run_dir=tmp_path)


@pytest.mark.parametrize("form", ["lu", "ru", "fu"])
def test_default_constrained_runs_satisfy_constraints(form, tmp_path):
    s = _run([f"formulation={form}"], tmp_path)
    for c in s["constraints"]:
        slack = 0.1 * abs(c["threshold"])
        ok = c["value"] >= c["threshold"] - slack if c["sense"] == ">=" else c["value"] <= c["threshold"] + slack
        assert ok, c


def test_ru_multipliers_match_oracle_on_other_geometry(tmp_path):
    s = _run(["formulation=ru"] + OTHER, tmp_path)
    mu, opt = np.array(s["multipliers"]), np.array(s["oracle"]["multipliers"])
    assert np.all(np.abs(mu - opt) <= 0.2 * np.abs(opt) + 0.003), (mu, opt)
    assert s["metrics"]["kl_to_target"] < 0.15


@pytest.mark.parametrize("anchor", [False, True])
def test_lu_multipliers_match_oracle_on_other_geometry_with_exact_likelihoods(anchor, tmp_path):
    """The primal-dual machinery (weighted primal, averaged multipliers and weights) against the
    oracle, with the exact l = q/p_pre and 25 dual steps: measured (seed 0) +6% / +3% of the oracle,
    kl_to_target 0.054, constraints 0.083 <= 0.092 and 0.104 vs 0.091 (+14%: the fitted model is not
    exactly the target). With the GMM tuning's 20 dual steps constraint 2 ends at 0.127 (+40%).
    The anchored weighted loss (``formulation.weighted_anchor=true``, same minimiser): +16% / +15%,
    kl_to_target 0.035, constraints 0.088 <= 0.092 and 0.088 <= 0.091. Both measured with plain dual
    steps; with full Newton steps the weighted primal (half-way to a new target within 25 primal
    steps) overshoots, anchored +12% / +24%, hence the damping of 0.5 here."""
    s = _run(["formulation=lu", "formulation.likelihood=exact", "formulation.dual_steps=25",
              f"formulation.weighted_anchor={str(anchor).lower()}", "method.newton_damping=0.5"]
             + OTHER, tmp_path)
    mu, opt = np.array(s["multipliers"]), np.array(s["oracle"]["multipliers"])
    assert np.all(np.abs(mu - opt) <= 0.2 * np.abs(opt)), (mu, opt)
    assert s["metrics"]["kl_to_target"] < 0.1
    assert all(c["value"] <= 1.2 * c["threshold"] for c in s["constraints"]), s["constraints"]


def test_lu_multipliers_match_oracle_on_other_geometry(tmp_path):
    """LU as a user runs it (the Lemma-2 likelihood estimator with its fitted timestep proposal, the
    GMM tuning): measured +12% / +17% (seed 0) and +10% / +15% (seed 1) of the oracle."""
    s = _run(["formulation=lu"] + OTHER, tmp_path)
    mu, opt = np.array(s["multipliers"]), np.array(s["oracle"]["multipliers"])
    assert np.all(np.abs(mu - opt) <= 0.2 * np.abs(opt)), (mu, opt)
    assert s["metrics"]["kl_to_target"] < 0.15
    assert all(c["satisfied"] for c in s["constraints"]), s["constraints"]
