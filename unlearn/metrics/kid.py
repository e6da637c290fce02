"""Kernel Inception Distance with torchmetrics, and the paper's retain-set filter.

Image convention everywhere in ``unlearn.metrics``: float tensors ``(N, 3, H, W)`` in ``[0, 1]``.
A KID feature extractor is any ``nn.Module`` mapping such a batch to ``(N, D)`` features.
:class:`InceptionFeatures` is the standard one: torch-fidelity's TF-ported InceptionV3 (the
weights of the FID/KID literature, ``weights-inception-2015-12-05-6726825d.pth``) as used by
torchmetrics (``NoTrainInceptionV3``), fed with ``uint8`` images obtained by rounding
``x * 255`` (what saving the images as PNG does) and resized to 299 x 299 by torchmetrics
(bilinear, antialiased).

``subset_size`` adapts to the data: torchmetrics raises when it exceeds the number of real or
fake images, so the size used is ``min(configured, n_real, n_fake)`` and is recorded.

:class:`KID` is the registered ``kid`` metric of the suite.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch
from torch import nn

from .base import Checks, Metric, Result, Weights, module_record, versions
from .images import check_images
from .weights import WeightsUnavailable, file_record

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_DIMS = ("64", "192", "768", "2048", "logits_unbiased")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats to ``uint8`` by rounding (as ``torchvision.utils.save_image`` does)."""
    return (images.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 features (``feature`` in 64/192/768/2048) for ``[0, 1]`` images."""

    def __init__(self, weights_path: str | Path, feature: str | int = 2048):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        feature = str(feature)
        if feature not in INCEPTION_DIMS:
            raise ValueError(f"metrics.kid.feature_dim must be one of {list(INCEPTION_DIMS)} (got {feature})")
        self.feature = feature
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                                      feature_extractor_weights_path=str(weights_path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(images))

    def train(self, mode: bool = True):  # never leaves eval mode
        return super().train(False)


class _Features(nn.Module):
    """Wraps a feature extractor for torchmetrics: optional resize, ``(N, D)`` float64 output."""

    def __init__(self, module: nn.Module, image_size: int | None = None):
        super().__init__()
        self.module = module
        self.image_size = image_size

    def forward(self, x):
        if self.image_size:
            x = nn.functional.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=True).clamp(0, 1)
        with torch.no_grad():
            return self.module(x).reshape(x.shape[0], -1).double()


def compute_kid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, subset_size: int = 1000,
                num_subsets: int = 100, seed: int = 0, image_size: int | None = None, batch_size: int = 32,
                degree: int = 3, coef: float = 1.0, device="cpu") -> dict:
    """KID between ``real`` and ``fake`` images (``[0, 1]``, ``(N, 3, H, W)``) with torchmetrics.

    Returns ``value`` (mean over subsets), ``std``, ``subset_size`` (used), ``n_real``, ``n_fake``.
    The random subsets come from a seeded generator (torchmetrics draws them from torch's
    global RNG; it is forked and seeded here so the result is reproducible).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real), len(fake)
    used = min(int(subset_size), n_real, n_fake)
    if used < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake images (got {n_real} real, {n_fake} fake)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' "will save all extracted features" notice
        metric = KernelInceptionDistance(feature=_Features(feature, image_size), subsets=int(num_subsets),
                                         subset_size=used, degree=int(degree), coef=float(coef))
    metric = metric.to(device)
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch_size):
            metric.update(imgs[i:i + batch_size].to(device), real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return {"value": float(mean), "std": float(std), "subset_size": used, "n_real": n_real, "n_fake": n_fake}


# -- retain sets -------------------------------------------------------------------------------
def retain_mask(scores: torch.Tensor, factor: float) -> torch.Tensor:
    """Which pretrained samples form the retain set: ``score < factor * mean(score)``.

    ``scores`` are the unlearn-concept scores of samples of the pretrained model: the likelihood
    ratio ``q/p_pre`` (not its log) or the CLIP score, shape (N,) or (N, m) for m concepts
    (then a sample is kept when it is below the threshold of every concept).
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or len(s) == 0:
        raise ValueError(f"retain scores must have shape (N,) or (N, m) with N > 0 (got {tuple(s.shape)})")
    if not torch.isfinite(s).all():
        raise ValueError("retain scores must be finite")
    thresholds = float(factor) * s.mean(0)
    return (s < thresholds).all(1)


def retain_set(images: torch.Tensor, scores: torch.Tensor, factor: float) -> tuple[torch.Tensor, dict]:
    """The images kept by :func:`retain_mask`, and what was done (threshold, counts)."""
    mask = retain_mask(scores, factor)
    s = torch.as_tensor(scores, dtype=torch.float64)
    s = s[:, None] if s.ndim == 1 else s
    info = {"factor": float(factor), "thresholds": (float(factor) * s.mean(0)).tolist(),
            "kept": int(mask.sum()), "total": int(len(mask)), "rule": "score < factor * mean(score)"}
    return images[mask.to(images.device)], info


# -- the metric --------------------------------------------------------------------------------
class KID(Metric, name="kid"):
    """KID of ``ctx.images`` against ``ctx.reference_images`` (InceptionV3 or a configured feature module)."""

    needs = ("images", "reference_images")
    weights = True
    given_keyword = "kid_feature"

    @classmethod
    def validate(cls, check: Checks) -> None:
        check.number("subset_size", int, 2)
        check.number("num_subsets", int, 1)
        check.number("degree", int, 1)
        check.number("coef", float, 1e-12)
        check.number("image_size", int, 8, allow_none=True)
        c = check.cfg
        if str(c.feature_dim) not in INCEPTION_DIMS:
            check.fail("feature_dim", f"must be one of {list(INCEPTION_DIMS)} (got {c.feature_dim})")
        f = str(c.feature)
        if f != "inception" and ":" not in f:
            check.fail("feature", f"must be 'inception' or 'package.module:factory' (got {f!r})")

    def load(self) -> Weights:
        c = self.cfg
        if str(c.feature) == "inception":
            path, src = self.resolve(c.inception_path, "metrics.kid.inception_path", INCEPTION_FILENAME, INCEPTION_URL)
            try:
                mod = InceptionFeatures(path, str(c.feature_dim))
            except Exception as e:  # noqa: BLE001 - a corrupt or wrong file
                raise WeightsUnavailable(f"{path} could not be loaded as torch-fidelity's InceptionV3 "
                                         f"({type(e).__name__}: {e}); set metrics.kid.inception_path") from None
            rec = file_record(path, src)
        else:
            mod_name, fn = str(c.feature).split(":", 1)
            mod = getattr(importlib.import_module(mod_name), fn)()
            rec = {**module_record(mod), "factory": str(c.feature)}
        return Weights(mod.eval().to(self.device), rec)

    def evaluate(self, ctx, weights, seed) -> Result:
        c, feature = self.cfg, weights.obj
        real = check_images(ctx.reference_images, "ctx.reference_images")
        fake = check_images(ctx.images, "ctx.images")
        r = compute_kid(real, fake, feature, int(c.subset_size), int(c.num_subsets), seed,
                        c.image_size, int(self.root.batch_size), int(c.degree), float(c.coef), self.device)
        inception = str(c.feature) == "inception" and isinstance(feature, InceptionFeatures)
        v = versions()
        proto = {
            "feature": (f"torch-fidelity InceptionV3 (TF port), pool features {c.feature_dim}" if inception
                        else weights.record.get("class", "custom")),
            "weights": weights.record,
            "input": "float (N,3,H,W) in [0,1]" + (" -> uint8 round(255 x) -> bilinear antialiased 299x299 "
                                                    "(torchmetrics NoTrainInceptionV3)" if inception else ""),
            "image_size": list(fake.shape[-2:]), "reference_image_size": list(real.shape[-2:]),
            "resize": c.image_size, "reference": ctx.reference_name,
            "n_real": r["n_real"], "n_fake": r["n_fake"], "subset_size": r["subset_size"],
            "subset_size_configured": int(c.subset_size), "num_subsets": int(c.num_subsets),
            "kernel": f"polynomial degree {int(c.degree)}, gamma 1/D, coef {float(c.coef)}", "seed": seed,
            "torchmetrics": v["torchmetrics"], "torch_fidelity": v["torch-fidelity"],
        }
        return Result(r["value"], proto, {"std": r["std"]}, {"samples": fake, "reference": real})

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        return {"kid": result["value"], "kid_std": result["std"]}
