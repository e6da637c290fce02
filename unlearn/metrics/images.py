"""Image helpers: sampling a model into ``[0, 1]`` images, saving grids, checking the convention."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..models.base import ScoreModel
from ..samplers import GaussianSampler
from .divergence import model_device


def pixel_encode(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` images to the ``[-1, 1]`` data space of pixel diffusion models."""
    return images * 2.0 - 1.0


def pixel_decode(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` model samples to ``[0, 1]`` images (clamped)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Raise ``ValueError`` unless ``images`` is a float ``(N, 3, H, W)`` tensor in ``[0, 1]``."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a (N, 3, H, W) tensor (got {shape})")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1] (got {images.dtype}); divide uint8 images by 255")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                         "decode [-1, 1] samples with (x + 1) / 2")
    return images


@torch.no_grad()
def sample_images(model: ScoreModel, sampler: GaussianSampler, n: int, seed: int = 0, cond=None,
                  decode: Callable | None = None, batch_size: int = 32) -> torch.Tensor:
    """``n`` samples of ``model`` decoded to ``[0, 1]`` images on the CPU (seeded, batched)."""
    decode = decode or pixel_decode
    dev = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for i in range(0, int(n), int(batch_size)):
        b = min(int(batch_size), int(n) - i)
        out.append(decode(sampler.sample(model, b, gen, cond=cond).x0).clamp(0, 1).float().cpu())
    return torch.cat(out)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
                    max_images: int | None = 64) -> Path:
    """Save ``[0, 1]`` images as one PNG grid (at most ``max_images``, ``nrow`` per row)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images[:max_images] if max_images else images
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(x)))))
    save_image(x.detach().float().cpu().clamp(0, 1), str(path), nrow=nrow, padding=2)
    return path
