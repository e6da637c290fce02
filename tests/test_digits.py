"""The digits testbed: real 8x8 digits, a class-conditional diffusers UNet, an evaluation network
plugged into the metrics where Inception, CLIP and SSCD go."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from unlearn.checkpoint import FINISHED


def test_splits_are_fixed_disjoint_and_cover_every_digit():
    from unlearn.models.digits import load_digits_splits

    a, b = load_digits_splits(), load_digits_splits()
    sizes = {k: len(v[0]) for k, v in a.items()}
    assert sizes == {"diffusion": 1000, "eval_train": 600, "eval_test": 197}
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
        assert a[k][0].shape[1:] == (1, 8, 8) and a[k][0].min() >= -1 and a[k][0].max() <= 1
        assert set(a[k][1].tolist()) == set(range(10))
    flat = {k: {tuple(x.flatten().tolist()) for x in v[0]} for k, v in a.items()}
    assert not (flat["diffusion"] & flat["eval_test"]) or len(flat["diffusion"] & flat["eval_test"]) < 3  # dataset duplicates only


def test_concept_scorer_reads_the_digit_and_clamps_nothing_away():
    from unlearn.models.digits_eval import DigitsConceptScorer, DigitsNet

    net = DigitsNet().eval()
    sc = DigitsConceptScorer(net, 0.5)
    imgs = torch.rand(5, 3, 8, 8)
    s = sc.scores(imgs, ["digit 7", "digit 1"])
    p = net.class_probs(imgs)
    torch.testing.assert_close(s, 100 * p[:, [7, 1]])
    with pytest.raises(ValueError, match="end in a digit"):
        sc.scores(imgs, ["a horse"])


@pytest.mark.parametrize("formulation", ["lu", "ru", "fu"])
def test_digits_runs_with_the_evaluation_network_as_metric_models(formulation, tmp_path):
    from unlearn.train import train

    extra = ["metrics.eval_every=2"] if formulation == "ru" else []
    s = train(compose_cfg(["model=digits", f"formulation={formulation}", "num_threads=1", *extra]), tmp_path)
    assert s["status"] in FINISHED
    st = s["metric_status"]
    assert st["kid"] == "ok" and st["clip"] == "ok"  # the evaluation network, through the suite's interfaces
    assert st["sscd"] == ("ok" if formulation == "fu" else "skipped")
    assert "DigitsFeatures" in s["metric_protocols"]["kid"]["feature"]
    m = s["metrics"]
    assert abs(sum(m["class_share"]) - 1) < 1e-6 and 0 <= m["unlearned_share"] <= 1
    assert np.isfinite(m["kid"]) and 0 <= m["clip"] <= 100
    assert s["setup"]["weights"].startswith("digits UNet pretrained locally")
    from unlearn.models.digits import load_digits_splits

    _, y = load_digits_splits()["diffusion"]  # KID against the real retain digits (metrics.retain.source=data)
    kept = len(y) - 3 if formulation == "fu" else int((~torch.isin(y, torch.tensor(s["setup"]["classes"]["unlearn"]))).sum())
    assert s["retain_set"] == {"source": "data", "size": kept}
    if formulation == "fu":
        assert len(s["constraints"]) == 3 and np.isfinite(m["max_sscd"])
    if formulation == "ru":  # resampled final samples: the image metrics see them, the composed score's
        # pathwise KL is not what they show -> skipped, replaced by the pool's importance-weighted KL
        assert st["kl"] == "skipped" and s["extra"]["kl_to_pretrained_estimator"].startswith("importance")
        assert np.isfinite(m["kl_to_pretrained"]) and m["kl_to_pretrained"] >= 0
        steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        evals = [r["eval"] for r in steps if r.get("eval")]  # metrics.eval_every=2: the same during training
        assert evals and all("clip" in e and "kl_to_pretrained" not in e for e in evals)
    else:
        assert st["kl"] == "ok"
    assert (tmp_path / "samples.png").exists() and (tmp_path / "eval" / "final_samples.png").exists()


# -- the testbed's checks, at full size (pretraining about 5-10 minutes on 2 cores, then cached) -----------
def _full(formulation, tmp_path, *extra):
    from unlearn.train import train

    return train(compose_cfg(["model=digits", f"formulation={formulation}", "logger=none", "progress=false",
                              *extra], tiny=False), tmp_path)


PAPER_RU = ["formulation.separation_cap=null", "formulation.pool_size=2048", "formulation.likelihood_timesteps=8",
            "formulation.dual_lr=0.002", "formulation.threshold_factor=2.0"]  # = experiment=digits_ru_paper, factor 2


@pytest.mark.slow
@pytest.mark.parametrize("formulation,extra", [
    ("lu", []),
    ("ru", []),
    pytest.param("ru", PAPER_RU, id="ru-paper", marks=pytest.mark.xfail(strict=True, reason=(
        "the paper's RU target p_pre prod (p_pre/q_i)^c reweights the other digits by the concept models' "
        "likelihood ratio: 5 and 8 rise (retained_share_tv 0.19 at factor 2; README, digits RU)"))),
])
def test_digits_concept_unlearning_removes_the_digit_and_keeps_the_others(formulation, extra, tmp_path):
    """The testbed's acceptance check at the preset's default threshold (measured: LU 7s 0.076 -> 0.034,
    retained_share_tv 0.050; RU with the capped separation 1s and 7s 0.182 -> 0.077, 0.050)."""
    from unlearn.figures import retained_share_tv

    s = _full(formulation, tmp_path, *extra)
    m, pre = s["metrics"], s["pretrained_metrics"]
    assert pre["eval_net_accuracy"] > 0.95
    # the unlearned digits: well below their pretrained share
    assert m["unlearned_share"] < 0.5 * pre["unlearned_share"], (m["class_share"], pre["class_share"])
    # the other digits keep their share: their proportions within 0.07 in total variation of the
    # pretrained model's (each share's sampling std over 1,024 samples is about 0.009)
    assert retained_share_tv(s) < 0.07, (m["class_share"], pre["class_share"])


@pytest.mark.slow
def test_digits_data_unlearning_forgets_the_images_and_keeps_kid(tmp_path):
    s = _full("fu", tmp_path)
    m, pre = s["metrics"], s["pretrained_metrics"]
    assert m["max_sscd"] < pre["max_sscd"] - 0.05, (m["max_sscd"], pre["max_sscd"])
    assert m["kid"] < pre["kid"] + 0.02, (m["kid"], pre["kid"])


def test_tuning_files_override_the_metric_defaults():
    """configs/tuning/* come after metrics/default and train.yaml in the defaults list: the digits
    metric settings (8x8 descriptors, small KID subsets) reach the run, command-line overrides still win."""
    cfg = compose_cfg(["model=digits", "formulation=fu"], tiny=False)
    assert cfg.metrics.kid.subset_size == 128 and list(cfg.metrics.sscd.resize) == [8, 8]
    assert cfg.metrics.retain.source == "data" and cfg.model.pretrain.forget_copies == 25
    cfg = compose_cfg(["model=digits", "formulation=fu", "metrics.kid.subset_size=64"], tiny=False)
    assert cfg.metrics.kid.subset_size == 64


def test_real_retain_digits_need_a_model_with_data(tmp_path):
    from unlearn.config import ConfigError
    from unlearn.train import train

    with pytest.raises(ConfigError, match=r"metrics.retain.source=data needs real retain images"):
        train(compose_cfg(["model=tiny_ddpm", "formulation=fu", "num_threads=1", "metrics.retain.source=data"]),
              tmp_path)
    with pytest.raises(ConfigError, match=r"metrics.retain.source must be samples or data"):
        train(compose_cfg(["model=digits", "formulation=lu", "metrics.retain.source=real"]), tmp_path)


def test_duplicated_forget_images_make_a_different_cached_model(tmp_path):
    from unlearn.models.digits import pretrain_digits

    base = compose_cfg(["model=digits", "formulation=fu", "model.pretrain.steps=2", "model.pretrain.forget_copies=0"],
                       tiny=False).model
    dup = compose_cfg(["model=digits", "formulation=fu", "model.pretrain.steps=2"], tiny=False).model
    pretrain_digits(base, tmp_path, show_progress=False)
    pretrain_digits(dup, tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("digits_unet_*.pt"))) == 2


@pytest.mark.parametrize("experiment,cap,factors", [("digits_ru", 1.0, [1.15, 1.3, 1.45, 1.6, 1.75]),
                                                     ("digits_ru_paper", None, [1.3, 1.6, 2.0, 2.5, 3.0])])
def test_digits_ru_presets_compose_and_validate(experiment, cap, factors):
    """The capped preset and the paper's uncapped one: same model and estimator, their own constraint."""
    from unlearn.config import validate_config

    cfg = compose_cfg([f"experiment={experiment}", "experiment.strength=1"], tiny=False)
    validate_config(cfg)
    assert (cfg.model.name, cfg.formulation.name, cfg.formulation.kl_estimator) == ("digits", "ru", "ratio")
    assert cfg.formulation.separation_cap == cap and list(cfg.experiment.threshold_factors) == factors
    assert cfg.formulation.threshold_factor == factors[1] and list(cfg.model.classes.unlearn) == [1, 7]
