"""The metric suite (unlearn/metrics) on locally built stand-ins: no downloads, seconds on a CPU."""
from __future__ import annotations

import json
import logging
import math
import socket
import time

import pytest
import torch
from torch import nn

from unlearn.config import ConfigError
from unlearn.metrics import (DEFAULTS, EvalContext, MetricSuite, clip_score_matrix, compute_kid, metrics_config,
                             retain_mask, retain_set, reset_warnings, sample_images)
from unlearn.metrics import weights as W
from unlearn.metrics.clip import CLIPScorer
from unlearn.models.base import ScoreModel
from unlearn.samplers import GaussianSampler
from unlearn.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear()
SHAPE = (3, 16, 16)


# -- stand-ins -----------------------------------------------------------------------------------
class SmallFeatures(nn.Module):
    """A fixed random conv net: [0, 1] images -> 64-d features (a KID feature extractor)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x * 2 - 1))))
        return nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)


class Descriptor(nn.Module):
    """SSCD stand-in: a fixed conv net, spatial features kept (no global pooling), not normalised."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4), 1)


class PointMass(ScoreModel):
    """Exact eps of a point mass at ``x0`` (a model that memorised one image): (x_t - sqrt(abar) x0)/sqrt(1-abar)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.schedule, self.sample_shape = SCHED, tuple(x0.shape)
        self.register_buffer("x0", x0)

    def eps(self, x, t, cond=None):
        a = self.schedule.abar_at(self._timesteps(t, x), x)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


class StdNormal(ScoreModel):
    """Exact eps of N(0, I) data: remembers nothing."""

    def __init__(self, shape):
        super().__init__()
        self.schedule, self.sample_shape = SCHED, tuple(shape)

    def eps(self, x, t, cond=None):
        return (1 - self.schedule.abar_at(self._timesteps(t, x), x)).sqrt() * x


def smooth_images(n, seed, size=16):
    """Images with some structure (random low-frequency patterns) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def forget_image():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    disk = ((xx**2 + yy**2) < 0.4).float()
    return torch.stack([disk, (xx + 1) / 2, (yy + 1) / 2 * (1 - disk)])  # (3, 16, 16) in [0, 1]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty weights cache, downloads off by the environment, and fresh once-per-process warnings."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reset_warnings()
    yield {"cache_dir": str(tmp_path / "empty_cache")}
    reset_warnings()


@pytest.fixture(scope="module")
def descriptor_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sscd") / "descriptor.torchscript.pt"
    torch.jit.script(Descriptor().eval()).save(str(p))
    return str(p)


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A tiny open_clip architecture registered from a local JSON, random weights saved to a file."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / "unlearn-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("unlearn-test-tiny-clip")
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return {"model": "unlearn-test-tiny-clip", "checkpoint": str(ckpt)}


# -- sampler start at t ----------------------------------------------------------------------------
def test_sampler_from_timestep():
    s = GaussianSampler(SCHED, 50, "ddpm")
    same = GaussianSampler(SCHED, kind="ddpm", timesteps=s.timesteps)
    assert same.timesteps == s.timesteps and same.c == s.c and same.s == s.s
    full = s.from_timestep(SCHED.T - 1)
    assert full.timesteps == s.timesteps and full.a == s.a
    r = s.from_timestep(300)
    assert r.timesteps[0] == 300 and r.timesteps[1:] == [t for t in s.timesteps if t < 300]
    assert GaussianSampler(SCHED, SCHED.T).from_timestep(5).timesteps == [5, 4, 3, 2, 1, 0]
    assert s.from_timestep(250, num_steps=6).timesteps == [250, 200, 150, 100, 50, 0]
    with pytest.raises(ValueError):
        GaussianSampler(SCHED, timesteps=[3, 5, 0])
    with pytest.raises(ValueError):
        s.from_timestep(SCHED.T)


def test_denoising_a_memorised_image_recovers_it():
    """The exact score of a point mass pulls x_t back to the point (posterior-variance DDPM: exactly)."""
    from unlearn.metrics import denoise_from, denoising_sampler

    x0 = forget_image() * 2 - 1
    gen = torch.Generator().manual_seed(0)
    out = denoise_from(PointMass(x0), denoising_sampler(SCHED, 400, num_steps=20), x0[None].repeat(2, 1, 1, 1),
                       400, gen)
    assert (out - x0).abs().max() < 1e-3
    far = denoise_from(StdNormal(SHAPE), denoising_sampler(SCHED, 400, num_steps=20), x0[None], 400, gen)
    assert (far - x0).abs().mean() > 0.1


# -- KID ---------------------------------------------------------------------------------------------
def test_kid_zero_on_itself_and_grows_with_shift():
    feat = SmallFeatures().eval()
    a = smooth_images(96, 0)
    kw = dict(subset_size=96, num_subsets=4, seed=0)
    self_kid = compute_kid(a, a, feat, **kw)["value"]
    shifts = [0.1, 0.2, 0.4]
    kids = [compute_kid(a, (a + d).clamp(0, 1), feat, **kw)["value"] for d in shifts]
    assert kids[0] > 0 and all(x < y for x, y in zip(kids, kids[1:])), kids
    # A set against itself: torchmetrics' unbiased MMD with the same m samples on both sides is
    # exactly -(2/m) (mean k(x, x) - mean_{x != y} k(x, y)) <= 0, an O(1/m) bias; tolerance: 10% of
    # the KID of the smallest shift (it is about 1% here).
    assert -0.1 * kids[0] < self_kid <= 0, (self_kid, kids)
    f = feat(a).double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    m = len(a)
    bias = -(2 / m) * (k.diag().mean() - (k.sum() - k.diag().sum()) / (m * (m - 1)))
    assert self_kid == pytest.approx(float(bias), rel=1e-6)
    # same distribution, different samples: small against a visible shift
    other = compute_kid(a, smooth_images(96, 1), feat, **kw)["value"]
    assert abs(other) < 0.5 * kids[0], (other, kids)


def test_kid_subset_size_adapts_and_is_recorded():
    feat = SmallFeatures().eval()
    suite = MetricSuite.from_config({"kid": {"subset_size": 1000, "num_subsets": 5}, "sscd": {"enabled": False},
                                     "clip": {"enabled": False}, "kl": {"enabled": False},
                                     "likelihood": {"enabled": False}}, kid_feature=feat)
    res = suite.evaluate(EvalContext(images=smooth_images(20, 0), reference_images=smooth_images(30, 1),
                                     reference_name="pretrained samples", step=7))
    k = res["kid"]
    assert k["status"] == "ok" and math.isfinite(k["value"])
    p = k["protocol"]
    assert p["subset_size"] == 20 and p["subset_size_configured"] == 1000
    assert (p["n_real"], p["n_fake"], p["num_subsets"], p["seed"], p["step"]) == (30, 20, 5, 0, 7)
    assert p["reference"] == "pretrained samples" and p["image_size"] == [16, 16]
    assert p["weights"]["source"] == "given" and len(p["weights"]["state_sha256"]) == 64
    assert len(p["id"]) == 12
    json.dumps(res)  # results go to summary.json as they are
    again = suite.evaluate(EvalContext(images=smooth_images(20, 0), reference_images=smooth_images(30, 1),
                                       reference_name="pretrained samples", step=8))["kid"]
    assert again["value"] == k["value"] and again["protocol"]["id"] == p["id"]  # seeded; step not in the id


def test_kid_inception_path_with_a_local_weight_file(tmp_path, offline):
    """The default feature model through its real loading code: torch-fidelity's InceptionV3 built
    with random weights, saved in its weight-file format, found through metrics.kid.inception_path."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    suite = MetricSuite.from_config({**offline, "kid": {"inception_path": str(path), "num_subsets": 2},
                                     "sscd": {"enabled": False}, "clip": {"enabled": False},
                                     "kl": {"enabled": False}, "likelihood": {"enabled": False}})
    assert suite.check_available() == {}
    r = suite.evaluate(EvalContext(images=smooth_images(2, 0), reference_images=smooth_images(2, 1)))["kid"]
    assert r["status"] == "ok" and math.isfinite(r["value"])
    p = r["protocol"]
    assert p["feature"].startswith("torch-fidelity InceptionV3") and "uint8" in p["input"]
    assert p["weights"]["source"] == "config" and p["weights"]["file"] == "inception.pth"
    assert p["subset_size"] == 2 and p["torch_fidelity"]


def test_retain_filter_keeps_low_scores():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0])  # mean 4
    assert retain_mask(scores, 1.0).tolist() == [True, True, True, False]
    assert retain_mask(scores, 0.5).tolist() == [True, False, False, False]  # threshold 2: strict
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    kept, info = retain_set(images, scores, 0.8)  # threshold 3.2
    assert kept[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert (info["kept"], info["total"]) == (3, 4) and info["thresholds"] == pytest.approx([3.2])
    two = torch.tensor([[1.0, 9.0], [1.0, 1.0], [7.0, 1.0], [3.0, 1.0]])  # means 3, 3
    assert retain_mask(two, 1.0).tolist() == [False, True, False, False]


# -- SSCD --------------------------------------------------------------------------------------------
def _sscd_cfg(path, **kw):
    return {"sscd": {"path": path, "resize": 32, "timestep": 250, "seeds": [0, 1], "denoise": {"num_steps": 10},
                     **kw},
            "kid": {"enabled": False}, "clip": {"enabled": False}, "kl": {"enabled": False},
            "likelihood": {"enabled": False}}


def test_sscd_protocol_oracle_vs_forgetful_model(descriptor_file, offline):
    img = forget_image()
    forget = torch.stack([img, smooth_images(1, 5)[0]])
    suite = MetricSuite.from_config({**_sscd_cfg(descriptor_file), **offline})
    assert suite.check_available() == {}
    oracle = PointMass(img * 2 - 1)  # memorised the first forget image
    r = suite.evaluate(EvalContext(model=oracle, forget_images=forget, step=3))["sscd"]
    assert r["status"] == "ok"
    assert r["per_image"][0] > 0.999  # recovered
    assert r["per_image"][1] < 0.5  # the other image is pulled towards the memorised one
    assert r["value"] == pytest.approx(max(r["per_image"]))
    assert len(r["similarity"]) == 2 and len(r["similarity"][0]) == 2  # seeds x images
    forgetful = suite.evaluate(EvalContext(model=StdNormal(SHAPE), forget_images=forget))["sscd"]
    assert forgetful["status"] == "ok" and forgetful["value"] < 0.9, forgetful["per_image"]
    p = r["protocol"]
    assert p["timestep"] == 250 and p["seeds"] == [0, 1] and p["n_forget"] == 2
    assert p["descriptor"]["file"] == "descriptor.torchscript.pt" and p["descriptor"]["source"] == "config"
    assert len(p["descriptor"]["sha256"]) == 64
    assert p["preprocess"]["mean"] == [0.485, 0.456, 0.406] and p["denoise"]["num_steps"] == 10
    assert p["denoise"]["first_timestep"] == 250 and p["image_size"] == [16, 16]
    assert set(suite.last_images) >= {"sscd_original", "sscd_denoised"}
    json.dumps(r)


def test_sscd_latent_model(descriptor_file, offline):
    """encode/decode callables: the model works on a 2x downsampled 'latent'."""
    f = nn.functional
    encode = lambda im: f.avg_pool2d(im * 2 - 1, 2)  # noqa: E731
    decode = lambda z: ((f.interpolate(z, scale_factor=2, mode="bilinear") + 1) / 2).clamp(0, 1)  # noqa: E731
    img = smooth_images(1, 3)[0]
    suite = MetricSuite.from_config({**_sscd_cfg(descriptor_file, seeds=[0]), **offline})
    r = suite.evaluate(EvalContext(model=PointMass(encode(img[None])[0]), forget_images=img[None], encode=encode,
                                   decode=decode))["sscd"]
    assert r["status"] == "ok" and r["value"] > 0.95
    assert r["protocol"]["encode"].endswith("<lambda>")


# -- CLIP --------------------------------------------------------------------------------------------
def test_clip_score_clamps_per_sample():
    img = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = clip_score_matrix(img, txt)
    assert torch.allclose(s, torch.tensor([[100.0, 0.0], [0.0, 0.0], [60.0, 80.0]]), atol=1e-4)
    # clamp per image, then average: mean over images for prompt 0 is 160/3, not 100 * max(mean cos, 0) = 20
    assert float(s[:, 0].mean()) == pytest.approx(160 / 3)


class _StubCLIP(nn.Module):
    def __init__(self, img_feats, txt_feats):
        super().__init__()
        self.register_buffer("img", img_feats)
        self.register_buffer("txt", txt_feats)
        self.p = nn.Parameter(torch.zeros(()))

    def encode_image(self, x):
        return self.img[: len(x)]

    def encode_text(self, tokens):
        return self.txt[: len(tokens)]


def test_clip_suite_clamps_per_sample_and_takes_max_over_prompts():
    stub = _StubCLIP(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    scorer = CLIPScorer(stub, lambda prompts: torch.zeros(len(prompts), 4, dtype=torch.long),
                        {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}, {"source": "stub"})
    suite = MetricSuite.from_config({"kid": {"enabled": False}, "sscd": {"enabled": False}, "kl": {"enabled": False},
                                     "likelihood": {"enabled": False}}, clip_scorer=scorer)
    r = suite.evaluate(EvalContext(images=torch.rand(2, 3, 8, 8), prompts=["horse", "dog"]))["clip"]
    assert r["per_prompt"] == pytest.approx({"horse": 50.0, "dog": 0.0})  # cos 1 and -1 -> 100 and 0
    assert r["value"] == pytest.approx(50.0)


def test_clip_end_to_end_tiny_open_clip(clip_checkpoint, offline):
    suite = MetricSuite.from_config({"clip": clip_checkpoint, "kid": {"enabled": False}, "sscd": {"enabled": False},
                                     "kl": {"enabled": False}, "likelihood": {"enabled": False}, **offline})
    assert suite.check_available() == {}
    images, prompts = smooth_images(6, 0, size=40), ["a photo of a horse", "a cowboy", "a brown dog"]
    r = suite.evaluate(EvalContext(images=images, prompts=prompts))["clip"]
    assert r["status"] == "ok"
    scorer = suite._loaded["clip"]
    s = 100 * (nn.functional.normalize(scorer.image_features(images), dim=-1)
               @ nn.functional.normalize(scorer.text_features(prompts), dim=-1).T).clamp(min=0)
    assert r["value"] == pytest.approx(float(s.mean(0).max()), rel=1e-5)
    assert list(r["per_prompt"]) == prompts and all(0 <= v <= 100 for v in r["per_prompt"].values())
    p = r["protocol"]
    assert p["weights"]["file"] == "tiny_clip.pt" and p["weights"]["model"] == "unlearn-test-tiny-clip"
    assert p["preprocess"]["size"] == [32, 32] and p["n_images"] == 6 and p["prompts"] == prompts
    assert p["open_clip_version"] and "100 * max(cos" in p["score"]
    json.dumps(r)


def test_clip_wrong_architecture_is_missing_not_a_crash(clip_checkpoint, offline):
    suite = MetricSuite.from_config({"clip": {"model": "RN50", "checkpoint": clip_checkpoint["checkpoint"]},
                                     **offline})
    missing = suite.check_available()
    assert "could not load" in missing["clip"]


# -- KL and likelihood (any ScoreModel: here the exact GMM scores) ------------------------------------
def test_kl_and_likelihood_on_gmm():
    from unlearn.models.gmm import ExactGMMScore, GaussianMixture, GMMOracle

    gmm = GaussianMixture([[-2, 0], [2, 0], [0, 3]], [0.5, 0.5, 0.5], [1, 1, 1])
    pre = ExactGMMScore(gmm, SCHED)
    q = ExactGMMScore(GMMOracle(gmm, [2]).concepts[0], SCHED)
    sampler = GaussianSampler(SCHED, 50, "ddpm")
    cfg = {"kid": {"enabled": False}, "sscd": {"enabled": False}, "clip": {"enabled": False},
           "kl": {"enabled": True, "num_samples": 64, "batch_size": 32},
           "likelihood": {"enabled": True, "num_samples": 512, "batch_size": 256, "num_timesteps": 256}}
    suite = MetricSuite.from_config(cfg, image_model=False)
    assert suite.enabled == ["kl", "likelihood"]
    same = suite.evaluate(EvalContext(model=pre, pretrained=pre, sampler=sampler, concepts=[q], concept_names=["c2"]))
    assert same["kl"]["value"] == pytest.approx(0.0, abs=1e-9)
    lik = same["likelihood"]
    # E_pre[q/p_pre] = 1 (exp of a noisy log-ratio is biased upwards: 16 timesteps gave 1.7-7.2)
    assert abs(lik["value"] - 1.0) < 0.2, lik
    assert abs(lik["mean_log_ratio"]["c2"] + 15.19) < 1.5  # = -KL(p_pre || q) = -15.19 (formulas.md)
    moved = suite.evaluate(EvalContext(model=q, pretrained=pre, sampler=sampler, concepts=[q]))
    assert moved["kl"]["value"] > 0.5 and moved["likelihood"]["value"] > 1.5
    p = same["kl"]["protocol"]
    assert p["sampler"]["kind"] == "ddpm" and p["n"] == 64 and p["seed"] == 0
    assert same["likelihood"]["protocol"]["concepts"] == ["c2"]
    json.dumps(same)
    skipped = suite.evaluate(EvalContext(model=pre))
    assert skipped["kl"]["status"] == "skipped" and "ctx.pretrained" in skipped["kl"]["reason"]


# -- missing weights, strict mode ----------------------------------------------------------------------
def test_missing_weights_warn_once_and_are_marked_missing(offline, caplog, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("no download may be attempted offline")

    monkeypatch.setattr(W, "download", no_download)
    import open_clip  # noqa: F401 - import time is not what is measured here

    suite = MetricSuite.from_config({**offline, "kl": {"enabled": False}, "likelihood": {"enabled": False}})
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="unlearn.metrics"):
        missing = suite.check_available()
        ctx = EvalContext(images=smooth_images(4, 0), reference_images=smooth_images(4, 1), prompts=["a horse"],
                          model=StdNormal(SHAPE), forget_images=smooth_images(1, 2))
        r1, r2 = suite.evaluate(ctx), suite.evaluate(ctx)
        MetricSuite.from_config(offline).check_available()  # a second suite in the same process: no new warning
    assert time.perf_counter() - t0 < 5.0  # no network wait (a download attempt would take seconds or hang)
    assert set(missing) == {"kid", "sscd", "clip"}
    assert "metrics.kid.inception_path" in missing["kid"] and "HF_HUB_OFFLINE" in missing["kid"]
    assert "metrics.sscd.path" in missing["sscd"] and "metrics.clip.checkpoint" in missing["clip"]
    for r in (r1, r2):
        assert {k: v["status"] for k, v in r.items()} == {"kid": "missing", "sscd": "missing", "clip": "missing"}
        assert all(v["reason"] and "value" not in v for v in r.values())
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    for name in ("kid", "sscd", "clip"):
        assert sum(f"metric '{name}'" in m for m in warned) == 1, warned
    assert MetricSuite.scalars(r1) == {}


def test_strict_mode_fails_fast(offline):
    import open_clip  # noqa: F401

    suite = MetricSuite.from_config({**offline, "strict": True})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="metrics.strict=true.*kid.*sscd.*clip"):
        suite.check_available()
    assert time.perf_counter() - t0 < 3.0
    with pytest.raises(ConfigError):
        suite.evaluate(EvalContext(images=smooth_images(4, 0), reference_images=smooth_images(4, 1)))


def test_unreachable_download_is_missing_within_the_timeout(tmp_path, monkeypatch):
    reset_warnings()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hang(*a, **k):
        time.sleep(5)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    suite = MetricSuite.from_config({"cache_dir": str(tmp_path), "download": True, "download_timeout": 0.3,
                                     "sscd": {"url": "https://example.invalid/sscd.pt"}, "kid": {"enabled": False},
                                     "clip": {"enabled": False}, "kl": {"enabled": False},
                                     "likelihood": {"enabled": False}})
    t0 = time.perf_counter()
    missing = suite.check_available()
    assert time.perf_counter() - t0 < 2.5  # the probe gives up after download_timeout=0.3 s
    assert "download failed" in missing["sscd"] and "not reachable" in missing["sscd"]
    reset_warnings()


def test_cached_weights_are_found_without_config(descriptor_file, tmp_path, offline):
    import shutil

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(descriptor_file, cache / "sscd_disc_mixup.torchscript.pt")
    suite = MetricSuite.from_config({"cache_dir": str(cache), "kid": {"enabled": False}, "clip": {"enabled": False},
                                     "kl": {"enabled": False}, "likelihood": {"enabled": False}})
    assert suite.check_available() == {}
    assert suite._records["sscd"]["source"] == "cache"
    bad = MetricSuite.from_config({**offline, "sscd": {"path": str(tmp_path / "nope.pt")}})
    assert "metrics.sscd.path=" in bad.check_available()["sscd"]


# -- config, outputs ------------------------------------------------------------------------------------
def test_config_group_matches_defaults(cfg_factory):
    from omegaconf import OmegaConf

    cfg = cfg_factory()
    assert OmegaConf.to_container(cfg.metrics) == DEFAULTS
    assert metrics_config(cfg.metrics).kid.subset_size == 1000
    with pytest.raises(ConfigError, match="kid.subset_sise"):
        metrics_config({"kid": {"subset_sise": 5}})
    with pytest.raises(ConfigError, match="metrics.kid.subset_size"):
        metrics_config({"kid": {"subset_size": 1}})
    with pytest.raises(ConfigError, match="metrics.sscd.enabled"):
        metrics_config({"sscd": {"enabled": "maybe"}})


def test_gmm_runs_enable_nothing_by_default(offline, caplog):
    suite = MetricSuite.from_config(offline, image_model=False)
    with caplog.at_level(logging.WARNING, logger="unlearn.metrics"):
        assert suite.enabled == [] and suite.check_available() == {}
    assert not caplog.records and not suite.due(10, final=False) and not suite.due(10, final=True)
    every = MetricSuite.from_config({"eval_every": 5})
    assert [s for s in range(1, 12) if every.due(s)] == [5, 10] and every.due(11, final=True)


def test_context_from_setup():
    from types import SimpleNamespace

    pre, q = StdNormal(SHAPE), PointMass(forget_image())
    setup = SimpleNamespace(model=pre, pretrained=pre, concepts=[q], concept_names=["horse"], cond="cowboy",
                            concept_conds=["horse"])
    sampler = GaussianSampler(SCHED, 10)
    ctx = EvalContext.from_setup(setup, sampler, step=4, prompts=["a horse"])
    assert (ctx.model, ctx.pretrained, ctx.sampler, ctx.cond, ctx.step) == (pre, pre, sampler, "cowboy", 4)
    assert list(ctx.concepts) == [q] and list(ctx.concept_conds) == ["horse"] and list(ctx.prompts) == ["a horse"]


def test_sample_images_and_png_grid(tmp_path):
    from PIL import Image

    model = PointMass(forget_image() * 2 - 1)
    imgs = sample_images(model, GaussianSampler(SCHED, 10, "ddpm"), 5, seed=0, batch_size=2)
    assert imgs.shape == (5, *SHAPE) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    suite = MetricSuite.from_config({"sscd": {"enabled": False}, "clip": {"enabled": False}, "kl": {"enabled": False},
                                     "likelihood": {"enabled": False}, "kid": {"num_subsets": 2}},
                                    kid_feature=SmallFeatures())
    suite.evaluate(EvalContext(images=imgs, reference_images=smooth_images(5, 0)))
    paths = suite.save_images(tmp_path / "eval", prefix="step1_")
    assert sorted(p.name for p in paths) == ["step1_reference.png", "step1_samples.png"]
    assert Image.open(paths[0]).size[0] > 16
    bad = EvalContext(images=imgs * 2 - 1, reference_images=imgs)  # [-1, 1] images: a caller's bug
    assert suite.evaluate(bad)["kid"]["status"] == "error"
    strict = MetricSuite.from_config({"strict": True, "sscd": {"enabled": False}, "clip": {"enabled": False},
                                      "kl": {"enabled": False}, "likelihood": {"enabled": False}},
                                     kid_feature=SmallFeatures())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        strict.evaluate(bad)


# -- registered metrics ----------------------------------------------------------------------------------
BUILT_IN_OFF = {n: {"enabled": False} for n in ("kid", "sscd", "clip", "kl", "likelihood")}


@pytest.fixture
def brightness_metric():
    """A metric defined here, outside the package: the mean pixel value of ``ctx.images``."""
    from unlearn.metrics import Metric, Result, unregister

    class Brightness(Metric, name="brightness"):
        needs = ("images",)
        image_only = False  # enabled: auto -> on for every model
        defaults = {"enabled": False, "channel": None}  # its block (configs/metrics/default.yaml has none)

        @classmethod
        def validate(cls, check):
            check.number("channel", int, 0, allow_none=True)

        def evaluate(self, ctx, weights, seed):
            c = self.cfg.channel
            x = ctx.images if c is None else ctx.images[:, int(c)]
            proto = {"statistic": "mean pixel value in [0, 1]", "channel": c, "n_images": len(x)}
            return Result(float(x.mean()), proto, {"std": float(x.std())}, {"bright": ctx.images})

    yield Brightness
    unregister("brightness")


def test_a_metric_defined_outside_the_package(brightness_metric, tmp_path):
    from unlearn.metrics import registered

    assert registered()["brightness"] is brightness_metric
    assert "brightness" not in MetricSuite.from_config(None).enabled  # its own default: off
    suite = MetricSuite.from_config({**BUILT_IN_OFF, "brightness": {"enabled": True}}, image_model=False)
    assert suite.enabled == ["brightness"] and suite.check_available() == {}
    images = smooth_images(6, 0)
    res = suite.evaluate(EvalContext(images=images, step=2))
    r = res["brightness"]
    assert r["status"] == "ok" and r["value"] == pytest.approx(float(images.mean()))
    assert r["std"] == pytest.approx(float(images.std()))
    p = r["protocol"]
    assert p["n_images"] == 6 and p["channel"] is None and p["step"] == 2 and len(p["id"]) == 12
    assert MetricSuite.scalars(res) == {"brightness": r["value"]}
    assert [x.name for x in suite.save_images(tmp_path)] == ["bright.png"]
    json.dumps(res)
    red = MetricSuite.from_config({**BUILT_IN_OFF, "brightness": {"enabled": "auto", "channel": 0}}, image_model=False)
    r0 = red.evaluate(EvalContext(images=images))["brightness"]
    assert r0["value"] == pytest.approx(float(images[:, 0].mean())) and r0["protocol"]["id"] != p["id"]
    skipped = suite.evaluate(EvalContext(prompts=["a horse"]))["brightness"]
    assert skipped == {"status": "skipped", "reason": "brightness needs ctx.images"}
    with pytest.raises(ConfigError, match="metrics.brightness.channel must be >= 0"):
        metrics_config({"brightness": {"channel": -1}})
    with pytest.raises(ConfigError, match="brightness.chanel"):
        metrics_config({"brightness": {"chanel": 1}})
    with pytest.raises(ConfigError, match="metrics.brightness.enabled"):
        metrics_config({"brightness": {"enabled": "sometimes"}})


def test_registry_matches_the_config_file():
    from pathlib import Path

    import yaml

    from unlearn.metrics import IMAGE_METRICS, NAMES, metric_names, registered

    assert NAMES == ("kid", "sscd", "clip", "kl", "likelihood") and IMAGE_METRICS == ("kid", "sscd", "clip")
    path = Path(__file__).resolve().parents[1] / "configs" / "metrics" / "default.yaml"
    blocks = [k for k, v in yaml.safe_load(path.read_text()).items() if isinstance(v, dict) and "enabled" in v]
    assert blocks == list(NAMES) == metric_names()  # the file's order is the suite's order
    assert all(n in registered() for n in blocks)


def test_loaded_objects_are_given_by_metric_name():
    feat = SmallFeatures()
    cfg = {**BUILT_IN_OFF, "kid": {"enabled": True, "num_subsets": 2}}
    ctx = EvalContext(images=smooth_images(8, 0), reference_images=smooth_images(8, 1))
    by_name = MetricSuite.from_config(cfg, given={"kid": feat}).evaluate(ctx)["kid"]
    by_keyword = MetricSuite.from_config(cfg, kid_feature=feat).evaluate(ctx)["kid"]
    assert by_name["status"] == "ok" and by_name["value"] == by_keyword["value"]
    assert by_name["protocol"]["id"] == by_keyword["protocol"]["id"]
    assert MetricSuite.from_config(cfg, kid=feat, clip_scorer=None)._records["kid"]["source"] == "given"
    with pytest.raises(TypeError, match="kid_featur"):
        MetricSuite.from_config(cfg, kid_featur=feat)


def test_a_listed_metric_without_its_module_is_one_line(monkeypatch):
    from unlearn.metrics import suite as S

    monkeypatch.setitem(S.DEFAULTS, "nosuch", {"enabled": "auto"})
    with pytest.raises(ImportError, match="block for metric 'nosuch' but there is no module unlearn/metrics/nosuch.py"):
        S._import_listed_metrics()
    monkeypatch.delitem(S.DEFAULTS, "nosuch")
    monkeypatch.setitem(S.DEFAULTS, "weights", {"enabled": "auto"})  # a module that registers no metric
    with pytest.raises(ImportError, match="registers no metric named 'weights'"):
        S._import_listed_metrics()
