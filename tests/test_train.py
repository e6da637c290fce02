"""End to end: every option of every config group composes and runs; outputs are complete."""
import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from unlearn.checkpoint import FINISHED
from unlearn.train import train

# every family x formulation x method runs in tests/test_contract.py; these are the GMM options on top
GROUP_OPTIONS = [
    ["formulation=lu", "method=constrained"],
    ["formulation=lu", "method=constrained", "formulation.gradient=reparam"],
    ["formulation=lu", "method=constrained", "formulation.gradient=policy"],
    ["formulation=ru", "method=constrained", "formulation.distill_steps=2"],
    ["formulation=fu", "method=constrained", "formulation.multipliers=per_sample", "formulation.forget_samples=4",
     "formulation.retain=model"],
    ["formulation=ru", "method=constrained", "formulation.kl_estimator=path", "formulation.final_samples=composed",
     "model.sampler.kind=ddim", "model.sampler.eta=0.5", "method.dual_optimizer=nupi", "method.dual_kp=1.0"],
    ["formulation=lu", "method=constrained", "model.sampler.kind=ddim", "model.sampler.eta=0.5",
     "method.dual_optimizer=adam", "formulation.full_kl_gradient=true", "formulation.likelihood=exact"],
]


@pytest.mark.parametrize("overrides", GROUP_OPTIONS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_every_combination_runs_and_writes_outputs(overrides, tmp_path):
    cfg = compose_cfg(overrides)
    s = train(cfg, run_dir=tmp_path)
    for f in ("config.yaml", "metrics.jsonl", "model.pt", "samples.npy", "samples.png", "summary.json"):
        assert (tmp_path / f).exists(), f
    summary = json.loads((tmp_path / "summary.json").read_text())
    for k in ("model", "formulation", "method", "constraints", "multipliers", "metrics", "seed"):
        assert k in summary
    assert summary["status"] in FINISHED and summary["verdict"]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["sessions"][-1]["wall_time_s"] > 0 and info["status"] == summary["status"]
    assert summary["formulation"] == cfg.formulation.name and summary["method"] == cfg.method.name
    for c in summary["constraints"]:
        assert set(c) >= {"name", "value", "threshold", "satisfied"}
        assert np.isfinite(c["value"]) and np.isfinite(c["threshold"])
    for k in ("unlearned_mass", "expected_likelihood", "kl_to_pretrained", "kl_to_retained", "kl_to_target",
              "kl_retained_part"):
        assert k in summary["metrics"], k
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == cfg.train.dual_steps
    rec = json.loads(lines[-1])
    assert set(rec["constraints"]) == {c["name"] for c in summary["constraints"]}
    assert len(rec["multipliers"]) == len(summary["multipliers"])
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (cfg.train.final_samples, 2)
    # samples.npy is enough to recompute a metric independently
    from unlearn.models.gmm import GaussianMixture

    g = GaussianMixture(cfg.model.means, cfg.model.stds, cfg.model.weights)
    import torch

    near = g.nearest_component(torch.as_tensor(samples)).numpy()
    assert abs(np.isin(near, list(cfg.model.unlearn)).mean() - summary["metrics"]["unlearned_mass"]) < 1e-9


def test_baselines_keep_their_multipliers(tmp_path):
    s = train(compose_cfg(["formulation=fu", "method=baseline", "method.multiplier=0.05"]), run_dir=tmp_path)
    assert s["multipliers"] == pytest.approx([0.05])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(list(r["multipliers"].values()) == pytest.approx([0.05]) for r in rows)


def test_pretraining_is_cached(tmp_path):
    cfg = compose_cfg(["formulation=ru", "model.pretrain.steps=40"])
    first = train(cfg, run_dir=tmp_path / "a")
    second = train(cfg, run_dir=tmp_path / "b")
    info = json.loads((tmp_path / "b" / "run_info.json").read_text())["sessions"][-1]["setup"]
    assert info["pretrain_cache_hit"] is True
    assert info["pretrain_time_s"] < 5
    assert "pretrain_cache_hit" not in second["setup"]  # summaries do not depend on the cache


def test_wandb_offline_logger(tmp_path):
    cfg = compose_cfg(["formulation=ru", "logger=wandb", "logger.mode=offline"])
    train(cfg, run_dir=tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"


def test_other_geometry_two_unlearned_components(tmp_path):
    cfg = compose_cfg(["formulation=lu", "model.means=[[-2,0],[2,0],[0,3],[0,-3]]", "model.stds=[0.5,0.4,0.5,0.6]",
                       "model.weights=[1,2,1,1]", "model.unlearn=[1,3]"])
    s = train(cfg, run_dir=tmp_path)
    assert len(s["constraints"]) == 2 and len(s["multipliers"]) == 2
    assert len(s["oracle"]["multipliers"]) == 2


def test_averaged_final_multipliers_and_weights_refit_the_primal_and_reestimate(tmp_path):
    """train.final_multipliers=average: the reported multipliers are the mean of those used in the
    second half of the dual steps and the final ones; train.final_primal=average: the weights are the
    mean of the weights after each dual step of the second half (the checkpoint holds that running
    mean; the last iterate stays there too); LU then refits its primal and re-estimates."""
    cfg = compose_cfg(["formulation=lu", "formulation.dual_steps=4", "formulation.gradient=weighted",
                       "formulation.weighted_pool=256", "train.final_multipliers=average", "train.final_primal=average",
                       "formulation.final_primal_steps=2", "formulation.final_batch_size=300"])
    s = train(cfg, run_dir=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "multipliers" in r]
    name = s["constraints"][0]["name"]
    used = [r["multipliers"][name] for r in rows if r["step"] > 2]
    from unlearn.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "checkpoint.pt")["state"]
    last = float(state["multipliers"]["value"][0])
    assert s["extra"]["final_primal_steps"] == 2
    assert s["multipliers"][0] == pytest.approx((sum(used) + last) / (len(used) + 1), rel=1e-5)
    assert s["constraints"][0]["value"] != rows[-1]["constraints"][name]["value"]  # re-estimated
    avg, last_w = state["primal_average"], state["formulation"]["trainable"]
    assert s["extra"]["primal_average_of"] == avg["count"] == 2 and avg["start"] == 3  # dual steps 3 and 4
    assert any(not torch.equal(avg["weights"][k].float(), last_w[k].float()) for k in avg["weights"])


def test_primal_average_is_the_running_mean():
    from unlearn.primal_dual import PrimalDual

    p = torch.nn.Parameter(torch.zeros(3))

    class F:
        has_primal = True

        def _trainable_named(self):
            return {"w": p}

    pd = PrimalDual(F(), None, 4, 1, final_primal="average")
    for v in (1.0, 2.0, 6.0):
        with torch.no_grad():
            p.fill_(v)
        pd._accumulate_primal()
    assert pd._load_primal_average() == 3
    assert torch.allclose(p, torch.full((3,), 3.0))


def test_bad_final_multipliers_option_is_one_clear_line(tmp_path):
    from unlearn.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"train.final_multipliers must be one of \['last', 'average'\]"):
        validate_config(compose_cfg(["train.final_multipliers=mean"]))
    with pytest.raises(ConfigError, match=r"train.final_primal must be one of \['last', 'average'\]"):
        validate_config(compose_cfg(["train.final_primal=ema"]))


def test_baseline_estimates_constraints_every_few_dual_steps(tmp_path):
    """``train.baseline_estimate_every``: a fixed-multiplier run estimates (and logs) its constraints
    every N dual steps and at the last one; the summary's value is the last step's estimate. Dual
    ascent ignores it (it needs every estimate)."""
    from unlearn.config import ConfigError, validate_config

    cfg = compose_cfg(["formulation=ru", "method=baseline", "method.multiplier=0.3", "train.baseline_estimate_every=2",
                       "formulation.dual_steps=3", "formulation.pool_refresh=none"])  # the final estimate: the same pool
    s = train(cfg, run_dir=tmp_path / "baseline")
    rows = [json.loads(l) for l in (tmp_path / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert [bool(r["constraints"]) for r in rows] == [False, True, True]
    name = s["constraints"][0]["name"]
    assert s["constraints"][0]["value"] == pytest.approx(rows[-1]["constraints"][name]["value"])
    train(compose_cfg(["formulation=ru", "train.baseline_estimate_every=2", "formulation.dual_steps=3"]),
          run_dir=tmp_path / "constrained")
    rows = [json.loads(l) for l in (tmp_path / "constrained" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["constraints"] for r in rows)
    with pytest.raises(ConfigError, match="train.baseline_estimate_every"):
        validate_config(compose_cfg(["train.baseline_estimate_every=0"]))
    with pytest.raises(ValueError, match="fixed multipliers"):
        from unlearn.dual import DualAscent
        from unlearn.primal_dual import PrimalDual

        PrimalDual(None, DualAscent(1, 0.1), 3, 1, estimate_every=2)


def test_lu_baseline_draws_its_trajectories_ahead(tmp_path):
    """``formulation.esd_refresh_every=k``: the ESD-style primal samples k batches at once every k
    primal steps (one batch per step); k must divide the primal steps per dual step."""
    from unlearn.config import ConfigError
    from unlearn.train import build

    over = ["formulation=lu", "method=baseline", "formulation.primal_steps_per_dual=4", "formulation.esd_refresh_every=2"]
    cfg = compose_cfg(over)
    setup, sampler, f, mu, gen = build(cfg, show_progress=False)
    n = int(cfg.formulation.primal_batch_size)
    first = f._esd_trajectories(n)
    assert len(f._esd_buffer) == 1 and first.states[0].shape[0] == n and len(first.states) == len(first.timesteps) + 1
    second = f._esd_trajectories(n)
    assert not f._esd_buffer and not torch.equal(first.states[-1], second.states[-1])
    s = train(cfg, run_dir=tmp_path)
    assert s["status"] in FINISHED
    with pytest.raises(ConfigError, match="esd_refresh_every"):  # before any pretraining
        build(compose_cfg(over[:-1] + ["formulation.esd_refresh_every=3"]), show_progress=False)


def test_the_pretrained_evaluation_is_stored_once_and_reused_as_computed(tmp_path):
    """The pretrained side of the final evaluation is the same for every method and threshold: the
    first run stores it, the next reuses it, and what it reuses is what a run without the cache computes."""
    base = ["model=digits_sd", "formulation=lu", "model.final_samples=6"]  # 6: a key no other test stores

    def run(name, extra):
        s = train(compose_cfg(base + extra), run_dir=tmp_path / name)
        info = json.loads((tmp_path / name / "run_info.json").read_text())["sessions"][-1]
        return s, info["pretrained_eval"]

    a, ia = run("a", [])
    b, ib = run("b", ["method=baseline", "formulation.threshold_factor=0.5"])  # LU's baseline: ESD
    c, ic = run("c", ["method=baseline", "formulation.threshold_factor=0.5", "train.cache_pretrained_eval=false"])
    d, id_ = run("d", ["seed=1"])
    assert (ia["cache"], ib["cache"], ic["cache"], id_["cache"]) == ("stored", "reused", "off", "stored")
    assert ia["key"] == ib["key"] != id_["key"]
    assert a["pretrained_metrics"] == b["pretrained_metrics"] == c["pretrained_metrics"] != d["pretrained_metrics"]
    assert a["metrics"] != b["metrics"]  # the unlearned side is each run's own
    assert (tmp_path / "b" / "pretrained_samples.npy").read_bytes() == (tmp_path / "c" / "pretrained_samples.npy").read_bytes()
    assert sorted(p.name for p in (tmp_path / "b" / "eval").glob("pretrained_*.png")) == \
        sorted(p.name for p in (tmp_path / "c" / "eval").glob("pretrained_*.png")) != []
