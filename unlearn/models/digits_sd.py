"""A Stable-Diffusion-class pipeline trained here on the scikit-learn digits (no download).

The components are SD's own classes at a small size: an ``AutoencoderKL`` (the digits' diffusion
split, upsampled to 16x16 RGB, to a 4x8x8 latent), a ``CLIPTextModel`` with the repository's offline
``CLIPTokenizer``, a cross-attention ``UNet2DConditionModel`` and SD's scaled-linear DDPM schedule.
Captions name each image's digit in several phrasings ("a handwritten seven", "the digit 7", "a 7",
...), the generic "a handwritten digit" names any digit, and a share of empty captions trains the
unconditional model of classifier-free guidance.

The text encoder stays frozen, as SD keeps CLIP frozen, here at a random initialisation whose
weights are drawn 10x wider than CLIP's (``initializer_factor: 10``): at CLIP's scale the flattened
embeddings of different captions had cosine similarities of 0.62-0.91 and after 1,200 steps the UNet
had barely learnt them ("a 3" drew 40% 3s at guidance 3); at 10x they are 0.34-0.54 apart. Trained
jointly with the UNet (lr 2e-3, 1,500 steps) the encoder collapsed: every prompt drew the same
digit shares. Frozen, the embeddings are computed once, which keeps pretraining within minutes. The
UNet learns what each phrasing means; the phrasings of one digit stay different embeddings, so
whether erasing one erases the others is a real question (the paraphrase shares).

The result is saved with ``StableDiffusionPipeline.save_pretrained`` (no safety checker) into the
cache, keyed by everything that determines its weights; runs then load it through ``model.path``,
the code path of a local Stable Diffusion copy.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..utils import config_hash, generator, progress

log = logging.getLogger(__name__)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERIC = "a handwritten digit"


def captions(d: int) -> list[str]:
    """The phrasings of digit ``d`` seen in pretraining."""
    w = WORDS[d]
    return [f"a handwritten {w}", f"the digit {d}", f"a {d}", w, f"a picture of the number {w}", f"handwritten {d}"]


def digit_of(prompt: str) -> int | None:
    """The digit a prompt names (its last word, a numeral or a number word), else None."""
    words = str(prompt).strip().lower().split()
    if not words:
        return None
    tail = words[-1]
    if tail.isdigit() and len(tail) == 1:
        return int(tail)
    return WORDS.index(tail) if tail in WORDS else None


def upsampled(x: torch.Tensor, size: int) -> torch.Tensor:
    """Digits (N, 1, 8, 8) in [-1, 1] -> (N, 3, size, size) in [-1, 1] (bilinear, grey repeated to RGB)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1).repeat(1, 3, 1, 1)


def _build(arch: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(int(arch["seed"]))
    return (AutoencoderKL(**arch["vae"]), CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            UNet2DConditionModel(**arch["unet"]))


def _fit_vae(vae, x: torch.Tensor, pt: dict, g: torch.Generator, show: bool) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=float(pt["vae_lr"]))
    steps, bs, kl_w = int(pt["vae_steps"]), int(pt["batch_size"]), float(pt["vae_kl"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    vae.train()
    bar = progress(range(steps), desc="pretrain digits_sd VAE", enabled=show)
    for _ in bar:
        xb = x[torch.randint(0, len(x), (bs,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + kl_w * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()


def pretrain_digits_sd(m, cache_dir: str | Path, show_progress: bool = True) -> tuple[Path, bool]:
    """The pipeline folder (``StableDiffusionPipeline.save_pretrained`` layout) and whether it was cached."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..families.text2img import ASSETS
    from .diffusers_models import DiffusersScore, schedule_from_scheduler_config
    from .digits import load_digits_splits
    from .training import fit_denoiser

    arch = OmegaConf.to_container(m.arch, resolve=True)
    sched = OmegaConf.to_container(m.arch_scheduler, resolve=True)
    pt = OmegaConf.to_container(m.pretrain, resolve=True)
    key = {"arch": arch, "scheduler": sched, "pretrain": pt, "data": "sklearn-digits/diffusion/seed0",
           "captions": [captions(d) for d in range(10)] + [GENERIC]}
    folder = Path(str(cache_dir)) / f"digits_sd_{config_hash(key)}"
    if (folder / "model_index.json").exists():
        return folder, True

    x8, y = load_digits_splits()["diffusion"]
    x = upsampled(x8, int(arch["vae"]["sample_size"]))
    g = generator(int(pt["seed"]))
    vae, te, unet = _build(arch)
    _fit_vae(vae, x, pt, g, show_progress)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale

    tok = CLIPTokenizer.from_pretrained(str(ASSETS / "tiny_clip_tokenizer"),
                                        model_max_length=int(arch["text_encoder"]["max_position_embeddings"]))
    table = [""] + [GENERIC] + [c for d in range(10) for c in captions(d)]
    te.eval().requires_grad_(False)
    with torch.no_grad():
        ids = tok(table, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = te(ids)[0]
    per = len(captions(0))
    p_empty, p_generic = float(pt["caption_empty"]), float(pt["caption_generic"])

    def batch(g_):
        idx = torch.randint(0, len(lat), (int(pt["batch_size"]),), generator=g_)
        u = torch.rand(len(idx), generator=g_)
        k = torch.randint(0, per, (len(idx),), generator=g_)
        row = 2 + y[idx] * per + k                              # one of the image's digit's phrasings
        row = torch.where(u < p_empty + p_generic, torch.ones_like(row), row)  # the generic caption
        row = torch.where(u < p_empty, torch.zeros_like(row), row)             # the empty caption
        return lat[idx], emb[row]

    net = DiffusersScore(unet, schedule_from_scheduler_config(sched), tuple(lat.shape[1:]), conditioning="text")
    unet.train()
    fit_denoiser(net, unet.parameters(), batch, int(pt["unet_steps"]), float(pt["unet_lr"]), g,
                 "pretrain digits_sd UNet", show_progress)
    unet.eval()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**sched), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if folder.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder, False
