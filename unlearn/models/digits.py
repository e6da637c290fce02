"""The handwritten-digits testbed: real 8x8 images that scikit-learn ships (no download).

``load_digits`` gives 1,797 images in 10 classes. They are split once (fixed seed) into
``diffusion`` (the diffusion model's training data and FU's retain data), ``eval_train`` (the
evaluation network's training data) and ``eval_test`` (its held-out accuracy). Pixels are
scaled to [-1, 1]. A class-conditional diffusers ``UNet2DModel`` (labels 0-9, plus 10 = the
null class of classifier-free guidance) is pretrained on the ``diffusion`` split and cached
like the GMM's models.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..utils import atomic_torch_save, config_hash, generator
from .training import fit_denoiser

log = logging.getLogger(__name__)
SPLITS = {"diffusion": 1000, "eval_train": 600}  # the rest (197 images) is eval_test
NULL_CLASS = 10


def load_digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (images (N, 1, 8, 8) in [-1, 1], labels (N,))}``, the same on every machine."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    x, y = x[perm], y[perm]
    a, b = SPLITS["diffusion"], SPLITS["diffusion"] + SPLITS["eval_train"]
    return {"diffusion": (x[:a], y[:a]), "eval_train": (x[a:b], y[a:b]), "eval_test": (x[b:], y[b:])}


def _unet(arch: dict):
    from diffusers import UNet2DModel

    return UNet2DModel(**arch)


def pretrain_digits(m, cache_dir: str | Path, show_progress: bool = True) -> tuple[torch.nn.Module, dict, bool]:
    """The class-conditional UNet (cached by everything that determines its weights)."""
    from .diffusers_models import DiffusersScore, schedule_from_scheduler_config

    arch = OmegaConf.to_container(m.unet, resolve=True)
    sched = OmegaConf.to_container(m.scheduler, resolve=True)
    pt = OmegaConf.to_container(m.pretrain, resolve=True)
    copies = int(m.pretrain.forget_copies)
    if copies == 0:  # the plain model: its cache key predates the key (no re-pretraining)
        del pt["forget_copies"]
    forget = [int(i) for i in m.forget_indices] if copies else []
    key = {"arch": arch, "scheduler": sched, "pretrain": pt, "data": "sklearn-digits/diffusion/seed0"}
    if forget:  # a different model: its training data hold extra copies of the forget images
        key["duplicated"] = forget
    path = Path(str(cache_dir)) / f"digits_unet_{config_hash(key)}.pt"
    unet = _unet(arch)
    if path.exists():
        try:
            unet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return unet.eval(), sched, True
        except Exception as exc:  # a corrupt cache entry is rebuilt, not trusted
            log.warning("cache entry %s unreadable (%s); retraining", path, exc)
    x, y = load_digits_splits()["diffusion"]
    if forget:  # duplicated training images get memorised (as in large models): FU then has something to undo
        x = torch.cat([x, x[forget].repeat(copies, 1, 1, 1)])
        y = torch.cat([y, y[forget].repeat(copies)])
    torch.manual_seed(int(pt["seed"]))
    g = generator(int(pt["seed"]))
    net = DiffusersScore(unet, schedule_from_scheduler_config(sched), tuple(x.shape[1:]), conditioning="class")

    def batch(g_):
        idx = torch.randint(0, len(x), (int(pt["batch_size"]),), generator=g_)
        labels = y[idx].clone()
        drop = torch.rand(len(idx), generator=g_) < float(pt["cond_drop"])  # classifier-free guidance
        labels[drop] = NULL_CLASS
        return x[idx], labels

    unet.train()
    fit_denoiser(net, unet.parameters(), batch, int(pt["steps"]), float(pt["lr"]), g, "pretrain digits UNet",
                 show_progress)
    unet.eval()
    atomic_torch_save(unet.state_dict(), path)
    return unet, sched, False
