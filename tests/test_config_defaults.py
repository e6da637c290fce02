"""One source of defaults: every option of every config group (and every preset) composes and
resolves, and no code reads a config key with a default of its own (the YAML is the only place a
default lives; see docs/config.md)."""
from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import unlearn.config  # noqa: F401  (registers the `pick` resolver)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PACKAGE = ROOT / "unlearn"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def compositions() -> list[list[str]]:
    """Every model x formulation with the constrained method, every method with every formulation on
    the two testbeds (the method group meets the model only in tuning/method/), every preset with both
    methods it sweeps, every logger. (The full product adds only method choices no other layer sees.)"""
    methods = options("method")
    runs = [[f"model={m}", f"formulation={f}", f"method={me}"]
            for m, f, me in itertools.product(options("model"), options("formulation"), ("constrained",))]
    runs += [[f"model={m}", f"formulation={f}", f"method={me}"]
             for m, f, me in itertools.product(("gmm", "digits"), options("formulation"), methods)
             if me != "constrained"]
    runs += [[f"experiment={e}", f"method={me}"] for e in options("experiment") for me in ("constrained", "baseline")]
    runs += [[f"logger={lg}"] for lg in options("logger")]
    return runs


def test_every_composition_resolves():
    from hydra import compose, initialize_config_dir

    failed = []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for overrides in compositions():
            try:
                OmegaConf.to_container(compose("train", overrides=overrides), resolve=True, throw_on_missing=True)
            except Exception as exc:  # noqa: BLE001  (collected: one report for all)
                failed.append(f"{' '.join(overrides)}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)


def test_no_select_fallbacks_in_configs():
    """``${oc.select:key,default}`` is a second default; only ``oc.env`` may carry a fallback."""
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted(CONFIGS.rglob("*.yaml"))
           for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\$\{oc\.select:", line)]
    assert not bad, "oc.select fallbacks (put the value in the YAML that owns the key):\n" + "\n".join(bad)


# `.get(key, default)` receivers that are not project config, by file (a reason each). Any other
# receiver of a literal-key `.get` with a non-None default counts as a config read and fails.
NOT_CONFIG = {
    ("distributed.py", "os.environ"): "environment variables",
    ("models/weights.py", "os.environ"): "environment variables",
    ("metrics/weights.py", "os.environ"): "environment variables",
    ("dual.py", "state"): "a checkpoint's state dict (older checkpoints may lack keys)",
    ("primal_dual.py", "avg"): "a checkpoint's state dict",
    ("train.py", "state"): "a checkpoint's state dict",
    ("train.py", "plan.old_info or {}"): "run_info.json of an earlier session",
    ("train.py", "run.timing"): "measured timings",
    ("families/diffusers_family.py", "self.vae.config"): "the diffusers VAE's own config",
    ("families/diffusers_family.py", "self.comps['scheduler']"): "the diffusers scheduler JSON (hub or model.tiny)",
    ("models/diffusers_models.py", "sc"): "the diffusers scheduler JSON (hub or model.tiny)",
    ("metrics/clip.py", "cfg"): "open_clip's preprocessing config of the loaded model",
    ("metrics/clip.py", "pretrained_cfg"): "open_clip's pretrained-weights table",
    ("metrics/kid.py", "weights.record"): "a weights manifest record",
    ("metrics/suite.py", "r"): "metric results",
    ("metrics/weights.py", "out"): "a probe subprocess's JSON answer",
    ("formulations/lu.py", "losses"): "a dict of losses",
    ("figures.py", "s"): "summary.json of a finished run",
    ("figures.py", "summary"): "summary.json of a finished run",
    ("figures.py", "info"): "run_info.json of a finished run",
    ("property.py", "s"): "summary.json of a finished run",
}


def config_reads_with_defaults(source: str, rel: str) -> list[str]:
    """``X.get("<literal>", <non-None>)`` with X not in :data:`NOT_CONFIG`, and any
    ``OmegaConf.select(..., default=...)``, in one module's source."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            continue
        where = f"{rel}:{n.lineno}: {ast.unparse(n)}"
        if n.func.attr == "select" and ast.unparse(n.func.value) == "OmegaConf":
            if any(k.arg == "default" for k in n.keywords) or len(n.args) > 2:
                found.append(where)
            continue
        if n.func.attr != "get" or not n.args or not isinstance(n.args[0], ast.Constant) \
                or not isinstance(n.args[0].value, str):
            continue
        default = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == "default_value"), None)
        if default is None or (isinstance(default, ast.Constant) and default.value is None):
            continue
        if (rel, ast.unparse(n.func.value)) not in NOT_CONFIG:
            found.append(where)
    return found


def test_no_code_defaults_for_config_keys():
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        found += config_reads_with_defaults(p.read_text(), rel)
    for p in sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "train.py"]:
        found += config_reads_with_defaults(p.read_text(), p.relative_to(ROOT).as_posix())
    assert not found, ("config keys read with a code default (declare the key in its YAML and read it directly, "
                       "or add a non-config receiver to NOT_CONFIG with its reason):\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    'est = str(cfg.formulation.get("kl_estimator", "path"))',
    'clip = float(self.cfg.get("grad_clip", 0.0))',
    'x = OmegaConf.select(cfg, "train.final_primal", default="last")',
])
def test_the_scan_catches_a_reintroduced_default(line):
    assert config_reads_with_defaults(line, "formulations/ru.py"), line


def test_the_allowlist_names_receivers_that_exist():
    """A stale allowlist entry would silently excuse a future config read of the same name."""
    seen = set()
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE).as_posix()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get":
                seen.add((rel, ast.unparse(n.func.value)))
    assert not set(NOT_CONFIG) - seen, sorted(set(NOT_CONFIG) - seen)
