"""Runs that survive faults: checkpoint and resume, divergence, reproducibility, foreign state."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, TINY_BY_FORMULATION, compose_cfg
from unlearn.checkpoint import FINISHED, RunDirError, load_checkpoint
from unlearn.train import train

FAST = ["train.oracle_multipliers=false"]  # the exact optimal multipliers cost seconds per run, not needed here
LU_CLI = TINY + TINY_BY_FORMULATION["lu"] + FAST


def cfg_of(overrides):
    return compose_cfg(list(overrides) + FAST)


def run_cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the worktree's code, the tests' pretraining cache
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _timeless_summary(run_dir):
    """summary.json without wall_time_s (the one field that records time), as text."""
    s = json.loads((run_dir / "summary.json").read_text())
    assert s.pop("wall_time_s") > 0
    return json.dumps(s, sort_keys=True)


def assert_same_final_state(a, b):
    """Bitwise: model weights, multipliers, summary.json, the last checkpoint's full state."""
    assert _timeless_summary(a) == _timeless_summary(b)
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma["state_dict"].keys() == mb["state_dict"].keys()
    for k in ma["state_dict"]:
        assert torch.equal(ma["state_dict"][k], mb["state_dict"][k]), k
    assert torch.equal(ma["multipliers"], mb["multipliers"])
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] and ca["config_hash"] == cb["config_hash"]
    fa, fb = ca["state"]["formulation"], cb["state"]["formulation"]
    for k in fa["trainable"]:
        assert torch.equal(fa["trainable"][k], fb["trainable"][k]), k
    assert torch.equal(fa["generator"], fb["generator"])
    assert torch.equal(ca["state"]["multipliers"]["value"], cb["state"]["multipliers"]["value"])
    ra = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
    assert strip(ra) == strip(rb)  # every step exactly once, same values


@pytest.mark.slow  # three CLI processes (about 15 s); in-process resume and truncated checkpoints stay in the suite
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 40
    args = LU_CLI + [f"formulation.dual_steps={steps}", "train.checkpoint_every=1"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={killed}"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        metrics = killed / "metrics.jsonl"
        deadline = time.time() + 240
        # a step's checkpoint is written after its metrics line: 3 lines => the step-2 checkpoint exists
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 2 <= at_kill < steps, at_kill
    assert not (killed / "summary.json").exists()

    r = run_cli(args + [f"hydra.run.dir={killed}"], cwd=tmp_path)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((killed / "run_info.json").read_text())
    assert info["sessions"][-1]["resumed_from_step"] == at_kill
    assert len(info["sessions"]) == 2

    ref = tmp_path / "uninterrupted"
    train(cfg_of(["formulation=lu", f"formulation.dual_steps={steps}", "train.checkpoint_every=1"]), run_dir=ref)
    assert_same_final_state(killed, ref)
    steps_logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, step):
    """Stop the run right after its checkpoint of ``step`` is written (a crash at that moment)."""
    import unlearn.train as tr

    real = tr.save_checkpoint

    def save(path, state, s, h):
        real(path, state, s, h)
        if s == step:
            raise Interrupted

    monkeypatch.setattr(tr, "save_checkpoint", save)


@pytest.mark.parametrize("overrides", [
    # importance pool drawn lazily before step 1; nuPI dual optimiser state; distillation after the last step
    ["formulation=ru", "formulation.distill_steps=2", "formulation.primal_batch_size=32", "method.dual_optimizer=nupi",
     "method.dual_kp=1.0"],
    ["formulation=fu", "formulation.retain=model", "method.dual_optimizer=adam"],  # retain pool drawn in __init__
    ["formulation=lu", "method=baseline"],  # fixed multipliers, ESD-style primal steps
    # LoRA adapters on a (tiny) diffusers UNet, with the metric suite evaluating during training
    pytest.param(["model=tiny_sd", "formulation=lu", "num_threads=1", "metrics.eval_every=1"],
                 marks=pytest.mark.slow),  # about 11 s: LoRA resume in make test-slow; the GMM cases stay in the default suite
], ids=["ru-nupi-distill", "fu-model-adam", "lu-baseline", "tiny_sd-lora-lu"])
def test_resume_in_process_matches_an_uninterrupted_run(overrides, tmp_path, monkeypatch):
    cfg = cfg_of(overrides + ["formulation.dual_steps=4", "train.checkpoint_every=1"])
    train(cfg, run_dir=tmp_path / "ref")
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(Interrupted):
            train(cfg, run_dir=tmp_path / "resumed")
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert ckpt["step"] == 2
    if "model=tiny_sd" in overrides:  # only the trainable part: the adapters, never the frozen UNet
        keys = list(ckpt["state"]["formulation"]["trainable"])
        assert keys and all("lora_" in k for k in keys)
    train(cfg, run_dir=tmp_path / "resumed")
    assert_same_final_state(tmp_path / "resumed", tmp_path / "ref")


def test_a_run_can_be_extended_and_a_finished_run_is_left_alone(tmp_path):
    base = ["formulation=lu", "train.checkpoint_every=3"]
    train(cfg_of(base + ["formulation.dual_steps=4"]), run_dir=tmp_path / "ref")
    train(cfg_of(base + ["formulation.dual_steps=2"]), run_dir=tmp_path / "ext")
    train(cfg_of(base + ["formulation.dual_steps=4"]), run_dir=tmp_path / "ext")  # more dual steps: continues
    assert_same_final_state(tmp_path / "ext", tmp_path / "ref")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ref").iterdir()}
    s = train(cfg_of(base + ["formulation.dual_steps=4"]), run_dir=tmp_path / "ref")  # complete: no work
    assert s["status"] in FINISHED
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ref").iterdir()} == before


def test_two_identical_runs_give_identical_summaries(tmp_path):
    cfg = cfg_of(["formulation=lu", "formulation.dual_steps=3"])
    train(cfg, run_dir=tmp_path / "a")
    train(cfg, run_dir=tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["wall_time_s"] > 0 and b["wall_time_s"] > 0  # the one field that records time
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["seed"] == 0
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["seed"] == 0 and info["device"] == "cpu"
    assert info["versions"]["torch"] == torch.__version__ and "python" in info["versions"]
    assert {"commit", "dirty"} <= set(info["git"])
    assert info["sessions"][0]["wall_time_s"] > 0


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # an absurd dual step size: the multiplier overflows to inf in the second dual step
    cfg = cfg_of(["formulation=lu", "method.dual_step=plain", "formulation.dual_lr=1e38", "formulation.dual_steps=6",
                       "train.checkpoint_every=1"])
    s = train(cfg, run_dir=tmp_path)
    assert s["status"] == "diverged"
    d = s["diverged"]
    assert d["value"] in ("nan", "inf", "-inf") and d["quantity"].split()[0] in ("loss", "constraint", "multiplier")
    assert d["step"] >= 2 and s["checkpoint_step"] == d["step"] - 1
    assert s["last_good"]["step"] == d["step"] - 1 and "time_s" not in s["last_good"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["diverged"] == d
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # the last good state, loadable and finite
    assert ckpt["step"] == d["step"] - 1
    assert all(torch.isfinite(v).all() for v in ckpt["state"]["formulation"]["trainable"].values())
    assert not (tmp_path / "model.pt").exists()
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "diverged"


@pytest.mark.slow  # two CLI processes (about 13 s); in-process divergence: test_divergence_stops_the_run_...
def test_diverging_job_in_a_sweep_does_not_stop_the_healthy_one(tmp_path):
    # basic launcher, one process: job 0 is healthy, job 1 diverges; then a single diverging run
    # (dual_steps after the tiny overrides, which set 2: 1e38 times a violation near 1.6 overflows in the third update)
    r = run_cli(["-m", *LU_CLI, "method.dual_step=plain", "formulation.dual_lr=1.0,1e38", "formulation.dual_steps=4", "train.checkpoint_every=1",
                 "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "sweep" / "1" / "summary.json").read_text())
    assert s0["status"] in FINISHED and (tmp_path / "sweep" / "0" / "model.pt").exists()
    assert s1["status"] == "diverged" and s1["diverged"]["step"] >= 2
    assert load_checkpoint(tmp_path / "sweep" / "1" / "checkpoint.pt")["step"] == s1["diverged"]["step"] - 1
    assert "diverged" in r.stderr

    from unlearn.figures import figure_tradeoff

    rows = figure_tradeoff(tmp_path / "sweep", tmp_path / "fig", "lu", "test", "expected_likelihood",
                           "kl_to_retained")
    assert sorted(r["status"] in FINISHED for r in rows) == [False, True] and rows[1]["status"] == "diverged"
    with open(tmp_path / "fig" / "lu.csv") as f:
        table = {t["run"]: t for t in csv.DictReader(f)}
    assert table["1"]["status"] == "diverged" and table["1"]["diverged_step"] == str(s1["diverged"]["step"])
    assert (tmp_path / "fig" / "lu.png").exists()

    r = run_cli([*LU_CLI, "method.dual_step=plain", "formulation.dual_lr=1e38", "formulation.dual_steps=4", "train.checkpoint_every=1",
                 f"hydra.run.dir={tmp_path}/single"], cwd=tmp_path)
    assert r.returncode == 3
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "diverged at dual step" in err[0] and "Traceback" not in r.stderr, r.stderr


# -- corrupt or foreign state ------------------------------------------------------------------
def snapshot(d):
    """Our files in a run directory (Hydra's own ``.hydra/`` and ``<job>.log`` record every invocation)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())
            if p.is_file() and p.suffix != ".log"}


@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(["formulation=lu", "formulation.dual_steps=2", "train.checkpoint_every=1"]), run_dir=run)
    return run


def test_truncated_checkpoint_and_foreign_config_fail_with_one_line(finished_run, tmp_path):
    ck = finished_run / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    before = snapshot(finished_run)
    r = run_cli(LU_CLI + [f"hydra.run.dir={finished_run}"], cwd=tmp_path)
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith(f"error: {ck}: checkpoint is unreadable") and "Traceback" not in r.stderr
    assert snapshot(finished_run) == before

    other = tmp_path / "other"
    train(cfg_of(["formulation=lu", "formulation.dual_steps=2", "train.checkpoint_every=1"]), run_dir=other)
    before = snapshot(other)
    r = run_cli(LU_CLI + ["formulation.threshold_factor=0.3", f"hydra.run.dir={other}"], cwd=tmp_path)
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "another config" in err[0] and "formulation.threshold_factor: 0.1 -> 0.3" in err[0]
    assert snapshot(other) == before


def test_foreign_versions_and_resume_never_are_refused(finished_run):
    cfg = cfg_of(["formulation=lu", "formulation.dual_steps=2", "train.checkpoint_every=1"])
    # a checkpoint of another format version
    ck = finished_run / "checkpoint.pt"
    blob = load_checkpoint(ck)
    original = ck.read_bytes()
    torch.save({**blob, "version": 99}, ck)
    before = snapshot(finished_run)
    with pytest.raises(RunDirError, match="format version 99"):
        train(cfg, run_dir=finished_run)
    assert snapshot(finished_run) == before
    ck.write_bytes(original)
    # a run directory of another version (run_info.json says so, or is missing)
    info = finished_run / "run_info.json"
    text = info.read_text()
    info.write_text(text.replace('"format_version": 1', '"format_version": 0'))
    before = snapshot(finished_run)
    with pytest.raises(RunDirError, match="format version 0"):
        train(cfg, run_dir=finished_run)
    assert snapshot(finished_run) == before
    info.unlink()
    before = snapshot(finished_run)
    with pytest.raises(RunDirError, match="another version"):
        train(cfg, run_dir=finished_run)
    assert snapshot(finished_run) == before
    info.write_text(text)
    before = snapshot(finished_run)
    # resume=never does not reuse a run directory
    with pytest.raises(RunDirError, match="train.resume=never"):
        train(cfg_of(["formulation=lu", "formulation.dual_steps=2", "train.resume=never"]), run_dir=finished_run)
    with pytest.raises(RunDirError, match="raise train.dual_steps"):
        train(cfg_of(["formulation=lu", "formulation.dual_steps=1"]), run_dir=finished_run)
    assert snapshot(finished_run) == before
