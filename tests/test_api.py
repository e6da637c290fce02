"""The Python entry point composes like ``train.py`` and runs the same builder."""
from __future__ import annotations

import json

import pytest

import unlearn
from unlearn.config import ConfigError

from conftest import TINY, TINY_BY_FORMULATION, WORKER_THREADS


def test_run_from_overrides_matches_train(tmp_path, cfg_factory):
    from unlearn.train import train

    a = unlearn.run(TINY + TINY_BY_FORMULATION["ru"] + ["formulation=ru", "train.final_samples=256"] + WORKER_THREADS, run_dir=tmp_path / "api")
    b = train(cfg_factory(["formulation=ru", "train.final_samples=256"]), run_dir=tmp_path / "train")
    assert a["status"] in ("completed", "constraints_violated")
    assert json.loads((tmp_path / "api" / "summary.json").read_text())["multipliers"] == a["multipliers"]
    assert a["multipliers"] == b["multipliers"]
    assert [c["value"] for c in a["constraints"]] == [c["value"] for c in b["constraints"]]


def test_compose_names_the_accepted_options():
    with pytest.raises(ConfigError, match="model='nope' is not a known option; accepted: .*gmm"):
        unlearn.compose(["model=nope"])
    cfg = unlearn.compose(["formulation=ru"])
    assert cfg.formulation.name == "ru" and cfg.model.name == "gmm"


def test_build_gives_the_parts_without_training():
    setup, sampler, formulation, multipliers, _ = unlearn.build(TINY)
    assert formulation.name == "lu" and len(setup.concepts) == multipliers.value().numel()
