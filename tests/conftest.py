"""Shared fixtures: tiny configs composed from the real config tree, a shared pretraining cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# tiny but real: every code path, seconds per run
TINY_COMMON = ["logger=none", "progress=false", "formulation.dual_steps=2", "train.final_fit_steps=0"]
# under pytest-xdist (`make test` runs two workers on two cores) every torch process keeps to one thread:
# two-thread torch beside another busy process runs far slower than one thread
WORKER_THREADS = ["num_threads=1"] if os.environ.get("PYTEST_XDIST_WORKER") else []
TINY_BY_MODEL = {
    "gmm": ["model.pretrain.steps=150", "model.pretrain.batch_size=256", "model.sampler.num_steps=20",
            "train.final_samples=512"],
}
# image doubles: small metric budgets (KID/SSCD/CLIP weights are absent offline: those are marked missing)
TINY_METRICS = ["metrics.num_images=4", "metrics.retain.num_candidates=4", "metrics.kl.num_samples=2",
                "metrics.likelihood.num_samples=2", "metrics.likelihood.num_timesteps=2", "metrics.batch_size=4"]
TINY_BY_MODEL["tiny_sd"] = TINY_BY_MODEL["tiny_ddpm"] = TINY_BY_MODEL["tiny_classcond"] = TINY_METRICS
# digits: a few pretraining steps (the real pretraining is exercised by the slow tests)
TINY_BY_MODEL["digits"] = TINY_METRICS + ["model.pretrain.steps=20", "model.eval_net.steps=20", "model.final_samples=16",
                                          "model.sampler.num_steps=5", "metrics.sscd.denoise.num_steps=3",
                                          "metrics.sscd.seeds=[0]", "metrics.retain.source=data"]
# digits_sd: a few pretraining steps of each component (the real pipeline is exercised by the slow tests)
TINY_BY_MODEL["digits_sd"] = TINY_METRICS + ["model.pretrain.vae_steps=4", "model.pretrain.unet_steps=4",
                                             "model.eval_net.steps=20", "model.final_samples=8", "model.eval_samples=4",
                                             "model.sampler.num_steps=4", "model.max_batch=64"]
TINY = TINY_COMMON + TINY_BY_MODEL["gmm"]  # the default model's tiny overrides (subprocess tests use these)
IMAGE_MODELS = ("tiny_sd", "tiny_ddpm")
TINY_BY_FORMULATION = {
    "lu": ["formulation.primal_steps_per_dual=1", "formulation.primal_batch_size=16", "formulation.batch_size=32",
           "formulation.likelihood_timesteps=4", "formulation.grad_timesteps=5",
           "formulation.weighted_pool=128", "formulation.weighted_batch_size=64", "formulation.final_batch_size=32",
           "formulation.likelihood_pilot=8"],
    "ru": ["formulation.batch_size=64", "formulation.pool_size=256", "formulation.likelihood_timesteps=8"],
    "fu": ["formulation.primal_steps_per_dual=1", "formulation.primal_batch_size=64", "formulation.forget_samples=32",
           "formulation.forget_batch_size=16", "formulation.eval_draws=2", "formulation.retain_pool=64"],
}

# image doubles: a handful of samples per estimate (the tiny UNets run in milliseconds per batch)
TINY_BY_FORMULATION_IMAGE = {
    "lu": ["formulation.primal_steps_per_dual=1", "formulation.primal_batch_size=2", "formulation.batch_size=4",
           "formulation.likelihood_timesteps=2", "formulation.grad_timesteps=2",
           "formulation.weighted_pool=8", "formulation.weighted_batch_size=4", "formulation.weighted_likelihood_noise=1",
           "formulation.final_batch_size=4", "formulation.likelihood_pilot=2"],
    "ru": ["formulation.batch_size=4", "formulation.pool_size=8", "formulation.likelihood_timesteps=2"],
    "fu": ["formulation.primal_steps_per_dual=1", "formulation.primal_batch_size=2", "formulation.forget_batch_size=2",
           "formulation.eval_draws=2", "formulation.retain_pool=4"],
}


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory):
    torch.set_num_threads(1 if WORKER_THREADS else 2)
    cache = os.environ.get("UNLEARN_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["UNLEARN_CACHE_DIR"] = cache
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def compose_cfg(overrides=(), tiny=True):
    import unlearn

    overrides = list(overrides)
    form = next((o.split("=", 1)[1] for o in overrides if o.startswith("formulation=")), "lu")
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "gmm")
    by_form = TINY_BY_FORMULATION.get(form, []) if model == "gmm" else TINY_BY_FORMULATION_IMAGE.get(form, [])
    base = (TINY_COMMON + TINY_BY_MODEL.get(model, []) + by_form) if tiny else []
    return unlearn.compose(base + overrides + WORKER_THREADS, CONFIGS)  # as the package composes, with the tiny budgets first


@pytest.fixture
def cfg_factory():
    return compose_cfg
