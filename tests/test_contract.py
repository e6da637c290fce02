"""The contract battery: every registered model family x formulation x method, on the offline
doubles, generated from the registries (a part is tested by being registered).

A toy family (a one-dimensional two-Gaussian mixture with exact scores) and a toy method (plain
dual ascent at half the configured step) are defined and registered here, outside the package,
and run through the same battery (the toy method with the toy family and the GMM).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from unlearn.checkpoint import FINISHED
from unlearn.config import ConfigError
from unlearn.dual import DualAscent
from unlearn.families import FAMILIES, Family, family_class, register_family
from unlearn.formulations.base import FORMULATIONS, formulation_class
from unlearn.methods import METHODS, Method, build_method, method_class
from unlearn.models.base import ScoreModel
from unlearn.models.gmm import ExactGMMScore, GaussianMixture
from unlearn.schedule import build_schedule
from unlearn.setup import UnlearningSetup
from unlearn.train import train
from unlearn.utils import generator


# -- a toy family and a toy method, registered from the test file --------------------------------
class _Corrected(ScoreModel):
    """The exact pretrained score plus a trainable affine correction that starts at zero."""

    def __init__(self, base: ScoreModel):
        super().__init__()
        self.base, self.schedule, self.sample_shape = base, base.schedule, base.sample_shape
        d = base.sample_shape[0]
        self.lin = torch.nn.Linear(d + 1, d)
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def eps(self, x, t, cond=None):
        t = self._timesteps(t, x)
        return self.base.eps(x, t) + self.lin(torch.cat([x, t[:, None].float() / 1000], 1))


@register_family("toy_line")
class ToyLine(Family):
    """Two Gaussians on a line; the right one is the concept."""

    double = {"name": "toy_line", "family": "toy_line", "width": 0.5, "final_samples": 128,
              "sampler": {"kind": "ddpm", "num_steps": 20, "eta": 1.0, "variance": "beta"}}

    @classmethod
    def validate(cls, m):
        if not float(m.width) > 0:
            raise ConfigError(f"model.width must be > 0 (got {m.width})")

    def setup(self):
        s = build_schedule("linear", 1e-4, 0.02, 1000)
        w = float(self.m.width)
        gmm = GaussianMixture([[-2.0], [2.0]], [w, w], [1.0, 1.0])
        pre = ExactGMMScore(gmm, s)
        forget = [gmm.subset([1]).sample(64, generator(1))] if "forget_sets" in self.needs else []
        return UnlearningSetup(name="toy_line", pretrained=pre, model=_Corrected(pre),
                               concepts=[ExactGMMScore(gmm.subset([1]), s)], concept_names=["right"],
                               forget_sets=forget, retain_sampler=gmm.sample)


class HalfStepAscent(Method):
    """Plain dual ascent at half of ``method.dual_lr``."""

    name = "toy_half_step"
    learnable = True

    def build_multipliers(self, formulation):
        return DualAscent(formulation.num_constraints, 0.5 * float(self.cfg.dual_lr), projection=formulation.project,
                          rule="plain")


TOY_METHOD = {"name": "toy_half_step", "dual_lr": 1.0e-3}


# -- the battery ---------------------------------------------------------------------------------
def _registries():
    family_class("gmm"), method_class("constrained"), formulation_class("lu")  # import the built-in parts
    return sorted(FAMILIES), sorted(FORMULATIONS), sorted(METHODS)


FAMILY_NAMES, FORMULATION_NAMES, METHOD_NAMES = _registries()


def _runs_as(method: str, formulation: str) -> str:
    """The registered method that actually runs (``baseline`` is each formulation's paper baseline)."""
    return build_method(OmegaConf.create({"name": method})).resolve(formulation_class(formulation)).name


# a method that resolves to another registered one (an alias) runs as that one's cell; the toy method
# of this file meets the toy family and the GMM (the package's parts meet every family)
CASES = [(fa, fo, me) for fa in FAMILY_NAMES for fo in FORMULATION_NAMES for me in METHOD_NAMES
         if _runs_as(me, fo) == me and (me != HalfStepAscent.name or fa in (ToyLine.name, "gmm"))]
ALIASES = [(fo, me) for fo in FORMULATION_NAMES for me in METHOD_NAMES if _runs_as(me, fo) != me]
FIXED_WEIGHT = 0.2  # below 1 / (number of concepts) of every double: RU's fixed weights must sum to < 1


def contract_config(family: str, formulation: str, method: str):
    """The config of one cell: the family's double, the formulation, the method, tiny budgets."""
    double = FAMILIES[family].double
    model = [f"model={double}"] if isinstance(double, str) else []
    in_configs = method in {p.stem for p in (compose_cfg.__globals__["CONFIGS"] / "method").glob("*.yaml")}
    cfg = compose_cfg(model + [f"formulation={formulation}", "num_threads=1", "metrics.eval_every=0",
                               "train.oracle_multipliers=false", "formulation.dual_steps=1"]
                      + ([f"method={method}"] if in_configs else []))
    if isinstance(double, dict):
        cfg.model = OmegaConf.create(double)
    if not in_configs:
        cfg.method = OmegaConf.create(TOY_METHOD if method == TOY_METHOD["name"] else {"name": method})
    if "multiplier" in cfg.method:
        cfg.method.multiplier = FIXED_WEIGHT
    cfg.train.final_samples = min(int(cfg.train.final_samples), 64)  # the contract, not the metrics' precision
    cfg.model.sampler.num_steps = min(int(cfg.model.sampler.num_steps), 4)
    if "esd_refresh_every" in cfg.formulation:  # the tiny budgets take one primal step per dual step
        cfg.formulation.esd_refresh_every = 1
    return cfg


def check_contract(cfg, run_dir) -> dict | None:
    """Run one cell and check what every run promises; a method that cannot solve the formulation
    must refuse it with one line before anything is built (returns None then)."""
    fcls = formulation_class(str(cfg.formulation.name))
    method = build_method(cfg.method).resolve(fcls)
    try:
        method.check_config(cfg, fcls)
    except ConfigError as refusal:
        with pytest.raises(ConfigError) as exc:
            train(cfg, run_dir)
        assert "\n" not in str(exc.value) and str(exc.value) == str(refusal)
        assert not (run_dir / "summary.json").exists()
        return None
    s = train(cfg, run_dir)
    assert s["status"] in FINISHED and s["verdict"], s.get("verdict")
    for f in ("config.yaml", "run_info.json", "metrics.jsonl", "model.pt", "summary.json"):
        assert (run_dir / f).exists(), f
    assert json.loads((run_dir / "summary.json").read_text())["multipliers"] == s["multipliers"]
    k = len(s["constraints"])
    assert k >= 1 and len(s["multipliers"]) == k
    assert all(np.isfinite(c["value"]) and np.isfinite(c["threshold"]) for c in s["constraints"])
    assert all(np.isfinite(m) and m >= 0 for m in s["multipliers"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dual_rows = [r for r in rows if "multipliers" in r and r.get("phase", "dual") == "dual"]
    assert len(dual_rows) == int(cfg.train.dual_steps)
    if not method.learnable:  # fixed weights stay where the config put them
        first = list(dual_rows[0]["multipliers"].values())
        assert all(list(r["multipliers"].values()) == pytest.approx(first) for r in dual_rows)
        assert s["multipliers"] == pytest.approx(first)
    state = torch.load(run_dir / "model.pt", weights_only=False)
    assert state["composed"] or state["state_dict"], "a trained model must be saved"
    assert all((run_dir / p).exists() for p in s["exported"]) and not (state["composed"] and s["exported"])
    again = train(cfg, run_dir)  # a finished run directory is left as it is and answers its summary
    assert again["multipliers"] == s["multipliers"]
    return s


# cells whose double pretrains a real pipeline and generates forget sets (18 s each on 2 cores): in the slow suite
SLOW_CELLS = {("digits_sd", "fu", "constrained"), ("digits_sd", "fu", "fixed")}


@pytest.mark.parametrize("family,formulation,method",
                         [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CELLS else c for c in CASES],
                         ids=["-".join(c) for c in CASES])
def test_contract(family, formulation, method, tmp_path):
    check_contract(contract_config(family, formulation, method), tmp_path)


@pytest.mark.parametrize("formulation,method", ALIASES, ids=["-".join(a) for a in ALIASES])
def test_an_alias_method_runs_a_registered_method_of_the_battery(formulation, method):
    """E.g. ``baseline``: the cells of the method it runs are in the battery (that it gives exactly
    their numbers is checked in tests/test_methods.py)."""
    runs = _runs_as(method, formulation)
    assert runs in METHOD_NAMES and all((fa, formulation, runs) in CASES for fa in FAMILY_NAMES)


def test_the_battery_covers_the_toys_and_every_shipped_part():
    assert "toy_line" in FAMILY_NAMES and "toy_half_step" in METHOD_NAMES
    assert {"gmm", "digits", "text2img", "ddpm", "classcond"} <= set(FAMILY_NAMES)
    assert {"lu", "ru", "fu"} <= set(FORMULATION_NAMES)
    assert {"constrained", "fixed", "esd", "baseline"} <= set(METHOD_NAMES)


def test_toy_method_moves_multipliers_at_half_the_step(tmp_path):
    cfg = contract_config("toy_line", "fu", "toy_half_step")
    cfg.formulation.dual_steps = 2
    s = check_contract(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, second = rows[0], rows[1]  # a row holds the multipliers its step used: step 2 has the first update
    name = s["constraints"][0]["name"]
    violation = first["constraints"][name]["threshold"] - first["constraints"][name]["value"]  # FU: value >= b
    assert violation > 0 and first["multipliers"][name] == 0.0
    assert second["multipliers"][name] == pytest.approx(0.5 * TOY_METHOD["dual_lr"] * violation, rel=1e-4)
