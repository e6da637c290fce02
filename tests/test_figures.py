"""Sweeps, failed jobs and figures from local run directories."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, TINY_BY_FORMULATION
from unlearn.checkpoint import FINISHED


def test_figure1_from_the_oracle(tmp_path):
    from unlearn.figures import figure1

    rows = figure1(tmp_path)
    assert (tmp_path / "fig1.png").exists() and (tmp_path / "fig1.pdf").exists()
    by = {r["formulation"]: r for r in rows}
    for r in rows:
        assert abs(r["unlearned_mass"] - 0.05) < 1e-4  # comparable strength
    # paper Figure 1: RU pushes the retained modes away, LU leaves them in place
    assert by["ru"]["kl_to_retained"] > by["lu"]["kl_to_retained"] + 0.05


@pytest.mark.slow  # about 14 s; a sweep with a diverging job (tests/test_resume.py) keeps the sweep-goes-on check in the default suite
def test_sweep_with_a_failing_job_completes_and_figure_marks_it(tmp_path):
    tiny = [o for o in TINY if not o.startswith("logger")] + TINY_BY_FORMULATION["ru"]
    args = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=ru_tradeoff", "experiment.strength=0,1",
            "experiment.multipliers=[0.01,1.5]", "formulation.dual_steps=2", f"hydra.sweep.dir={tmp_path}/sweep",
            *tiny]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from unlearn.figures import figure_tradeoff

    rows = figure_tradeoff(tmp_path / "sweep", tmp_path / "fig", "ru", "test", "min_kl_to_concepts",
                           "kl_to_pretrained")
    status = {(r["method"], r["run"]): r["status"] for r in rows}
    assert len(rows) == 4
    assert status[("baseline", "baseline_1")] == "failed"  # sum of fixed RU weights >= 1
    assert sum(s in FINISHED for s in status.values()) == 3
    assert (tmp_path / "fig" / "ru.png").exists() and (tmp_path / "fig" / "ru.pdf").exists()
    with open(tmp_path / "fig" / "ru.csv") as f:
        table = list(csv.DictReader(f))
    assert {t["status"] in FINISHED for t in table} == {True, False} and "failed" in {t["status"] for t in table}


def _tiny_sweep(tmp_path, launcher_args):
    tiny = TINY + TINY_BY_FORMULATION["ru"]
    args = [sys.executable, str(ROOT / "train.py"), "-m", "formulation=ru", "formulation.threshold_factor=1.1,1.3",
            f"hydra.sweep.dir={tmp_path}/sweep", *launcher_args, *tiny]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))


@pytest.mark.slow  # about 12 s; the joblib launcher test covers launcher plugins in the default suite
def test_submitit_local_launcher_runs_the_sweep(tmp_path):
    assert _tiny_sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]) == ["0", "1"]


@pytest.mark.slow  # the parallel launcher's start-up (about 15 s); the basic launcher's sweeps run in the default suite
def test_joblib_launcher_runs_the_sweep(tmp_path):
    assert _tiny_sweep(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]) == ["0", "1"]


def test_retained_share_tv_ignores_the_unlearned_classes():
    """0 when only the unlearned class changes (the rest renormalised); a known value otherwise."""
    from unlearn.figures import retained_share_tv

    pre = [0.1] * 10
    only_7 = [0.1 * 1.05] * 7 + [0.055] + [0.1 * 1.05] * 2  # 7 halved, the others scaled alike
    s = {"metrics": {"class_share": only_7}, "pretrained_metrics": {"class_share": pre},
         "setup": {"classes": {"unlearn": [7]}}}
    assert retained_share_tv(s) == pytest.approx(0.0, abs=1e-12)
    moved = list(pre)
    moved[5], moved[3] = 0.15, 0.05  # 0.05 of the mass moved from 3 to 5
    s["metrics"]["class_share"] = moved
    assert retained_share_tv(s) == pytest.approx(0.05 / 0.9)
    assert retained_share_tv({"metrics": {}, "pretrained_metrics": {}}) is None  # no class shares (GMM)


@pytest.mark.parametrize("preset, panels", [("fig5", ["kid", "kl_to_pretrained"]),
                                            ("fig6", ["min_kl_to_concepts", "clip"])])
def test_paper_sd_presets_draw_both_panels(tmp_path, preset, panels):
    """fig5: KID and KL to the pretrained model against the expected likelihood; fig6: min KL to the
    concepts and max CLIP against KL to the pretrained model (runs faked: the weights are absent here)."""
    import json

    import yaml

    from unlearn import compose
    from unlearn.figures import LABELS, figure_tradeoff

    cfg = compose([f"experiment={preset}"])
    x, ys = str(cfg.experiment.x), [str(v) for v in cfg.experiment.y]
    assert ys == panels and all(k in LABELS for k in [x, *ys])
    for i, method in enumerate(["constrained", "baseline", "constrained"]):
        d = tmp_path / "sweep" / f"{method}_{i}"
        d.mkdir(parents=True)
        metrics = {k: 0.1 * (i + 1) + j for j, k in enumerate([x, *ys])}
        (d / "summary.json").write_text(json.dumps({"status": "completed", "method": method, "threshold_factor": 0.5,
                                                    "multipliers": [1.0], "metrics": metrics, "constraints": []}))
        (d / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method, "multiplier": 0.5}}))
    rows = figure_tradeoff(tmp_path / "sweep", tmp_path / "out", preset, "t", x, ys)
    assert (tmp_path / "out" / f"{preset}.png").exists()
    with open(tmp_path / "out" / f"{preset}.csv") as fh:
        header = next(csv.reader(fh))
    assert panels[1] in header and len(rows) == 3 and rows[2][panels[1]] == pytest.approx(0.3 + 2)


def test_concept_table_lists_each_concept_of_each_run(tmp_path):
    """Many concepts: one row per concept and run, with its constraint, multiplier and (digits_sd)
    the share of its digit before and after; the retained TV leaves the unlearned digits out."""
    import json

    from unlearn.figures import concept_table, retained_share_tv

    pre = [0.1] * 10
    share = [0.15, 0.15, 0.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.15, 0.15]
    cons = [{"name": f"KL(p||q[{p}])", "value": v, "threshold": 5.0, "pretrained": 4.0, "satisfied": v >= 4.5}
            for p, v in [("two", 6.0), ("seven", 4.0)]]
    summary = {"status": "completed", "method": "constrained", "threshold_factor": 1.25, "multipliers": [0.1, 0.3],
               "constraints": cons, "setup": {"prompts": {"unlearn": ["two", "seven"]}},
               "metrics": {"class_share": share, "kl_to_pretrained": 2.0}, "pretrained_metrics": {"class_share": pre}}
    (tmp_path / "sweep" / "constrained_0").mkdir(parents=True)
    (tmp_path / "sweep" / "constrained_0" / "summary.json").write_text(json.dumps(summary))
    rows = concept_table(tmp_path / "sweep", tmp_path / "c.csv")
    assert [(r["concept"], r["share"], r["pretrained_share"], r["multiplier"]) for r in rows] == \
        [("KL(p||q[two])", 0.0, 0.1, 0.1), ("KL(p||q[seven])", 0.0, 0.1, 0.3)]
    assert (tmp_path / "c.csv").exists()
    # the eight kept digits (sum 1.0): four at 0.15, four at 0.10, against 0.1 / 0.8 = 0.125 each
    assert retained_share_tv(summary) == pytest.approx(0.5 * (4 * 0.025 + 4 * 0.025))


def test_make_figures_finds_every_presets_sweep_directory():
    """``scripts/make_figures.py`` reads each preset's sweep directory from the composed config (the
    presets take it from configs/sweep/, not from their own file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    for name in mf.EXPERIMENTS:
        p = mf.preset(name)
        assert str(p.hydra.sweep.dir) == f"outputs/sweeps/{p.experiment.name}", name
