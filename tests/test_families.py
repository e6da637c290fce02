"""The image families on the offline doubles (tiny_sd, tiny_ddpm): real diffusers classes, random weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_METRICS, compose_cfg
from unlearn.checkpoint import FINISHED



def _run(overrides, run_dir):
    from unlearn.train import train

    return train(compose_cfg(list(overrides) + ["num_threads=1"]), run_dir)


def test_text_to_image_trains_cross_attention_lora_and_exports_it(tmp_path):
    """Every family x formulation x method runs in tests/test_contract.py; here what text-to-image
    trains and writes: LoRA on cross-attention only, moved away from zero, in diffusers' format."""
    s = _run(["model=tiny_sd", "formulation=lu"], tmp_path)
    assert s["status"] in FINISHED and s["exported"] == ["pytorch_lora_weights.safetensors"]
    imgs = np.load(tmp_path / "samples.npy")
    assert imgs.dtype == np.uint8 and imgs.ndim == 4 and imgs.shape[-1] == 3
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("attn2" in k and "lora_" in k for k in keys)
    assert any(float(v.abs().max()) > 0 for k, v in state["state_dict"].items() if "lora_B" in k)


def test_pretrained_view_is_untouched_by_lora_training(tmp_path):
    from unlearn.train import build

    cfg = compose_cfg(["model=tiny_sd", "formulation=lu", "num_threads=1", "formulation.primal_lr=1e-2"])
    setup, sampler, form, mu, gen = build(cfg, show_progress=False)
    x, t = torch.randn(3, *setup.model.sample_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500, 900])
    pre0, model0 = setup.pretrained.eps(x, t), setup.model.eps(x, t)
    torch.testing.assert_close(pre0, model0)  # LoRA starts at B = 0
    for _ in range(3):
        form.primal_step(torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(setup.pretrained.eps(x, t), pre0)  # adapters off: the base weights
    assert (setup.model.eps(x, t) - model0).abs().max() > 1e-6
    # each concept view is the same UNet with another prompt: different noise predictions
    assert (setup.concepts[0].eps(x, t) - pre0).abs().max() > 1e-4


def test_mixed_precision_and_gradient_checkpointing(tmp_path):
    s = _run(["model=tiny_sd", "formulation=lu", "model.precision=bf16", "model.gradient_checkpointing=true"], tmp_path)
    assert s["status"] in FINISHED and all(np.isfinite(c["value"]) for c in s["constraints"])


def _tiny_pipeline(tmp_path, model="tiny_sd"):
    from unlearn.families.diffusers_family import components, save_pipeline

    cfg = compose_cfg([f"model={model}"])
    comps, _ = components(cfg.model)
    return save_pipeline(cfg.model, comps, tmp_path / "pipe")


def test_missing_weights_fail_fast_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "train.py", "model=sd14", "formulation=lu", "logger=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model sd14 (CompVis/stable-diffusion-v1-4)")
    assert "model.path=" in lines[0] and "hf download" in lines[0]
    assert time.time() - t0 < 60


def test_bad_local_folder_is_one_line(tmp_path):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "train.py", "model=sd14", f"model.path={tmp_path / 'half'}", "logger=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: model.path=") and "missing vae/" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_local_folder_loads_and_saved_lora_loads_into_a_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe_dir = _tiny_pipeline(tmp_path)
    run = tmp_path / "run"
    # the real sd14 config, pointed at a local folder of the right layout
    s = _run(["model=sd14", "formulation=lu", f"model.path={pipe_dir}", "model.device=cpu", "model.precision=fp32",
              "model.gradient_checkpointing=false", "model.sampler.num_steps=4", "train.final_samples=2",
              "formulation.primal_lr=1e-2", "formulation.dual_steps=2"] +
             ["formulation.primal_steps_per_dual=1", "formulation.primal_batch_size=2", "formulation.batch_size=2",
              "formulation.likelihood_timesteps=2", "formulation.likelihood_noise=1", *TINY_METRICS], run)
    assert s["status"] in FINISHED and s["setup"]["weights"] == str(pipe_dir)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    ids = pipe.tokenizer(["a photo of a dog"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0].expand(2, -1, -1)
        before = pipe.unet(x, t, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(run)
        after = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert (after - before).abs().max() > 1e-6  # the LoRA changed the model
    # ... into exactly our trained model (rebuilt from the saved adapter state)
    from unlearn.train import build

    cfg = compose_cfg(["model=sd14", f"model.path={pipe_dir}", "model.device=cpu", "model.precision=fp32",
                       "model.gradient_checkpointing=false", "num_threads=1"])
    setup = build(cfg, show_progress=False)[0]
    state = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    missing = setup.model.base.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        ours = setup.model.base.eps(x, t, emb[:1])
    torch.testing.assert_close(ours, after, rtol=1e-4, atol=1e-5)


def test_ddpm_lora_saves_and_loads(tmp_path):
    from diffusers import UNet2DModel

    from unlearn.families.ddpm import load_unet_lora

    s = _run(["model=tiny_ddpm", "formulation=fu", "model.finetune=lora", "formulation.primal_lr=1e-2"], tmp_path)
    assert s["status"] in FINISHED and (tmp_path / "unet_lora" / "adapter_model.safetensors").exists()
    cfg = compose_cfg(["model=tiny_ddpm"])
    from unlearn.families.diffusers_family import components

    unet = components(cfg.model)[0]["unet"]
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 600])
    with torch.no_grad():
        before = unet(x, t).sample
        load_unet_lora(unet, tmp_path / "unet_lora")
        after = unet(x, t).sample
    assert isinstance(unet, UNet2DModel) and (after - before).abs().max() > 1e-6


@pytest.mark.slow  # about 20 s (two processes)
def test_two_process_accelerate_keeps_multipliers_identical(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "model=tiny_sd",
           "formulation=lu", "logger=none", "progress=false", "num_threads=1", "formulation.dual_steps=3",
           f"hydra.run.dir={tmp_path}", *TINY_METRICS]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}_multipliers.json").read_text()) for i in (0, 1)]
    assert ranks[0]["multipliers"] == ranks[1]["multipliers"]
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]
    assert any(v > 0 for v in ranks[0]["multipliers"][-1].values())  # the multipliers did move
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert ranks[0]["final"] == ranks[1]["final"] == summary["multipliers"]


@pytest.mark.parametrize("model", ["sd14", "bk_sdm_tiny", "ddpm_celebahq"])
@pytest.mark.parametrize("formulation", ["lu", "ru", "fu"])
def test_real_model_configs_compose_and_stop_without_weights(model, formulation, monkeypatch):
    from unlearn.models.weights import MissingWeightsError
    from unlearn.train import build

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg([f"model={model}", f"formulation={formulation}"], tiny=False)
    assert cfg.model.hub_id and cfg.model.get("tiny") is None
    with pytest.raises(MissingWeightsError, match=cfg.model.hub_id):
        build(cfg, show_progress=False)


@pytest.mark.parametrize("experiment,model,formulation", [("fig5", "bk_sdm_tiny", "lu"), ("fig3", "ddpm_celebahq", "fu"),
                                                          ("fig6", "sd14", "ru")])
def test_paper_image_presets_compose_with_their_tuning(experiment, model, formulation):
    cfg = compose_cfg([f"experiment={experiment}", "experiment.strength=2"], tiny=False)
    assert (cfg.model.name, cfg.formulation.name) == (model, formulation)
    assert cfg.formulation.threshold_factor == cfg.experiment.threshold_factors[2]
    tuning = {"lu": ("primal_lr", 1e-4), "fu": ("primal_lr", 5e-6), "ru": ("kl_estimator", "path")}[formulation]
    assert cfg.formulation[tuning[0]] == tuning[1]


def test_metrics_without_weights_are_missing_with_one_warning_each(tmp_path, caplog):
    import logging

    from unlearn.metrics import reset_warnings

    reset_warnings()
    with caplog.at_level(logging.WARNING, logger="unlearn.metrics"):
        s = _run(["model=tiny_sd", "formulation=lu", "metrics.eval_every=1"], tmp_path)
    assert s["metric_status"] == {"kid": "missing", "sscd": "missing", "clip": "missing", "kl": "ok",
                                  "likelihood": "ok"}
    assert set(s["metrics_missing"]) == {"kid", "sscd", "clip"}
    assert "kid" not in s["metrics"] and np.isfinite(s["metrics"]["kl_to_pretrained"])
    assert s["metric_protocols"]["likelihood"]["concepts"] == ["a horse", "a brown dog"]
    for name in ("kid", "sscd", "clip"):  # one warning per metric, although evaluated at every step
        assert sum(f"metric '{name}'" in r.getMessage() for r in caplog.records) == 1
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("expected_likelihood" in r["eval"] for r in steps)  # eval_every=1: logged with each dual step
    assert (tmp_path / "eval" / "final_samples.png").exists()


def test_strict_metrics_fail_before_training(tmp_path):
    """``metrics.strict=true`` without the KID weights stops at the build, before any dual step (the
    CLI turns this ConfigError into one line and exit code 2, as every bad input)."""
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="metrics.strict") as exc:
        _run(["model=tiny_sd", "formulation=lu", "metrics.strict=true"], tmp_path)
    assert "kid" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()


@pytest.mark.parametrize("model", ["tiny_classcond", "tiny_sd"])
def test_one_definition_of_each_concept_model_per_run(model):
    """``formulation.concept_guidance`` defines q_i once per run: LU's default is the plain conditional
    model (Lemma 2), RU's the sampling guidance; the metrics and the constraints share ``setup.concepts``."""
    import unlearn
    from unlearn.models.diffusers_models import Guidance

    scales = {}
    for form, extra in [("lu", []), ("ru", []), ("ru", ["formulation.concept_guidance=3"])]:
        cfg = compose_cfg([f"model={model}", f"formulation={form}", *extra])
        setup, _, f, *_ = unlearn.build(cfg)
        assert not hasattr(setup, "likelihood_concepts")
        conds = [c.cond for c in setup.concepts]
        scales[(form, *extra)] = [c.scale if isinstance(c, Guidance) else 1.0 for c in conds]
        if form == "lu":
            assert f._ratio_models()[0] == list(setup.concepts)  # the constraint's q_i are the setup's
    g = float(compose_cfg([f"model={model}"]).model.guidance_scale)
    assert set(scales[("lu",)]) == {1.0} and set(scales[("ru",)]) == {g}
    assert set(scales[("ru", "formulation.concept_guidance=3")]) == {3.0}


def test_roles_of_one_unet_share_one_call_with_the_same_answer():
    """``model.batch_roles``: ESD's target (guided retain view, each concept, the unconditional view)
    in one UNet call instead of one per role, with the same noise prediction."""
    import unlearn
    from unlearn.models.base import ComposedScore
    import unlearn.models.diffusers_models as dm

    out, calls = {}, []
    for batched in (False, True):
        cfg = compose_cfg(["model=tiny_sd", "formulation=lu", f"model.batch_roles={str(batched).lower()}"])
        setup, _, f, *_ = unlearn.build(cfg)
        target = f.esd_target(torch.tensor([0.7, 1.3]))
        assert isinstance(target, ComposedScore) and len(target.models) == 4
        forward, n = setup.pretrained.base._forward, []
        setup.pretrained.base._forward = lambda x, t, *c: (n.append(len(x)), forward(x, t, *c))[1]
        x, t = torch.randn(3, *setup.pretrained.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 400, 900])
        with torch.no_grad():
            out[batched] = target.eps(x, t)
        calls.append(n)
    assert calls[0] == [6, 3, 3, 3] and calls[1] == [12]  # 4 calls (2 + 1 + 1 + 1 conditions) -> 1 of 4 conditions
    assert torch.allclose(out[False], out[True], atol=1e-5)


@pytest.mark.parametrize("max_batch", [64, 3])
def test_a_retain_prompt_distribution_gives_each_chain_one_prompt_throughout(max_batch):
    """``model.prompts.retain`` with several prompts (and ``retain_weights``): each trajectory draws its
    prompt when sampling starts and keeps it in every later evaluation, chunked (``max_batch``) or with
    its steps stacked: the log-probability recomputed along a recorded chain equals the one accumulated
    while sampling it, and the trained and pretrained models share the draw. The draw follows the weights."""
    import unlearn
    from unlearn.models.diffusers_models import PromptTable

    cfg = compose_cfg(["model=tiny_sd", "formulation=lu", "model.prompts.retain=[a cowboy,a horse,a red hat]",
                       "model.prompts.retain_weights=[2,1,1]", f"model.max_batch={max_batch}",
                       "model.sampler.num_steps=4", "model.sampler.eta=1.0"])
    setup, sampler, *_ = unlearn.build(cfg)
    table = setup.model.cond.cond
    assert isinstance(table, PromptTable) and table is setup.pretrained.cond.cond
    g = torch.Generator().manual_seed(0)
    traj = sampler.sample(setup.model, 8, g, record=True, log_prob=True)
    counts = torch.bincount(traj.conditions[0][1], minlength=3).tolist()
    assert counts[0] == 4 and sorted(counts[1:]) == [2, 2]  # systematic draw: the weights' shares of 8 rows
    sampler.sample(setup.model, 5, g)  # another batch draws anew in between
    with torch.no_grad():
        logp, kl = sampler.step_terms(setup.model, traj, setup.pretrained)
    torch.testing.assert_close(logp, traj.log_prob, rtol=1e-4, atol=1e-3)
    assert kl.abs().max() < 1e-6  # LoRA starts at zero: the same model under the same prompt per chain
    # a chain sampled under a prompt it was not given has another log-probability (the check can fail)
    table.idx = (traj.conditions[0][1] + 1) % 3
    from unlearn.samplers import Trajectory

    stale = Trajectory(states=traj.states, timesteps=traj.timesteps)
    with torch.no_grad():
        logp_wrong, _ = sampler.step_terms(setup.model, stale)
    assert (logp_wrong - traj.log_prob).abs().max() > 1e-2


def test_fu_refuses_a_retain_prompt_distribution():
    import unlearn
    from unlearn.config import ConfigError

    cfg = compose_cfg(["model=tiny_sd", "formulation=fu", "model.prompts.retain=[a cowboy,a horse]"])
    with pytest.raises(ConfigError, match="model.prompts.retain: a distribution of 2 prompts"):
        unlearn.build(cfg)


@pytest.mark.parametrize("weights", ["[1]", "[1,-1]", "[1,true]", "x"])
def test_bad_retain_weights_name_the_key(weights):
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="model.prompts.retain_weights=.*accepted: null .equal weights. or 2 positive"):
        import unlearn
        unlearn.build(compose_cfg(["model=tiny_sd", "model.prompts.retain=[a cowboy,a horse]",
                                   f"model.prompts.retain_weights={weights}"]))


def test_lu_weighted_pool_keeps_each_samples_prompt():
    """LU's weighted fit denoises each pool sample under the prompt it was drawn with (a retain
    distribution): the table's rows during the primal loss are the pool's draws at the batch's indices."""
    import unlearn

    cfg = compose_cfg(["model=tiny_sd", "formulation=lu", "formulation.gradient=weighted",
                       "model.prompts.retain=[a cowboy,a horse,a red hat]", "formulation.weighted_pool=12",
                       "formulation.batch_size=5", "formulation.weighted_batch_size=6"])
    setup, _, f, mu, _ = unlearn.build(cfg)
    f.prepare()
    (table, pool_draw), = f._pool_conditions
    assert table is setup.model.cond.cond and len(pool_draw) == 12
    assert torch.bincount(pool_draw, minlength=3).min() >= 3  # three chunks (5, 5, 2), each its draw by weight
    replay = torch.Generator().set_state(f.gen.get_state())
    expected = pool_draw[torch.randint(0, 12, (6,), generator=replay)]  # the batch the primal step picks
    seen = []
    forward = setup.model.base._forward
    setup.model.base._forward = lambda x, t, c, *o: (seen.append(table.idx.clone()), forward(x, t, c, *o))[1]
    f.primal_loss(torch.ones(len(setup.concepts)))
    assert seen and all(torch.equal(s, expected) for s in seen)


def test_retain_anchors_compare_a_prompt_with_its_anchors_pretrained_model():
    """``model.prompts.anchors``: the pretrained side reads each chain's retain prompt as its anchor,
    sharing the trained side's draw; the objective's KL then compares "a cowboy" with the pretrained
    "a horse" (zero where the chain drew "a horse" itself)."""
    import unlearn

    cfg = compose_cfg(["model=tiny_sd", "formulation=lu", "model.prompts.retain=[a cowboy,a horse]",
                       "model.prompts.anchors={a cowboy: a horse}"])
    setup, sampler, _, _, _ = unlearn.build(cfg)
    table = setup.model.cond.cond
    assert setup.pretrained.cond.cond is not table and setup.pretrained.condition_tables()[0].base is table
    from unlearn.formulations.lu import reference_ids

    drawn = torch.tensor([0, 1, 1, 0])  # LU's weights share one normalising constant per reference prompt
    assert reference_ids(setup.pretrained.condition_tables()[0], drawn).tolist() == [0, 0, 0, 0]
    assert reference_ids(table, drawn).tolist() == [0, 1, 1, 0]
    x, t = torch.randn(4, *setup.model.sample_shape), torch.full((4,), 500)
    with torch.no_grad():
        table.idx = torch.tensor([1, 1, 1, 1])
        horse = setup.model.eps(x, t)  # LoRA starts at zero: the pretrained model under "a horse"
        table.idx = torch.tensor([0, 1, 0, 1])
        pre, mine = setup.pretrained.eps(x, t), setup.model.eps(x, t)
    torch.testing.assert_close(pre, horse)
    assert (mine[[0, 2]] - horse[[0, 2]]).abs().max() > 1e-4 and torch.allclose(mine[[1, 3]], horse[[1, 3]])
    traj = sampler.sample(setup.model, 6, torch.Generator().manual_seed(0), record=True)
    with torch.no_grad():
        _, kl = sampler.step_terms(setup.model, traj, setup.pretrained)
    drew = traj.conditions[0][1]
    assert kl[drew == 1].abs().max() < 1e-6 and kl[drew == 0].min() > 1e-6


@pytest.mark.parametrize("anchors", ["{a dog: a horse}", "{a cowboy: 3}", "[a horse]"])
def test_bad_retain_anchors_name_the_key(anchors):
    import unlearn
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="model.prompts.anchors=.* accepted: null or .retain prompt: anchor prompt"):
        unlearn.build(compose_cfg(["model=tiny_sd", "model.prompts.retain=[a cowboy,a horse]",
                                   f"model.prompts.anchors={anchors}"]))


def test_lu_weights_are_normalised_within_each_prompt():
    """The per-prompt tilt p_pre(x | c) exp(-lam l) / Z_c: each prompt keeps its share of the batch, and
    within a prompt the weights are its own softmax; a prompt whose samples all carry a large l (the
    concept's own prompt) is not emptied, as one softmax over the batch would do."""
    from unlearn.formulations.lu import prompt_normalised_weights

    logw = torch.tensor([0.0, -1.0, -50.0, -51.0, -52.0, 0.5])
    prompts = [torch.tensor([0, 0, 1, 1, 1, 2])]
    w = prompt_normalised_weights(logw, prompts)
    for c, share in [(0, 2 / 6), (1, 3 / 6), (2, 1 / 6)]:
        sel = prompts[0] == c
        torch.testing.assert_close(w[sel].sum(), torch.tensor(share))
        torch.testing.assert_close(w[sel] / w[sel].sum(), torch.softmax(logw[sel], 0))
    assert torch.softmax(logw, 0)[2:5].sum() < 1e-20  # the joint softmax would drop prompt 1
    # two tables: a row's prompt is the pair of its draws
    w2 = prompt_normalised_weights(logw, [torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 0])])
    torch.testing.assert_close(w2[[0, 2]].sum(), torch.tensor(2 / 6))
    torch.testing.assert_close(w2[[4, 5]] / w2[[4, 5]].sum(), torch.softmax(logw[[4, 5]], 0))
    torch.testing.assert_close(prompt_normalised_weights(logw, []), torch.softmax(logw, 0))


def test_text2img_fu_takes_one_constraint_per_forget_image_file(tmp_path):
    """FU on a text-to-image model with ``model.forget_images``: one forget set, constraint and
    multiplier per file (not one per unlearn prompt)."""
    from PIL import Image

    from unlearn.train import train

    files = []
    for i in range(3):
        f = tmp_path / f"img{i}.png"
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(f)
        files.append(str(f))
    cfg = compose_cfg(["model=tiny_sd", "formulation=fu", f"model.forget_images=[{','.join(files)}]"])
    s = train(cfg, tmp_path / "run")
    assert [c["name"] for c in s["constraints"]] == [f"forget_loss[forget set {i}]" for i in range(3)]
    assert len(s["multipliers"]) == 3


def test_ru_pool_estimators_refuse_a_retain_distribution():
    import unlearn
    from unlearn.config import ConfigError

    cfg = compose_cfg(["model=tiny_sd", "formulation=ru", "model.prompts.retain=[a cowboy,a horse]",
                       "formulation.kl_estimator=ratio", "formulation.final_samples=resample"])
    with pytest.raises(ConfigError, match="a retain distribution needs formulation.kl_estimator=path"):
        unlearn.build(cfg)
    unlearn.build(compose_cfg(["model=tiny_sd", "formulation=ru", "model.prompts.retain=[a cowboy,a horse]"]))
