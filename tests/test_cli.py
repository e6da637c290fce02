"""The command line: Hydra entry, multirun sweeps, and one-line errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, TINY_BY_FORMULATION, WORKER_THREADS


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
    (["method=esd", "formulation=fu"], "method=esd needs concept models"),
    (["method=fixed", "method.multiplier=-1"], "method.multiplier"),
    (["formulation=lu", "formulation.gradient=magic"], "formulation.gradient"),
    (["formulation=lu", "formulation.weighted_anchor=maybe"], "formulation.weighted_anchor"),
    (["formulation=lu", "formulation.robust.steps=-1"], "formulation.robust.steps"),
    (["formulation=lu", "formulation.gradient=weighted", "formulation.robust.steps=1", "formulation.robust.radius=0"],
     "formulation.robust.radius"),
    (["formulation=lu", "formulation.weighted_correction_min_t=-5"], "formulation.weighted_correction_min_t"),
    (["formulation=ru", "formulation.separation_cap=-1"], "formulation.separation_cap"),
    (["formulation=ru", "formulation.threshold_reference=median"], "formulation.threshold_reference"),
    (["train.cache_pretrained_eval=sometimes"], "train.cache_pretrained_eval"),
    (["formulation=ru", "formulation.separation_cap=2", "formulation.kl_estimator=path"], "formulation.separation_cap"),
]


def run_cli_batch(cases, tmp_root: Path, timeout=600, entry: str = "train") -> list[dict]:
    """Each case ``(args, cwd)`` through the real entry point (``train.py``, or ``attack.py``), all in one
    subprocess (``tests/cli_batch.py``): ``[{"code", "stderr"}, ...]``."""
    spec = tmp_root / "cases.json"
    spec.write_text(json.dumps([{"args": list(a), "cwd": str(c), "entry": entry} for a, c in cases]))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "cli_batch.py"), str(spec)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every BAD case, each in its own directory holding an earlier run's file that must survive."""
    root = tmp_path_factory.mktemp("bad")
    cases = []
    for i, (args, _) in enumerate(BAD):
        keep = root / str(i) / "outputs" / "keep.txt"
        keep.parent.mkdir(parents=True)
        keep.write_text("precious")
        cases.append((args + ["logger=none"], root / str(i)))
    return root, run_cli_batch(cases, root)


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_fails_with_one_line(i, bad_input_results):
    root, results = bad_input_results
    key, r = BAD[i][1], results[i]
    assert r["code"] == 2, r
    err = [l for l in r["stderr"].strip().splitlines() if l.strip()]
    assert len(err) == 1, r["stderr"]
    assert key in err[0] and "Traceback" not in r["stderr"]
    assert (root / str(i) / "outputs" / "keep.txt").read_text() == "precious"


def test_bad_input_in_its_own_process_exits_2(tmp_path):
    """The batch above shares one interpreter; one case as a user runs it, in its own process."""
    r = run_cli(["formulation.threshold_factor=-1", "logger=none"], cwd=tmp_path, timeout=120)
    err = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(err) == 1 and "formulation.threshold_factor" in err[0], r.stderr


def test_multirun_sweep(tmp_path):
    """A sweep through the CLI (single CLI runs: the bad-input case in its own process here; the slow
    kill-and-resume check in tests/test_resume.py)."""
    tiny = TINY + TINY_BY_FORMULATION["lu"] + WORKER_THREADS
    r = run_cli(["-m", "formulation.threshold_factor=0.1,0.3", "hydra.sweep.dir=sweep"] + tiny, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    factors = sorted(json.loads(p.read_text())["threshold_factor"] for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert factors == [0.1, 0.3]
