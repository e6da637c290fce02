"""Pixel-space DDPMs: google/ddpm-celebahq-256 and the offline double ``tiny_ddpm`` (an
unconditional UNet2DModel). Its concepts ``q_i`` (RU and LU need them, FU does not) are copies
fine-tuned on each forget set (cached), as the Gaussian mixture's are trained on each component.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..models.diffusers_models import DiffusersScore
from ..models.training import fit_denoiser
from ..utils import atomic_torch_save, config_hash, generator
from .base import register_family
from .diffusers_family import DiffusersFamily, Roles

log = logging.getLogger(__name__)


@register_family("ddpm")
class PixelDDPM(DiffusersFamily):
    conditioning = "none"
    double = "tiny_ddpm"

    def needs_forget_data(self) -> bool:
        return True  # its concepts too are fine-tuned on the forget sets

    def roles(self, gen: torch.Generator) -> Roles:
        forget_sets = self.forget_sets([], gen)
        concepts = [self.finetuned_concept(x, i) for i, x in enumerate(forget_sets)] \
            if "concepts" in self.needs else []
        return Roles(model=self.view(None, trained=True, name="model"),
                     pretrained=self.view(None, trained=False, name="pretrained"),
                     names=[f"forget set {i}" for i in range(len(forget_sets))], concepts=concepts,
                     forget_sets=forget_sets)

    def finetuned_concept(self, x: torch.Tensor, idx: int) -> DiffusersScore:
        """``q_i``: a copy of the pretrained UNet fine-tuned on forget set ``i`` (cached)."""
        m, c = self.m, self.m.concepts
        key = {"source": self.source if not m.tiny else OmegaConf.to_container(m.tiny),
               "data": hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16], "steps": int(c.steps), "lr": float(c.lr),
               "batch": int(c.batch_size), "seed": int(c.seed) + idx}
        path = Path(str(self.cfg.paths.cache_dir)) / f"concept_{m.name}_{config_hash(key)}.pt"
        unet = copy.deepcopy(self.pre_base.unet).float().requires_grad_(False)
        net = DiffusersScore(unet, self.schedule, self.base.sample_shape, conditioning="none",
                             prediction_type=self.base.prediction_type, precision="fp32", max_batch=self.base.max_batch)
        params = [p for n_, p in unet.named_parameters() if "lora_" not in n_]
        if path.exists():
            try:
                unet.load_state_dict(torch.load(path, map_location=self.device, weights_only=True), strict=False)
                return net
            except Exception as exc:
                log.warning("concept cache %s unreadable (%s); retraining", path, exc)
        for p in params:
            p.requires_grad_(True)
        unet.train()
        fit_denoiser(net, params, lambda g_: (x[torch.randint(0, len(x), (int(c.batch_size),), generator=g_)], None),
                     int(c.steps), float(c.lr), generator(int(c.seed) + idx), f"fine-tune q_{idx} on its forget set",
                     self.show, weight_decay=0.01, warmup_cosine=False)  # AdamW's default weight decay
        unet.eval().requires_grad_(False)
        atomic_torch_save({k: v for k, v in unet.state_dict().items() if "lora_" not in k}, path)
        return net


def load_unet_lora(unet, lora_dir: str | Path):
    """Put a LoRA saved by a pixel-DDPM run (``run_dir/unet_lora``) into a UNet2DModel."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    inject_adapter_in_model(LoraConfig.from_pretrained(lora_dir), unet)
    set_peft_model_state_dict(unet, load_file(lora_dir / "adapter_model.safetensors"))
    return unet
