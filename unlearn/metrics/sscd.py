"""SSCD copy-detection similarity and the paper's data-unlearning protocol (Figures 2, 3).

Descriptor: the SSCD TorchScript model ``sscd_disc_mixup`` (ResNet-50, 512-d) from
https://github.com/facebookresearch/sscd-copy-detection, loaded with ``torch.jit.load``.
Preprocessing as in its README: resize (``small_288``: short edge to 288; ``skew_320``:
320 x 320), ImageNet mean/std normalisation; the descriptor is L2-normalised and the similarity
of two images is the cosine of their descriptors.

Protocol (paper appendix E.2, as in the SISS code it builds on): each forget image ``x0`` is
noised to timestep ``t`` (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e``), denoised by the model
from ``t`` down to 0, and compared with the original; "max SSCD" is the largest similarity over
the forget set and the noise seeds. Latent models encode the images first and decode the
result (``encode``/``decode``); pixel models use ``x0 = 2 * image - 1``.

:class:`SSCD` is the registered ``sscd`` metric of the suite.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError
from ..models.base import ScoreModel
from ..samplers import GaussianSampler
from .base import Checks, Metric, Result, Weights, callable_name
from .divergence import model_device, sampler_protocol
from .images import check_images, pixel_decode, pixel_encode
from .weights import WeightsUnavailable, file_record

SSCD_FILENAME = "sscd_disc_mixup.torchscript.pt"
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_descriptor(path: str | Path, device="cpu") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


class SSCDPreprocess:
    """Resize (int: short edge; pair: fixed size; antialiased bilinear) and normalise ``[0, 1]`` images."""

    def __init__(self, resize: int | Sequence[int] = 288, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if isinstance(resize, int):
            self.resize = [int(resize)]
        else:
            self.resize = [int(v) for v in resize]
            if len(self.resize) != 2:
                raise ValueError(f"metrics.sscd.resize must be an int or [h, w] (got {resize})")
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        x = TF.resize(images.float(), self.resize, antialias=True).clamp(0.0, 1.0)
        return TF.normalize(x, self.mean, self.std)

    def protocol(self) -> dict:
        return {"resize": self.resize if len(self.resize) == 2 else f"short edge {self.resize[0]}",
                "interpolation": "bilinear, antialiased (tensor)", "mean": self.mean, "std": self.std}


@torch.no_grad()
def descriptors(images: torch.Tensor, model: nn.Module, preprocess: Callable, batch_size: int = 32,
                device="cpu") -> torch.Tensor:
    """L2-normalised descriptors, shape (N, D), on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        d = model(preprocess(images[i:i + batch_size].to(device)))
        out.append(nn.functional.normalize(d.float().flatten(1), dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def denoise_from(model: ScoreModel, sampler: GaussianSampler, x0: torch.Tensor, t: int,
                 generator: torch.Generator, cond=None) -> torch.Tensor:
    """Noise ``x0`` to timestep ``t`` and run ``sampler`` (which must start at ``t``) down to 0."""
    if sampler.timesteps[0] != int(t):
        raise ValueError(f"the denoising sampler starts at {sampler.timesteps[0]}, not at t={t}")
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    x_t = model.schedule.add_noise(x0, noise, tt)
    return sampler.sample(model, x0.shape[0], generator=generator, cond=cond, x_T=x_t).x0


def denoising_sampler(schedule, t: int, kind: str = "ddpm", variance: str = "posterior", eta: float = 1.0,
                      num_steps: int | None = None) -> GaussianSampler:
    """A sampler from ``t`` to 0: every timestep (``num_steps=None``, as SISS and diffusers'
    DDPMScheduler do) or ``num_steps`` evenly spaced ones."""
    base = GaussianSampler(schedule, schedule.T, kind=kind, eta=eta, variance=variance)
    return base.from_timestep(int(t), num_steps)


def sscd_protocol(model: ScoreModel, forget_images: torch.Tensor, descriptor: nn.Module, preprocess: Callable,
                  t: int, seeds: Sequence[int], sampler: GaussianSampler | None = None, cond=None,
                  encode: Callable | None = None, decode: Callable | None = None, batch_size: int = 16,
                  device=None, x0: torch.Tensor | None = None) -> dict:
    """Similarities of denoised forget images to the originals, shape (S seeds, N images), and reductions.

    ``forget_images`` are ``[0, 1]`` images; ``encode``/``decode`` map them to/from the model's
    data space (default: pixel ``[-1, 1]``); ``x0`` (the forget data in the model's space) skips
    ``encode``. ``sampler`` defaults to every DDPM step from ``t`` (posterior variance).
    Returns ``max`` (the "max SSCD"), ``mean``, ``per_image`` (max over seeds), ``similarity``
    (the matrix) and ``denoised`` (the first seed's images, for a picture).
    """
    encode = encode or pixel_encode
    decode = decode or pixel_decode
    mdev = model_device(model)
    device = device or mdev
    sampler = sampler or denoising_sampler(model.schedule, t)
    ref = descriptors(forget_images, descriptor, preprocess, batch_size, device)
    sims, first = [], None
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))  # CPU generator: samplers draw noise on the CPU
        den = []
        for i in range(0, len(forget_images), batch_size):
            xb = x0[i:i + batch_size].to(mdev) if x0 is not None else encode(forget_images[i:i + batch_size].to(mdev))
            den.append(decode(denoise_from(model, sampler, xb, t, gen, cond)).clamp(0, 1).cpu())
        den = torch.cat(den)
        first = den if first is None else first
        d = descriptors(den, descriptor, preprocess, batch_size, device)
        sims.append((d * ref).sum(1))
    sim = torch.stack(sims)
    return {"max": float(sim.max()), "mean": float(sim.mean()), "per_image": sim.max(0).values.tolist(),
            "similarity": sim, "denoised": first}


# -- the metric --------------------------------------------------------------------------------
class SSCD(Metric, name="sscd"):
    """Max SSCD of the forget images denoised by ``ctx.model`` from ``metrics.sscd.timestep``."""

    needs = ("model", ("forget_images", "forget_x0"))
    weights = True
    given_keyword = "sscd_descriptor"

    @classmethod
    def validate(cls, check: Checks) -> None:
        c = check.cfg
        check.number("timestep", int, 0)
        r = c.resize
        if not (isinstance(r, int) or (hasattr(r, "__len__") and len(r) == 2)):
            check.fail("resize", f"must be an int (short edge) or [h, w] (got {r!r})")
        if len(c.seeds) < 1:
            check.fail("seeds", "must list at least one seed")
        if str(c.denoise.kind) not in GaussianSampler.KINDS:
            check.fail("denoise.kind", f"must be one of {list(GaussianSampler.KINDS)}")
        if str(c.denoise.variance) not in ("beta", "posterior"):
            check.fail("denoise.variance", "must be beta or posterior")
        check.number("denoise.num_steps", int, 1, allow_none=True)

    def load(self) -> Weights:
        c = self.cfg
        path, src = self.resolve(c.path, "metrics.sscd.path", SSCD_FILENAME, c.url)
        try:
            mod = load_descriptor(path, self.device)
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailable(f"{path} could not be loaded with torch.jit.load "
                                     f"({type(e).__name__}: {e}); set metrics.sscd.path") from None
        return Weights(mod, file_record(path, src))

    def evaluate(self, ctx, weights, seed) -> Result:
        c, model = self.cfg, ctx.model
        t = int(c.timestep)
        if t > model.schedule.T - 1:
            raise ConfigError(f"metrics.sscd.timestep must be in 0..{model.schedule.T - 1} (got {t})")
        decode = ctx.decode or pixel_decode
        encode = ctx.encode or pixel_encode
        images = ctx.forget_images
        if images is None:
            with torch.no_grad():
                images = decode(ctx.forget_x0).clamp(0, 1).float().cpu()
        check_images(images, "ctx.forget_images")
        d = c.denoise
        sampler = denoising_sampler(model.schedule, t, str(d.kind), str(d.variance), float(d.eta),
                                    None if d.num_steps is None else int(d.num_steps))
        pre = SSCDPreprocess(c.resize if isinstance(c.resize, int) else list(c.resize), list(c.mean), list(c.std))
        seeds = [int(s) for s in c.seeds]
        r = sscd_protocol(model, images, weights.obj, pre, t, seeds, sampler, ctx.cond, encode, decode,
                          int(self.root.batch_size), self.device, x0=ctx.forget_x0)
        proto = {
            "descriptor": weights.record, "preprocess": pre.protocol(),
            "similarity": "cosine of L2-normalised descriptors", "timestep": t, "seeds": seeds,
            "denoise": sampler_protocol(sampler), "n_forget": len(images), "image_size": list(images.shape[-2:]),
            "encode": callable_name(ctx.encode) or "pixel: 2x - 1", "decode": callable_name(ctx.decode) or
            "pixel: (x + 1) / 2, clamped", "reduction": "max over forget images and seeds",
        }
        details = {"mean": r["mean"], "per_image": r["per_image"], "similarity": r["similarity"]}
        return Result(r["max"], proto, details, {"sscd_original": images, "sscd_denoised": r["denoised"]})

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        return {"max_sscd": result["value"], "mean_sscd": result["mean"]}
