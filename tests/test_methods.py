"""Methods as classes: each ``configs/method/*.yaml`` builds its registered class; ``method.multiplier``
is validated in one place; ``method=baseline`` is each formulation's paper baseline, number for number."""
import json

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose_cfg
from unlearn.config import ConfigError
from unlearn.dual import DualAscent, FixedMultipliers
from unlearn.methods import METHODS, build_method
from unlearn.train import build, train

METHOD_FILES = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHOD_FILES)
def test_every_method_yaml_builds_its_registered_class(name):
    cfg = compose_cfg([f"method={name}"])
    method = build_method(cfg.method)
    assert type(method) is METHODS[name] and method.name == name == cfg.method.name
    assert cfg.method._target_ == f"{type(method).__module__}.{type(method).__qualname__}"
    assert type(method).__module__.startswith("unlearn.methods.")
    assert "learnable" not in cfg.method  # the class says whether its multipliers move


@pytest.mark.parametrize("form,runs,distils", [("lu", "esd", True), ("ru", "fixed", False), ("fu", "fixed", False)])
def test_baseline_is_the_formulations_paper_baseline(form, runs, distils):
    from unlearn.formulations.base import formulation_class

    fcls = formulation_class(form)
    method = build_method(compose_cfg([f"formulation={form}", "method=baseline"]).method).resolve(fcls)
    assert type(method) is METHODS[runs] and method.label == "baseline"
    assert method.target_distillation is distils and not method.learnable


@pytest.mark.parametrize("form", ["lu", "ru", "fu"])
@pytest.mark.parametrize("method", ["constrained", "fixed", "esd", "baseline"])
def test_each_method_builds_its_multipliers(form, method):
    if method == "esd" and form == "fu":
        pytest.skip("no ESD-style target without concept models (tested below)")
    weight = [] if method == "constrained" else ["method.multiplier=0.25"]
    setup, _, f, mu, _ = build(compose_cfg([f"formulation={form}", f"method={method}", *weight]), show_progress=False)
    assert f.method is not None and f.method.learnable == (method == "constrained") == mu.learnable
    assert isinstance(mu, DualAscent if method == "constrained" else FixedMultipliers)
    if method == "constrained":
        assert mu.value().tolist() == [0.0] * f.num_constraints
    elif method == "esd" and form == "ru":  # RU's target at mu = eta / (1 + eta)
        assert mu.value().tolist() == pytest.approx([0.25 / 1.25])
    else:
        assert mu.value().tolist() == pytest.approx([0.25] * f.num_constraints)


BAD = [
    (["formulation=lu", "method=fixed", "method.multiplier=-0.1"], "method.multiplier must be >= 0"),
    (["formulation=fu", "method=baseline", "method.multiplier=[0.1,-1]"], "method.multiplier must be >= 0"),
    (["formulation=lu", "method=esd", "method.multiplier=-2"], "method.multiplier must be >= 0"),
    (["formulation=lu", "method=fixed", "method.multiplier=[0.1,0.2]"], "method.multiplier must be one number or a list of 1"),
    (["formulation=fu", "method=fixed", "method.multiplier=[0.1,0.2,0.3]"], "method.multiplier must be one number or a list of 1"),
    (["formulation=ru", "method=fixed", "method.multiplier=1.0"], "method.multiplier: fixed RU multipliers must sum to < 1"),
    (["formulation=ru", "method=baseline", "method.multiplier=0.6", "model.unlearn=[0,2]"],
     "method.multiplier: fixed RU multipliers must sum to < 1"),
    (["formulation=ru", "method=fixed", "method.multiplier=[0.5,0.5]", "model.unlearn=[0,2]"],
     "method.multiplier: fixed RU multipliers must sum to < 1"),
    (["formulation=ru", "method=fixed", "method.multiplier=abc"], "method.multiplier must be a number"),
    (["formulation=ru", "method=fixed", "method.multiplier=null"], "method.multiplier must be set for method=fixed"),
    (["formulation=fu", "method=esd"], "method=esd needs concept models (formulation=lu or ru)"),
    (["formulation=lu", "method=constrained", "formulation.dual_lr=0"], "method.dual_lr must be > 0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_method_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        build(compose_cfg(overrides), show_progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def _values(s):
    return s["multipliers"], [c["value"] for c in s["constraints"]]


@pytest.mark.parametrize("form,same", [("ru", "fixed"), ("fu", "fixed"), ("lu", "esd")])
def test_baseline_gives_exactly_the_numbers_of_its_method(form, same, tmp_path):
    over = [f"formulation={form}", "method.multiplier=0.2"]
    base = train(compose_cfg(over + ["method=baseline"]), run_dir=tmp_path / "baseline")
    other = train(compose_cfg(over + [f"method={same}"]), run_dir=tmp_path / same)
    assert _values(base) == _values(other)
    assert base["oracle_target"] == other["oracle_target"] and base["method"] == "baseline"


def test_esd_and_fixed_weights_on_ru_and_lu(tmp_path):
    """RU: ESD with eta = 0.25 is fixed weights at mu = 0.25 / 1.25 = 0.2 (the same run); eta may exceed
    RU's ``sum mu < 1``. LU: ESD aims at RU's target at eta / (1 + eta); fixed weights keep the Lagrangian
    primal and aim at LU's own target."""
    esd = train(compose_cfg(["formulation=ru", "method=esd", "method.multiplier=0.25"]), run_dir=tmp_path / "esd")
    fixed = train(compose_cfg(["formulation=ru", "method=fixed", "method.multiplier=0.2"]), run_dir=tmp_path / "fixed")
    assert _values(esd) == _values(fixed)
    _, _, f, mu, _ = build(compose_cfg(["formulation=ru", "method=esd", "method.multiplier=3.0"]), show_progress=False)
    assert mu.value().tolist() == pytest.approx([0.75])
    lu_esd = train(compose_cfg(["formulation=lu", "method=esd", "method.multiplier=0.5"]), run_dir=tmp_path / "lu_esd")
    lu_fixed = train(compose_cfg(["formulation=lu", "method=fixed", "method.multiplier=0.5"]), run_dir=tmp_path / "lu_fx")
    assert lu_esd["oracle_target"] == {"formulation": "ru", "multipliers": pytest.approx([0.5 / 1.5])}
    assert lu_fixed["oracle_target"] == {"formulation": "lu", "multipliers": [0.5]}
    assert lu_esd["multipliers"] == lu_fixed["multipliers"] == [0.5]
    losses = [json.loads(l)["losses"] for l in (tmp_path / "lu_esd" / "metrics.jsonl").read_text().splitlines()]
    assert all("esd_kl" in r for r in losses)  # the ESD-style primal
    losses = [json.loads(l)["losses"] for l in (tmp_path / "lu_fx" / "metrics.jsonl").read_text().splitlines()]
    assert not any("esd_kl" in r for r in losses)  # the Lagrangian's


def test_a_method_target_must_be_a_method_class():
    """A new method is a class and a config; the toy one runs through tests/test_contract.py."""
    with pytest.raises(ConfigError, match="method._target_ must name a method class"):
        build_method(OmegaConf.create({"name": "x", "_target_": "unlearn.dual.DualAscent"}))
