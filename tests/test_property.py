"""Default LU and RU runs on random mixtures against the exact oracle (``draw_mixture``).

Geometries no setting was tuned on: 3-5 components in 2-D, widths 0.3-0.8, weights varied, one or
two unlearned, pretrained KL(p_pre || q_i) 20-200 nats; LU factors drawn from 0.1-0.3, RU from
1.2-2, every run with the default settings. A run either meets its checks (multipliers within 20%
of the exact optimum, every final constraint satisfied within 10% of its threshold, and the unlearned
mass moved) or calls itself ``unreliable``
with its reason, which it may only do where the exact optimum is indeed far from the pretrained
model. The slow version runs eight mixtures per formulation; ``docs/`` gives its table."""
import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from unlearn.models.gmm import GaussianMixture, GMMOracle, draw_mixture
from unlearn.train import train

SEEDS = list(range(8))
FACTORS = {"lu": (0.1, 0.3), "ru": (1.2, 2.0)}


def factor(form: str, seed: int) -> float:
    return float(np.round(np.random.default_rng(1000 + seed).uniform(*FACTORS[form]), 2))


def mixture_overrides(m: dict) -> list[str]:
    return [f"model.means={m['means']}".replace(" ", ""), f"model.stds={m['stds']}".replace(" ", ""),
            f"model.weights={m['weights']}".replace(" ", ""), f"model.unlearn={m['unlearn']}".replace(" ", "")]


def optimum_far_from_pretrained(m: dict, form: str, b) -> bool:
    """The exact optimum's importance weights over the pretrained model: effective share below 5%."""
    o = GMMOracle(GaussianMixture(m["means"], m["stds"], m["weights"]), m["unlearn"])
    grid, logp = o.target_log_density(form, o.optimal_multipliers(form, b))
    lpre = grid.normalize_log(o.log_pre(grid.points))
    return float(torch.exp(-(torch.logsumexp(lpre + 2 * (logp - lpre), 0) + math.log(grid.dv)))) < 0.05


def check(s: dict, m: dict, form: str) -> str | None:
    """``None`` when the run passes; else what failed."""
    opt, b = np.array(s["oracle"]["multipliers"]), np.array(s["oracle"]["thresholds"])
    if s["status"] == "unreliable":
        if "formulation." not in s["verdict"]:
            return f"unreliable without naming a setting: {s['verdict']}"
        return None if optimum_far_from_pretrained(m, form, b) else f"unreliable where the optimum is near: {s['verdict']}"
    if s["status"] != "completed":
        return f"status {s['status']}: {s.get('verdict')}"
    mu = np.array(s["multipliers"])
    atol = 0.003 if form == "ru" else 0.02
    if not np.all(np.abs(mu - opt) <= 0.2 * np.abs(opt) + atol):
        return f"multipliers {mu.round(4).tolist()} vs optimum {opt.round(4).tolist()}"
    for c in s["constraints"]:
        v, t = c["value"], c["threshold"]
        if not (v >= 0.9 * t if c["sense"] == ">=" else v <= 1.1 * t):
            return f"constraint {c['name']} = {v:.4g} vs threshold {t:.4g}"
    pre, post = s["pretrained_metrics"]["unlearned_mass"], s["metrics"]["unlearned_mass"]
    if opt.max() > 1e-3 and not post < pre - 0.01:
        return f"the model did not move: unlearned mass {pre:.3f} -> {post:.3f}"
    return None


def run(form: str, seed: int, tmp_path) -> tuple[dict, dict]:
    m = draw_mixture(seed)
    cfg = compose_cfg(["logger=none", "progress=false", f"formulation={form}",
                       f"formulation.threshold_factor={factor(form, seed)}", *mixture_overrides(m)], tiny=False)
    return train(cfg, run_dir=tmp_path / f"{form}_{seed}"), m


@pytest.mark.slow
@pytest.mark.parametrize("form", ["lu", "ru"])
def test_default_runs_on_eight_random_mixtures(form, tmp_path):
    """Every run passes or says it is unreliable where the optimum is far; most (6 of 8 LU, 4 of 8 RU)
    are reliable (measured, seed 0 of each run: see docs/property.md)."""
    results = []
    for seed in SEEDS:
        s, m = run(form, seed, tmp_path)
        results.append((seed, s["status"], check(s, m, form), s["multipliers"], s["oracle"]["multipliers"]))
    table = "\n".join(str(r) for r in results)
    assert all(r[2] is None for r in results), table
    reliable = sum(r[1] == "completed" for r in results)
    assert reliable >= {"lu": 6, "ru": 4}[form], table
