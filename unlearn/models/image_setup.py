"""Image model families on diffusers UNets: text-to-image latent diffusion and pixel DDPMs.

``model.family``:

* ``text2img`` - Stable Diffusion v1.4, BK-SDM-tiny, and the offline double ``tiny_sd``:
  UNet2DConditionModel + AutoencoderKL + CLIPTextModel/CLIPTokenizer. Prompts come from
  ``model.prompts`` (``retain``: what the model generates and must stay close to; ``unlearn``:
  one concept ``q_i`` per prompt). They are encoded once. Sampling roles use classifier-free
  guidance (``model.guidance_scale``); the likelihood ratio of LU compares the plain
  conditional model of each unlearn prompt with the unconditional model (formulas.md, LU).
* ``ddpm`` - google/ddpm-celebahq-256 and the double ``tiny_ddpm``: an unconditional
  UNet2DModel in pixel space. Its concepts ``q_i`` (needed by RU and LU, not FU) are copies
  fine-tuned on each forget set (cached), as the GMM's are trained on each component.

What is trained: LoRA adapters (peft) on the layers ``model.lora.target_modules`` selects
(default: cross-attention ``attn2`` to_q/to_k/to_v/to_out.0, ESD-x) with the base frozen, or
the whole UNet (``model.finetune=full``). The pretrained model is the same UNet with the
adapters switched off, so LoRA costs no second copy.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..samplers import build_sampler
from ..setup import UnlearningSetup
from ..utils import atomic_torch_save, config_hash, generator
from .diffusers_models import (DTYPES, ConditionedView, DiffusersScore, Guidance, add_lora,
                               schedule_from_scheduler_config)
from .training import fit_denoiser
from .weights import locate_weights

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
FAMILIES = ("text2img", "ddpm", "classcond")
FINETUNES = ("lora", "full")


def validate_image_config(m: DictConfig) -> None:
    fam = str(m.get("family"))
    if fam not in FAMILIES:
        raise ConfigError(f"model.family must be one of {list(FAMILIES)} (got {fam!r})")
    if str(m.finetune) not in FINETUNES:
        raise ConfigError(f"model.finetune must be one of {list(FINETUNES)} (got {m.finetune!r})")
    if str(m.precision) not in DTYPES:
        raise ConfigError(f"model.precision must be one of {list(DTYPES)} (got {m.precision!r})")
    if str(m.device) not in ("auto", "cpu", "cuda") and not str(m.device).startswith("cuda:"):
        raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N (got {m.device!r})")
    if fam == "text2img":
        p = m.get("prompts")
        if p is None or not list(p.get("retain") or []) or not list(p.get("unlearn") or []):
            raise ConfigError("model.prompts.retain and model.prompts.unlearn must each list at least one prompt")
        if float(m.guidance_scale) < 1.0:
            raise ConfigError(f"model.guidance_scale must be >= 1 (got {m.guidance_scale})")
    if fam == "classcond":
        c = m.get("classes")
        n = int(m.num_classes)
        unl = list(c.get("unlearn") or []) if c is not None else []
        if not unl or any(not isinstance(i, int) or not 0 <= i < n for i in unl):
            raise ConfigError(f"model.classes.unlearn must list class labels in 0..{n - 1} (got {unl})")
        ret = c.get("retain")
        if ret is not None and any(not isinstance(i, int) or not 0 <= i < n for i in list(ret)):
            raise ConfigError(f"model.classes.retain must be null (unconditional) or class labels in 0..{n - 1} "
                              f"(got {list(ret)})")
        if float(m.guidance_scale) < 1.0:
            raise ConfigError(f"model.guidance_scale must be >= 1 (got {m.guidance_scale})")
    if int(m.max_batch) < 1:
        raise ConfigError(f"model.max_batch must be >= 1 (got {m.max_batch})")
    for f in list(m.get("forget_images") or []):
        if not Path(str(f)).is_file():
            raise ConfigError(f"model.forget_images: {f!r} is not a file")
    rf = m.get("retain_folder")
    if rf and not Path(str(rf)).is_dir():
        raise ConfigError(f"model.retain_folder={rf!r} is not a folder")


def _device(m) -> torch.device:
    d = str(m.device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={d} but no CUDA device is available; accepted here: auto, cpu")
    return torch.device(d)


# -- building or loading the components ------------------------------------------------------------
def _tiny_components(m) -> dict:
    """Random-weight models of the real classes from ``model.tiny`` (no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    t = OmegaConf.to_container(m.tiny, resolve=True)
    torch.manual_seed(int(t.get("seed", 0)))
    out = {"scheduler": dict(t["scheduler"])}
    if str(m.family) == "text2img":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        out["unet"] = UNet2DConditionModel(**t["unet"])
        out["vae"] = AutoencoderKL(**t["vae"])
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**t["text_encoder"]))
        out["tokenizer"] = CLIPTokenizer.from_pretrained(str(ASSETS / "tiny_clip_tokenizer"))
    else:
        out["unet"] = UNet2DModel(**t["unet"])
    return out


def _load_components(m, root: Path, dtype) -> dict:
    from diffusers import UNet2DConditionModel, UNet2DModel

    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    if str(m.family) == "text2img":
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        return {"unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype),
                "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype),
                "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"), "scheduler": sched}
    return {"unet": UNet2DModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype), "scheduler": sched}


def components(m, cache_dir=None, show_progress: bool = False) -> tuple[dict, str]:
    """The model's components and where they came from (``tiny``, the local pretraining cache or the weights folder)."""
    if m.get("pretrain") is not None and m.get("dataset") == "digits" and not m.get("path"):
        from .digits import pretrain_digits

        unet, sched, hit = pretrain_digits(m, cache_dir or "outputs/cache", show_progress)
        return {"unet": unet, "scheduler": sched}, "digits UNet pretrained locally (" + ("cached" if hit else "new") + ")"
    if m.get("tiny") is not None and not m.get("path"):
        return _tiny_components(m), "tiny (random weights built from model.tiny)"
    root = locate_weights(str(m.name), m.get("hub_id"), m.get("path"), str(m.family), m.get("revision"))
    dtype = DTYPES[str(m.precision)] if str(m.finetune) == "lora" else torch.float32
    return _load_components(m, root, dtype), str(root)


def save_pipeline(m, comps: dict, out_dir: str | Path) -> Path:
    """Write components as a diffusers pipeline folder (what ``model.path`` accepts)."""
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

    out_dir = Path(out_dir)
    sc = {k: v for k, v in comps["scheduler"].items() if not k.startswith("_")}
    if str(m.family) == "text2img":
        pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                       tokenizer=comps["tokenizer"], unet=comps["unet"],
                                       scheduler=DDIMScheduler(**sc), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = DDPMPipeline(unet=comps["unet"], scheduler=DDPMScheduler(**sc))
    pipe.save_pretrained(out_dir)
    return out_dir


# -- images ------------------------------------------------------------------------------------------
def load_images(paths, size: int) -> torch.Tensor:
    """Image files as a float tensor (N, 3, size, size) in [0, 1] (center crop, bicubic resize)."""
    from PIL import Image

    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def image_files(folder) -> list[Path]:
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    return sorted(p for p in Path(str(folder)).rglob("*") if p.suffix.lower() in exts)


def save_grid(path: Path, rows: list[tuple[str, torch.Tensor]], title: str = ""):
    """A PNG grid: one labelled row per (name, images (N, 3, H, W) in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(x) for _, x in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol + 1.5, 1.7 * len(rows) + 0.5), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        axes[r][0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ImageFamily:
    """Everything a run needs from an image model, built from ``cfg.model``."""

    def __init__(self, cfg: DictConfig, show_progress: bool = True):
        m = cfg.model
        validate_image_config(m)
        self.cfg, self.m, self.show = cfg, m, show_progress
        self.family = str(m.family)
        self.device = _device(m)
        self.dtype = DTYPES[str(m.precision)]
        comps, self.source = components(m, str(cfg.paths.cache_dir), show_progress)
        self.comps = comps
        unet = comps["unet"]
        self.schedule = schedule_from_scheduler_config(comps["scheduler"])
        pred = str(comps["scheduler"].get("prediction_type", "epsilon"))
        size = int(unet.config.sample_size)
        shape = (int(unet.config.in_channels), size, size)
        cond_kind = "text" if self.family == "text2img" else ("class" if unet.config.get("num_class_embeds") else "none")
        self.lora_config = None
        if str(m.finetune) == "lora":
            self.place(unet)
            lc = m.lora
            self.lora_config = add_lora(unet, lc.rank, lc.alpha, OmegaConf.to_container(lc.target_modules)
                                        if OmegaConf.is_config(lc.target_modules) else str(lc.target_modules),
                                        float(lc.get("dropout", 0.0)), seed=int(cfg.seed))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            pre_unet = None
        else:
            unet.to(self.device, torch.float32)
            pre_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            unet.requires_grad_(True)
        if bool(m.gradient_checkpointing) and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        unet.train(bool(m.gradient_checkpointing))  # checkpointing is only active in training mode
        kw = dict(conditioning=cond_kind, prediction_type=pred, precision=str(m.precision), max_batch=int(m.max_batch))
        self.base = DiffusersScore(unet, self.schedule, shape, **kw)
        self.pre_base = DiffusersScore(pre_unet, self.schedule, shape, **kw) if pre_unet is not None else self.base
        self.adapters_off = pre_unet is None  # LoRA: the pretrained model is the base with adapters off
        self.vae = comps.get("vae")
        if self.vae is not None:
            self.place(self.vae).requires_grad_(False).eval()
            self.latent_scale = float(self.vae.config.get("scaling_factor", 0.18215))
            self.image_size = size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        else:
            self.image_size = size
        self.sampler = build_sampler(self.schedule, m.sampler)

    def place(self, module):
        """Onto the run's device, in ``model.precision`` (cast only when not fp32: diffusers warns on any cast)."""
        module.to(self.device)
        return module.to(self.dtype) if self.dtype != torch.float32 else module

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok, te = self.comps["tokenizer"], self.comps["text_encoder"]
        self.place(te).requires_grad_(False).eval()
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return te(ids)[0].to(self.dtype)

    def view(self, cond, trained: bool, name: str):
        base = self.base if trained else self.pre_base
        return ConditionedView(base, cond, adapters=trained or not self.adapters_off, name=name)

    # -- the family's own data and evaluation network (the digits testbed) --------------------------------
    def dataset(self) -> torch.Tensor | None:
        """Training images of a locally trained family (model space), or None."""
        if self.m.get("dataset") == "digits":
            from .digits import load_digits_splits

            return load_digits_splits()["diffusion"][0]
        return None

    def eval_net(self):
        if self.m.get("dataset") != "digits":
            return None
        if getattr(self, "_eval_net", None) is None:
            from .digits_eval import train_eval_net

            e = self.m.get("eval_net") or {}
            self._eval_net, self.eval_accuracy = train_eval_net(self.cfg.paths.cache_dir, int(e.get("steps", 1500)),
                                                                int(e.get("seed", 0)))
        return self._eval_net

    def metric_models(self) -> dict:
        net = self.eval_net()
        if net is None:
            return {}
        from .digits_eval import metric_models

        return metric_models(net, self.eval_accuracy)

    def family_metrics(self, samples: torch.Tensor, formulation=None, multipliers=None) -> dict:
        net = self.eval_net()
        if net is None:
            return {}
        from .digits_eval import class_shares

        return class_shares(net, self.to_images(samples), [int(i) for i in self.m.classes.unlearn],
                            self.eval_accuracy)

    # -- pixels <-> model space ----------------------------------------------------------------------
    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Model samples -> images (N, 3, H, W) in [0, 1] on the CPU (grey images repeated to RGB)."""
        if self.vae is None:
            x = ((x0.float().cpu() + 1) / 2).clamp(0, 1)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out = []
        for s in range(0, len(x0), int(self.m.max_batch)):
            z = x0[s:s + int(self.m.max_batch)].to(self.device, self.dtype) / self.latent_scale
            out.append(self.vae.decode(z).sample.float().cpu())
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model samples (VAE latent mean for latent models), on the CPU."""
        x = images.float() * 2 - 1
        if self.vae is None:
            return x.mean(1, keepdim=True) if self.base.sample_shape[0] == 1 and x.shape[1] != 1 else x
        out = []
        for s in range(0, len(x), int(self.m.max_batch)):
            xs = x[s:s + int(self.m.max_batch)].to(self.device, self.dtype)
            out.append((self.vae.encode(xs).latent_dist.mean * self.latent_scale).float().cpu())
        return torch.cat(out)


def _forget_sets(fam: ImageFamily, cfg, concept_views, gen) -> list[torch.Tensor]:
    m = fam.m
    idx = list(m.get("forget_indices") or [])
    if idx:  # specific training images, each its own forget set
        x = fam.dataset()[idx]
        return [x[i:i + 1] for i in range(len(x))]
    files = list(m.get("forget_images") or [])
    if files:
        imgs = load_images(files, fam.image_size)
        x = fam.from_images(imgs)
        per = str(m.get("forget_grouping", "per_image"))
        return [x[i:i + 1] for i in range(len(x))] if per == "per_image" else [x]
    n = int(m.get("forget_generated", 0))
    if n <= 0:
        raise ConfigError(f"model {m.name}: formulation=fu needs model.forget_images (image files) or "
                          f"model.forget_generated > 0 (samples of the concept prompts)")
    if concept_views:  # text: samples of each unlearn prompt
        return [fam.sampler.sample(v, n, gen).x0.detach().cpu() for v in concept_views]
    pre = fam.view(None, trained=False, name="pretrained")
    x = fam.sampler.sample(pre, n, gen).x0.detach().cpu()
    return [x[i:i + 1] for i in range(n)]


def _finetuned_concept(fam: ImageFamily, x: torch.Tensor, idx: int, cfg) -> DiffusersScore:
    """``q_i`` of an unconditional model: a copy of the pretrained UNet fine-tuned on forget set ``i``."""
    c = fam.m.concepts
    key = {"source": fam.source if not fam.m.get("tiny") else OmegaConf.to_container(fam.m.tiny),
           "data": hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16], "steps": int(c.steps), "lr": float(c.lr),
           "batch": int(c.batch_size), "seed": int(c.seed) + idx}
    path = Path(str(cfg.paths.cache_dir)) / f"concept_{fam.m.name}_{config_hash(key)}.pt"
    unet = copy.deepcopy(fam.pre_base.unet)
    unet = unet.float().requires_grad_(False)
    net = DiffusersScore(unet, fam.schedule, fam.base.sample_shape, conditioning="none",
                         prediction_type=fam.base.prediction_type, precision="fp32", max_batch=fam.base.max_batch)
    params = [p for n_, p in unet.named_parameters() if "lora_" not in n_]
    if path.exists():
        try:
            unet.load_state_dict(torch.load(path, map_location=fam.device, weights_only=True), strict=False)
            return net
        except Exception as exc:
            log.warning("concept cache %s unreadable (%s); retraining", path, exc)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    fit_denoiser(net, params, lambda g_: (x[torch.randint(0, len(x), (int(c.batch_size),), generator=g_)], None),
                 int(c.steps), float(c.lr), generator(int(c.seed) + idx), f"fine-tune q_{idx} on its forget set",
                 fam.show, weight_decay=0.01, warmup_cosine=False)  # AdamW's default weight decay, as before
    unet.eval().requires_grad_(False)
    atomic_torch_save({k: v for k, v in unet.state_dict().items() if "lora_" not in k}, path)
    return net


def build_image_setup(cfg: DictConfig, show_progress: bool = True) -> UnlearningSetup:
    fam = ImageFamily(cfg, show_progress)
    m = fam.m
    form = str(cfg.formulation.name)
    gen = generator(int(cfg.seed) + 12345)
    info = {"weights": fam.source, "family": fam.family, "finetune": str(m.finetune), "precision": str(m.precision),
            "device": str(fam.device), "trainable_parameters": sum(p.numel() for p in fam.base.parameters()
                                                                   if p.requires_grad)}
    likelihood_concepts, likelihood_reference = None, None
    reference_images = None  # real retain images for KID (metrics.retain.source=data): families with their own data
    if fam.family == "text2img":
        P = OmegaConf.to_container(m.prompts, resolve=True)
        e_ret, e_null = fam.encode_prompts(P["retain"]), fam.encode_prompts([""])
        e_unl = [fam.encode_prompts([p]) for p in P["unlearn"]]
        g = float(m.guidance_scale)
        model = fam.view(Guidance(e_ret, e_null, g), trained=True, name="model")
        pretrained = fam.view(Guidance(e_ret, e_null, g), trained=False, name="pretrained")
        concepts = [fam.view(Guidance(e, e_null, g), trained=False, name=p) for e, p in zip(e_unl, P["unlearn"])]
        likelihood_concepts = [fam.view(e, trained=False, name=p) for e, p in zip(e_unl, P["unlearn"])]
        likelihood_reference = fam.view(e_null, trained=False, name="unconditional")
        names = list(P["unlearn"])
        forget_sets = _forget_sets(fam, cfg, concepts, gen) if form == "fu" else []
        prompt_rows = [(p, Guidance(e, e_null, g)) for e, p in zip(e_unl, P["unlearn"])]
        info["prompts"] = P
        info["guidance_scale"] = g
    elif fam.family == "classcond":
        C = m.classes
        null = torch.tensor([int(m.num_classes)])  # the classifier-free guidance null label
        ret = torch.tensor(list(C.retain)) if C.get("retain") is not None else null
        unl = [int(i) for i in C.unlearn]
        g = float(m.guidance_scale)
        names = [f"{m.class_prefix}{i}" for i in unl]
        model = fam.view(Guidance(ret, null, g), trained=True, name="model")
        pretrained = fam.view(Guidance(ret, null, g), trained=False, name="pretrained")
        concepts = [fam.view(Guidance(torch.tensor([i]), null, g), trained=False, name=n) for i, n in zip(unl, names)]
        likelihood_concepts = [fam.view(torch.tensor([i]), trained=False, name=n) for i, n in zip(unl, names)]
        likelihood_reference = fam.view(null, trained=False, name="unconditional")
        forget_sets = _forget_sets(fam, cfg, concepts, gen) if form == "fu" else []
        reference_images = _real_retain_images(fam, m, [] if form == "fu" else unl)
        if form == "fu" and m.get("forget_indices"):  # data unlearning: each training image its own constraint
            names = [f"train image {i}" for i in m.forget_indices]
        prompt_rows = [(n, Guidance(torch.tensor([i]), null, g)) for i, n in zip(unl, [f"{m.class_prefix}{i}" for i in unl])]
        P = {"retain": [("unconditional" if C.get("retain") is None else f"classes {list(C.retain)}")],
             "unlearn": [f"{m.class_prefix}{i}" for i in unl]}
        info["classes"] = OmegaConf.to_container(C)
    else:
        model = fam.view(None, trained=True, name="model")
        pretrained = fam.view(None, trained=False, name="pretrained")
        forget_sets = _forget_sets(fam, cfg, [], gen)
        names = [f"forget set {i}" for i in range(len(forget_sets))]
        concepts = []
        if form in ("lu", "ru"):
            concepts = [_finetuned_concept(fam, x, i, cfg) for i, x in enumerate(forget_sets)]
        prompt_rows = []
    retain_sampler = None
    data = fam.dataset()
    if data is not None and str(cfg.formulation.get("retain", "auto")) in ("data", "auto"):
        retain_x = data[_not_forgotten(len(data), m)]  # the retain data never contain the forget images

        def retain_sampler(n, g):
            return retain_x[torch.randint(0, len(retain_x), (n,), generator=g)]
    folder = m.get("retain_folder")
    retain_mode = str(cfg.formulation.get("retain", "auto"))
    if retain_mode == "data" and not folder:
        raise ConfigError(f"formulation.retain=data needs model.retain_folder (an image folder) for model {m.name}; "
                          f"accepted: formulation.retain=model or auto (pretrained samples)")
    if folder and retain_mode in ("data", "auto"):
        files = image_files(folder)
        if not files:
            raise ConfigError(f"model.retain_folder={folder!r} holds no images (.png/.jpg/.jpeg/.webp/.bmp)")
        retain_x = fam.from_images(load_images(files, fam.image_size))

        def retain_sampler(n, g):
            return retain_x[torch.randint(0, len(retain_x), (n,), generator=g)]

    def save_samples(path: Path, samples: torch.Tensor):
        imgs = fam.to_images(samples)
        np.save(path, (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))

    def plot(path: Path, pre_samples, samples, formulation, multipliers, title: str = ""):
        k = min(8, len(samples))
        rows = [("pretrained" + (f": {P['retain'][0]!r}" if prompt_rows else ""), fam.to_images(pre_samples[:k])),
                ("unlearned" + (f": {P['retain'][0]!r}" if prompt_rows else ""), fam.to_images(samples[:k]))]
        trained = str(cfg.formulation.name) != "ru" or bool(cfg.formulation.get("distill_steps", 0))
        for p, cond in prompt_rows:  # each unlearn prompt, before / after (same noise)
            pre = fam.sampler.sample(fam.view(cond, False, p), k, generator(int(cfg.seed) + 7)).x0
            rows.append((f"pretrained: {p!r}", fam.to_images(pre)))
            if trained:
                post = fam.sampler.sample(fam.view(cond, True, p), k, generator(int(cfg.seed) + 7)).x0
                rows.append((f"unlearned: {p!r}", fam.to_images(post)))
        for i, x in enumerate(forget_sets if form == "fu" else []):
            rows.append((f"forget set {i}", fam.to_images(x[:k])))
        save_grid(path, rows, title)

    def save_model(run_dir: Path):
        save_unlearned(fam, Path(run_dir))

    return UnlearningSetup(
        reference_images=reference_images,
        name=str(m.name), pretrained=pretrained, model=model, concepts=concepts, concept_names=names,
        forget_sets=forget_sets, retain_sampler=retain_sampler, oracle=None, plot=plot,
        save_samples=save_samples, info=info, likelihood_concepts=likelihood_concepts,
        likelihood_reference=likelihood_reference, save_model=save_model, to_images=fam.to_images,
        from_images=fam.from_images, prompts=list(P["unlearn"]) if fam.family != "ddpm" else None,
        metric_models=fam.metric_models(), evaluate=fam.family_metrics)


def _not_forgotten(n: int, m) -> torch.Tensor:
    """Mask over the family's ``n`` training images: False at ``model.forget_indices``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(m.get("forget_indices") or [])] = False
    return keep


def _real_retain_images(fam: ImageFamily, m, unlearn_classes: list[int]):
    """The family's real training images without the forget images and the unlearned classes, as
    ``[0, 1]`` images (KID's reference with ``metrics.retain.source=data``); None without a dataset."""
    if m.get("dataset") != "digits":
        return None

    def images():
        from .digits import load_digits_splits

        x, y = load_digits_splits()["diffusion"]
        keep = _not_forgotten(len(x), m)
        for c in unlearn_classes:
            keep &= y != int(c)
        return fam.to_images(x[keep])
    return images


def save_unlearned(fam: ImageFamily, run_dir: Path) -> list[str]:
    """LoRA in diffusers format (``pipeline.load_lora_weights(run_dir)``) or the full UNet."""
    unet = fam.base.unet
    if fam.lora_config is None:
        unet.save_pretrained(run_dir / "unet")
        return ["unet/"]
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    if fam.family == "text2img":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(run_dir, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                  safe_serialization=True)
        return ["pytorch_lora_weights.safetensors"]
    from safetensors.torch import save_file

    out = run_dir / "unet_lora"
    out.mkdir(parents=True, exist_ok=True)
    fam.lora_config.save_pretrained(out)
    save_file(state, out / "adapter_model.safetensors")
    return ["unet_lora/"]


def load_unet_lora(unet, lora_dir: str | Path):
    """Put a LoRA saved by a ``model=ddpm_*`` run (``run_dir/unet_lora``) into a UNet2DModel."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    inject_adapter_in_model(LoraConfig.from_pretrained(lora_dir), unet)
    set_peft_model_state_dict(unet, load_file(lora_dir / "adapter_model.safetensors"))
    return unet
