"""Attacks on a finished run (relearning, adversarial soft prompts): the two sides are what they claim
(the pretrained side is the pretrained model exactly, the soft conditions start at the real ones), the
attacks move the concept, and bad input gets one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_cfg

RELEARN_FAST = ["attack=relearn", "attack.steps=[0,3,12]", "attack.eval_samples=256", "attack.likelihood_samples=64",
                "progress=false"]
PROMPT_FAST = ["attack=prompt", "attack.steps=[0,2]", "attack.eval_seeds=8", "attack.batch_size=4",
               "attack.sampler_steps=2", "attack.images=4", "attack.restarts=1", "progress=false"]


def _run(tmp_path_factory, name, overrides):
    import unlearn

    d = tmp_path_factory.mktemp(name)
    summary = unlearn.run(compose_cfg(overrides), run_dir=d)
    assert summary["status"] in ("completed", "constraints_violated")
    return d


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    return _run(tmp_path_factory, "gmm_lu", ["model=gmm", "formulation=lu"])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return _run(tmp_path_factory, "digits_lu", ["model=digits", "formulation=lu"])


def _attack(run_dir, overrides):
    from unlearn.attacks.run import attack, compose

    return attack(compose([f"run_dir={run_dir}", *overrides, "num_threads=1"]))


def test_the_pretrained_side_is_the_pretrained_model_and_the_unlearned_side_the_runs(gmm_run):
    from unlearn.attacks import load_run

    t = load_run(gmm_run)
    x, tt = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)), torch.full((64,), 300)
    with torch.no_grad():
        pre = t.setup.pretrained.eps(x, tt)
        assert torch.equal(t.use("pretrained").eps(x, tt), pre)
        unl = t.use("unlearned").eps(x, tt)
        saved = torch.load(gmm_run / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(t.setup.model.state_dict()[k], v) for k, v in saved.items())
        assert not torch.allclose(unl, pre)
        assert torch.equal(t.use("pretrained").eps(x, tt), pre)  # switching back restores it exactly


def test_relearning_brings_the_gmm_concept_back_and_the_record_is_reproducible(gmm_run):
    rec = _attack(gmm_run, RELEARN_FAST)
    r = rec["result"]
    after = r["share_after"]
    assert set(after) == {"0", "3", "12"}
    assert after["12"] > after["0"] + 0.05  # fine-tuning on the component's samples raises its mass
    assert r["sanity"]["passed"]
    assert rec["protocol"]["data"]["source"].startswith("real samples")
    el = [p["expected_likelihood"] for p in rec["unlearned"]["curve"]]
    assert el[-1] > el[0]  # exact E[q/p] rises with the share
    on_disk = json.loads((gmm_run / "attacks" / "relearn.json").read_text())
    assert on_disk["protocol_id"] == rec["protocol_id"] and on_disk["result"] == json.loads(json.dumps(r))
    again = _attack(gmm_run, RELEARN_FAST)
    assert again["result"] == rec["result"]  # seeded: the same numbers again
    assert sorted(p.name for p in (gmm_run / "attacks").glob("relearn*")) == ["relearn.json"]
    other = _attack(gmm_run, RELEARN_FAST + ["attack.lr=3e-3"])  # other settings: the earlier record is kept
    assert other["protocol_id"] != rec["protocol_id"]
    assert (gmm_run / "attacks" / f"relearn.{rec['protocol_id']}.json").exists()


def test_the_report_tables_each_run_with_its_cost(gmm_run, tmp_path):
    import csv

    from unlearn.attacks.report import main

    rec = _attack(gmm_run, RELEARN_FAST)
    assert main([str(tmp_path / "rob"), str(gmm_run), str(tmp_path)]) == 0  # a folder without records is left out
    (row,) = list(csv.DictReader(open(tmp_path / "rob.csv")))
    summary = json.loads((gmm_run / "summary.json").read_text())
    assert float(row["kl_to_pretrained"]) == pytest.approx(summary["metrics"]["kl_to_pretrained"])
    assert row["constraints_met"] == str(summary["constraints_met"])
    assert float(row["relearn@12"]) == pytest.approx(rec["result"]["share_after"]["12"])
    assert (tmp_path / "rob.png").stat().st_size > 0 and (tmp_path / "rob.md").read_text().count("\n") == 3
    assert main([str(tmp_path / "none"), str(tmp_path)]) == 2


def test_soft_class_label_starts_at_the_real_label(digits_run):
    from unlearn.attacks import load_run
    from unlearn.models.diffusers_models import Guidance, recondition

    t = load_run(digits_run)
    model = t.use("unlearned")
    soft = t.setup.soft_condition()
    try:
        x, tt = torch.randn(6, *model.sample_shape, generator=torch.Generator().manual_seed(0)), torch.full((6,), 500)
        with torch.no_grad():
            a = recondition(model, soft.condition(guided=True)).eps(x, tt)
            b = model.eps(x, tt)  # the retain condition (the unconditional model, guided)
        assert torch.allclose(a, b, atol=1e-5)
        with torch.no_grad():
            soft.vector += torch.randn(soft.vector.shape, generator=torch.Generator().manual_seed(0))
            c = recondition(model, soft.condition(guided=True)).eps(x, tt)
        assert not torch.allclose(c, b, atol=1e-3)
        other = t.setup.soft_condition()  # a second soft label on the same embedding keeps its own row
        try:
            with torch.no_grad():
                d = recondition(model, other.condition(guided=True)).eps(x, tt)
                c2 = recondition(model, soft.condition(guided=True)).eps(x, tt)
            assert other.slot != soft.slot
            assert torch.allclose(d, b, atol=1e-5) and torch.allclose(c2, c, atol=1e-6)
        finally:
            other.close()
    finally:
        soft.close()
    with torch.no_grad():  # hooks removed: the embedding answers as before
        assert torch.allclose(model.eps(x, tt), b, atol=1e-6)
    assert isinstance(model.cond, Guidance)


def test_prompt_attack_runs_on_digits_and_writes_its_record(digits_run):
    rec = _attack(digits_run, PROMPT_FAST)
    r = rec["result"]
    assert set(r["attack_success_rate"]) == {"classifier", "inversion"}
    for obj, after in r["attack_success_rate_after"].items():
        # at step 0 the soft condition is the retain condition: the clean share, same seeds
        assert after["0"] == pytest.approx(r["clean_share"])
    assert (digits_run / "attacks" / "prompt.json").exists()
    assert rec["unlearned"]["objectives"]["classifier"]["condition"]["kind"] == "class embedding"


def test_relearning_under_the_concepts_own_label_fine_tunes_that_label(digits_run):
    fast = ["attack=relearn", "attack.steps=[0,4]", "attack.eval_samples=64", "attack.likelihood_samples=0",
            "progress=false"]
    retain = _attack(digits_run, fast + ["attack.name=relearn_retain"])
    concept = _attack(digits_run, fast + ["attack.condition=concept", "attack.name=relearn_concept"])
    assert concept["unlearned"]["data"]["condition"] == "concept"
    assert concept["protocol_id"] != retain["protocol_id"]
    c0, r0 = concept["unlearned"]["curve"], retain["unlearned"]["curve"]
    assert c0[0]["share"] == r0[0]["share"]  # the same model before fine-tuning
    # the fine-tuning itself differs: same data and seeds, another label in the denoising loss
    assert concept["unlearned"]["loss_first_last"] != retain["unlearned"]["loss_first_last"]


def test_the_prompt_attack_reports_the_restart_its_own_loss_prefers(digits_run):
    one = _attack(digits_run, PROMPT_FAST + ["attack.name=prompt_one"])["unlearned"]["objectives"]
    three = _attack(digits_run, PROMPT_FAST + ["attack.restarts=3", "attack.name=prompt_three"])["unlearned"]["objectives"]
    for obj, r in three.items():
        finals = [x["final_loss"] for x in r["restarts"]]
        assert len(finals) == 3 and len(set(finals)) == 3  # each restart its own noise
        assert r["restart"] == finals.index(min(finals)) and r["loss_first_last"][-1] == min(finals)
        assert finals[0] == one[obj]["loss_first_last"][-1]  # restart 0 is the single run


def test_the_prompt_attack_keeps_its_condition_within_the_radius(digits_run):
    fast = PROMPT_FAST + ["attack.lr=1.0"]
    free = _attack(digits_run, fast + ["attack.name=prompt_free"])["unlearned"]["objectives"]
    bound = _attack(digits_run, fast + ["attack.radius=0.05", "attack.name=prompt_r"])["unlearned"]["objectives"]
    for obj in ("classifier", "inversion"):
        assert free[obj]["distance"] > 0.1  # unbounded, two steps at lr 1 move it well past the budget
        assert 0.02 < bound[obj]["distance"] <= 0.05 + 1e-6


def test_soft_text_prompt_starts_at_the_encoded_prompt():
    import unlearn
    from unlearn.train import build

    cfg = compose_cfg(["model=tiny_sd", "formulation=lu"])
    setup = build(cfg, show_progress=False)[0]
    soft = setup.soft_condition()
    with torch.no_grad():
        g = soft.condition(guided=True)
        ref = setup.model.cond
    assert torch.allclose(g.cond, ref.cond, atol=1e-6) and torch.equal(g.uncond, ref.uncond)
    soft.tokens.data += torch.randn(soft.tokens.shape, generator=torch.Generator().manual_seed(0))  # not a constant: LayerNorm removes one
    with torch.no_grad():
        assert not torch.allclose(soft.condition(guided=False), ref.cond, atol=1e-3)
    assert unlearn is not None


BAD_ATTACKS = [
    ([], "run_dir"),
    (["run_dir=/nonexistent/run"], "run_dir"),
    (["run_dir=RUN", "attack=nope"], "attack"),
    (["run_dir=RUN", "attack=relearn", "attack.lr=-1"], "attack.lr"),
    (["run_dir=RUN", "attack=prompt"], "no condition"),
    (["run_dir=RUN", "attack=prompt", "attack.radius=-0.1"], "attack.radius"),
    (["run_dir=RUN", "attack=relearn", "attack.condition=both"], "attack.condition"),
    (["run_dir=RUN", "attack=relearn", "attack.condition=concept"], "attack.condition=concept"),
]


def test_bad_attack_input_is_one_line_and_writes_nothing(gmm_run, tmp_path):
    from test_cli import run_cli_batch

    listing = lambda: sorted(p.name for p in (gmm_run / "attacks").glob("*")) if (gmm_run / "attacks").exists() else []
    before = listing()
    cases = [([a.replace("RUN", str(gmm_run)) for a in args] + ["progress=false"], tmp_path) for args, _ in BAD_ATTACKS]
    for (args, key), r in zip(BAD_ATTACKS, run_cli_batch(cases, tmp_path, entry="attack")):
        lines = [ln for ln in r["stderr"].strip().splitlines() if ln.strip()]
        assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], (args, r)
    assert listing() == before


def test_relearning_a_composed_score_says_there_is_nothing_to_fine_tune(tmp_path_factory):
    from unlearn.attacks import AttackError

    d = _run(tmp_path_factory, "gmm_ru", ["model=gmm", "formulation=ru"])
    with pytest.raises(AttackError, match="composed score"):
        _attack(d, RELEARN_FAST)


def test_robust_lu_estimates_its_constraint_under_the_advancing_adversarial_condition():
    import unlearn

    cfg = compose_cfg(["model=digits", "formulation=lu", "formulation.gradient=weighted", "formulation.robust.steps=2",
                       "formulation.robust.batch_size=2", "formulation.robust.sampler_steps=2"])
    setup, sampler, f, mu, gen = unlearn.build(cfg)
    before = [p.detach().clone() for p in f.adversary.soft.parameters()]
    f.estimate(mu.value())
    assert len(f.adversary.losses) == 2
    assert not torch.equal(before[0], f.adversary.soft.parameters()[0])  # the attack moved the condition
    assert f.adversary.radius is None
    x, tt = torch.randn(4, *setup.model.sample_shape, generator=torch.Generator().manual_seed(0)), torch.full((4,), 400)
    with torch.no_grad():
        assert not torch.allclose(f.adversary.view.eps(x, tt), setup.model.eps(x, tt), atol=1e-4)
    loss = f.primal_loss(mu.value()).loss  # the weighted primal now also fits the adversarial condition
    assert torch.isfinite(loss)
    state = f.state_dict()
    f.estimate(mu.value())
    f.load_state_dict(state)  # a resumed run continues from the saved condition
    assert torch.equal(f.adversary.soft.parameters()[0], state["adversary"]["condition"][0])


def test_robust_lu_keeps_its_adversary_within_the_radius():
    import unlearn

    cfg = compose_cfg(["model=digits", "formulation=lu", "formulation.gradient=weighted", "formulation.robust.steps=3",
                       "formulation.robust.batch_size=2", "formulation.robust.sampler_steps=2",
                       "formulation.robust.lr=1.0", "formulation.robust.radius=0.02"])
    f = unlearn.build(cfg)[2]
    f.estimate(torch.zeros(f.num_constraints))
    soft = f.adversary.soft
    o = soft.origin[0]
    rows = (soft.parameters()[0] - o).norm(dim=-1) / o.norm(dim=-1)
    assert 0.01 < float(rows.max()) <= 0.02 + 1e-6 and soft.distance() == pytest.approx(float(rows.max()))


def test_robust_lu_needs_a_model_with_a_condition():
    import unlearn
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="formulation.robust.steps"):
        unlearn.build(compose_cfg(["model=gmm", "formulation=lu", "formulation.robust.steps=1"]))


def test_a_run_written_before_a_config_key_existed_is_attacked_with_its_default(gmm_run, tmp_path):
    import shutil

    import yaml

    from test_cli import run_cli_batch

    old = tmp_path / "old_run"
    shutil.copytree(gmm_run, old, ignore=shutil.ignore_patterns("attacks"))
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["formulation"]["robust"]  # as a run of an earlier version wrote it
    cfg["method"]["multiplier"] = 0.1  # a key the defaults lack: a strength sweep's job writes it for every method
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = [f"run_dir={old}", *RELEARN_FAST, "attack.steps=[0,1]", "num_threads=1"]
    (r,) = run_cli_batch([(args, tmp_path)], tmp_path, entry="attack")  # through attack.py's Hydra app
    assert r["code"] == 0, r["stderr"][-2000:]
    rec = json.loads((old / "attacks" / "relearn.json").read_text())
    assert "formulation.robust.steps" in rec["protocol"]["run_config_filled"]


def test_both_attacks_run_on_the_text_to_image_path(tmp_path_factory):
    """digits_sd (tiny pretraining): the soft token embeddings through the frozen text encoder, the
    judge differentiated through the VAE decoder, relearning on VAE-encoded real digits."""
    d = _run(tmp_path_factory, "digits_sd_lu", ["model=digits_sd", "formulation=lu"])
    rec = _attack(d, PROMPT_FAST + ["attack.steps=[0,1]"])
    cls = rec["unlearned"]["objectives"]["classifier"]
    assert cls["condition"]["kind"] == "text token embeddings" and cls["condition"]["init"] == "a handwritten digit"
    assert cls["curve"][0]["attack_success_rate"] == pytest.approx(rec["result"]["clean_share"])
    assert all(v == v for v in cls["loss_first_last"])  # finite: gradients went through decoder and sampler
    rel = _attack(d, ["attack=relearn", "attack.steps=[0,1]", "attack.eval_samples=8", "attack.likelihood_samples=4",
                      "attack.likelihood_timesteps=2", "attack.images=4", "attack.batch_size=4", "progress=false"])
    assert rel["protocol"]["data"]["source"].startswith("real samples")
    assert len(rel["unlearned"]["curve"]) == 2 and rel["unlearned"]["curve"][1]["expected_likelihood"] > 0


def test_data_unlearning_judges_copies_of_the_forget_images():
    import unlearn

    from unlearn.models.digits import load_digits_splits

    cfg = compose_cfg(["model=digits", "formulation=fu"])
    setup = unlearn.build(cfg)[0]
    x = load_digits_splits()["diffusion"][0]
    idx = list(cfg.model.forget_indices)
    assert idx
    judge = setup.concept_judge
    assert judge.share(x[idx]) == 1.0  # a forget image is its own nearest training image
    others = torch.ones(len(x), dtype=torch.bool)
    others[idx] = False
    assert judge.share(x[others][:200]) == 0.0
    lp = judge.log_prob(torch.cat([x[idx[:1]], x[others][:1]]))
    assert lp[0] > lp[1]
    data = setup.concept_data(8, torch.Generator().manual_seed(0))
    assert len(data) == len(idx) and judge.share(data) == 1.0  # relearning fine-tunes on the forget images


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits_sd", "digits"])
def test_attacks_recover_the_concept_on_the_pretrained_model_and_bring_it_back(tmp_path, model):
    """The real models (pretraining cached), a default LU run, both attacks with their defaults: on the
    pretrained model relearning and the inversion objective raise the concept share (the sanity check:
    the attack works), and relearning the unlearned model brings back at least half of what was removed.
    The classifier objective is not asserted: its path is chaotic (one torch thread instead of two ended
    the pretrained digits_sd attack at 0.08 instead of 1.00; docs/robustness.md)."""
    import unlearn

    summary = unlearn.run(compose_cfg([f"model={model}", "formulation=lu", "logger=none", "progress=false"],
                                      tiny=False), run_dir=tmp_path)
    assert summary["status"] in ("completed", "constraints_violated")
    rel = _attack(tmp_path, ["attack=relearn", "progress=false"])["result"]
    assert rel["sanity"]["passed"] and rel["clean_share"] < rel["pretrained_share"]
    assert rel["steps_to_half_recovery"] is not None and rel["steps_to_half_recovery"] <= 100
    pr = _attack(tmp_path, ["attack=prompt", "progress=false"])["result"]
    assert pr["sanity"]["inversion"]["passed"], pr
    assert pr["pretrained_attack_success_rate"]["inversion"] >= 0.5  # the pretrained model's concept, on demand
