"""The image families on diffusers UNets: what they share (components, LoRA, conditioned views of
one UNet, images in and out, forget and retain data, pictures, export). Each family module
(:mod:`.text2img`, :mod:`.ddpm`, :mod:`.classcond`, :mod:`.digits`) subclasses
:class:`DiffusersFamily` with its component classes, its conditioning and its roles.

What is trained: LoRA adapters (peft) on the layers ``model.lora.target_modules`` selects with the
base frozen, or the whole UNet (``model.finetune=full``). With LoRA the pretrained model is the
same UNet with the adapters switched off, so it costs no second copy.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, as_number, positive
from ..imageio import IMAGE_SUFFIXES, has_images, load_images, open_image, save_grid
from ..models.diffusers_models import (DTYPES, ConditionedView, DiffusersScore, Guidance, add_lora,
                                       schedule_from_scheduler_config)
from ..models.weights import check_layout, locate_weights
from ..samplers import build_sampler
from ..setup import UnlearningSetup
from ..utils import generator
from .base import Family, family_class

log = logging.getLogger(__name__)
FINETUNES = ("lora", "full")
FORGET_GROUPINGS = ("per_image", "together")


def int_list(value, key: str, what: str) -> list[int]:
    """A list of integers (null: empty), else one :class:`ConfigError` line naming ``key``."""
    if value is None:
        return []
    if not OmegaConf.is_list(value):
        raise ConfigError(f"{key} must be a list of {what} (got {value!r}); write {key}=[{value}]")
    out = list(value)
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ConfigError(f"{key} must be a list of {what}, integers (got {bad[0]!r} in {out})")
    return out


def no_repeats(values: list, key: str) -> None:
    """Each entry is one constraint: a repeated one would be two identical constraints."""
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{key} lists {v!r} twice; accepted: each entry once (each is its own constraint)")
        seen.add(v)


def validate_lora(lc) -> None:
    """``model.lora``: rank and alpha > 0, dropout in [0, 1), target modules a valid regular expression
    (matched in full against the UNet's module names) or a list of module-name suffixes."""
    import re

    if as_number(lc.rank, "model.lora.rank", int, "an integer >= 1") < 1:
        raise ConfigError(f"model.lora.rank must be an integer >= 1 (got {lc.rank})")
    positive(lc.alpha, "model.lora.alpha")
    if not 0 <= as_number(lc.dropout, "model.lora.dropout") < 1:
        raise ConfigError(f"model.lora.dropout must be in [0, 1) (got {lc.dropout})")
    t = lc.target_modules
    if OmegaConf.is_list(t):
        if not len(t) or any(not isinstance(x, str) or not x for x in t):
            raise ConfigError(f"model.lora.target_modules must be a regex or a non-empty list of module-name "
                              f"suffixes (strings; got {list(t)})")
        return
    if not isinstance(t, str) or not t:
        raise ConfigError(f"model.lora.target_modules must be a regex over the UNet's module names or a list of "
                          f"module-name suffixes (got {t!r})")
    try:
        re.compile(t)
    except re.error as exc:
        raise ConfigError(f"model.lora.target_modules={t!r} is not a valid regular expression ({exc}); accepted: "
                          rf"a regex matched in full against module names, e.g. '.*attn2\.(to_q|to_k|to_v)$'") from None


@dataclass
class Roles:
    """The score models a family hands to the formulations (see :class:`~unlearn.setup.UnlearningSetup`)."""

    model: Any
    pretrained: Any
    names: list[str]
    concepts: list = field(default_factory=list)
    forget_sets: list = field(default_factory=list)
    likelihood_reference: Any = None
    rows: list = field(default_factory=list)      # (name, condition): each concept before / after in the picture
    retain_label: str | None = None               # what the model generates, as shown in the picture
    prompts: list[str] | None = None              # the unlearning prompts (CLIP score)
    reference_images: Any = None                  # real retain images for KID (metrics.retain.source=data)
    info: dict = field(default_factory=dict)


class DiffusersFamily(Family):
    """Everything a run needs from a diffusers image model, built from ``cfg.model``."""

    LAYOUT: ClassVar[tuple[str, ...]] = ("unet", "scheduler")  # sub-folders of its diffusers folder
    conditioning: ClassVar[str] = "none"                        # what its UNet takes: none | class | text

    # -- config ---------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, m: DictConfig) -> None:
        if str(m.finetune) not in FINETUNES:
            raise ConfigError(f"model.finetune must be one of {list(FINETUNES)} (got {m.finetune!r})")
        if str(m.precision) not in DTYPES:
            raise ConfigError(f"model.precision must be one of {list(DTYPES)} (got {m.precision!r})")
        if str(m.device) not in ("auto", "cpu", "cuda") and not str(m.device).startswith("cuda:"):
            raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N (got {m.device!r})")
        if as_number(m.max_batch, "model.max_batch", int, "an integer >= 1") < 1:
            raise ConfigError(f"model.max_batch must be >= 1 (got {m.max_batch})")
        if str(m.finetune) == "lora":
            validate_lora(m.lora)
        cls.validate_path(m)
        cls.validate_forget_data(m)
        rf = m.retain_folder
        if rf:
            folder = Path(str(rf)).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"model.retain_folder={str(rf)!r} is not a folder; accepted: a folder of images "
                                  f"({'/'.join(IMAGE_SUFFIXES)}, searched recursively) or null")
            if not has_images(folder):
                raise ConfigError(f"model.retain_folder={str(rf)!r} holds no images; accepted: a folder of images "
                                  f"({'/'.join(IMAGE_SUFFIXES)}, searched recursively) or null")

    @classmethod
    def validate_path(cls, m) -> None:
        """``model.path``: an existing folder in the family's diffusers layout (its weights load later)."""
        if not m.path:
            return
        root = Path(str(m.path)).expanduser()
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise ConfigError(f"model.path={str(root)!r} {what}; accepted: a folder written by "
                              f"DiffusionPipeline.save_pretrained (with {', '.join(d + '/' for d in cls.LAYOUT)})")
        check_layout(root, cls.LAYOUT)

    @classmethod
    def dataset_size(cls, m) -> int | None:
        """How many training images the family has of its own (``model.forget_indices`` index them);
        None: none (a model from the hub brings no data)."""
        return None

    @classmethod
    def validate_forget_data(cls, m) -> None:
        """``model.forget_indices``, ``model.forget_images`` (every file opened and checked),
        ``model.forget_generated`` and ``model.forget_grouping``."""
        idx = int_list(m.forget_indices, "model.forget_indices", "indices of training images")
        if idx:
            n = cls.dataset_size(m)
            if n is None:
                raise ConfigError(f"model.forget_indices needs a model with its own training data (model {m.name} "
                                  f"has none); accepted: model.forget_images (image files)")
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ConfigError(f"model.forget_indices must list training images in 0..{n - 1} (got {bad})")
            no_repeats(idx, "model.forget_indices")
        files = m.forget_images
        if files is not None and not OmegaConf.is_list(files):
            raise ConfigError(f"model.forget_images must be a list of image files (got {files!r}); "
                              f"write model.forget_images=[{files}]")
        for i, f in enumerate(files or []):
            open_image(f, f"model.forget_images[{i}]")
        no_repeats([str(Path(str(f)).expanduser().resolve()) for f in files or []], "model.forget_images")
        if as_number(m.forget_generated, "model.forget_generated", int, "an integer >= 0") < 0:
            raise ConfigError(f"model.forget_generated must be >= 0 (got {m.forget_generated})")
        if str(m.forget_grouping) not in FORGET_GROUPINGS:
            raise ConfigError(f"model.forget_grouping must be one of {list(FORGET_GROUPINGS)} "
                              f"(got {m.forget_grouping!r})")

    def needs_forget_data(self) -> bool:
        """Whether this run builds forget sets (the formulation needs them; some families always do)."""
        return "forget_sets" in self.needs

    def forget_data_missing(self) -> str | None:
        """The error line when forget sets are needed but nothing gives them, else None."""
        m = self.m
        if not self.needs_forget_data() or list(m.forget_indices or []) or list(m.forget_images or []) \
                or int(m.forget_generated) > 0:
            return None
        indices = ", model.forget_indices (training images)" if self.dataset_size(m) is not None else ""
        return (f"model {m.name}: formulation={self.cfg.formulation.name} needs forget data but model.forget_images "
                f"is empty and model.forget_generated=0; accepted: model.forget_images=[a.png, ...] (image files)"
                f"{indices} or model.forget_generated > 0 (generated samples: of each concept, or of the pretrained model)")

    # -- components -----------------------------------------------------------------------------------
    @classmethod
    def tiny_components(cls, t: dict) -> dict:
        """Random-weight models of the real classes from ``model.tiny`` (no download)."""
        from diffusers import UNet2DModel

        return {"unet": UNet2DModel(**t["unet"])}

    @classmethod
    def load_components(cls, root: Path, dtype) -> dict:
        from diffusers import UNet2DModel

        return {"unet": UNet2DModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype)}

    @classmethod
    def pipeline(cls, comps: dict, scheduler: dict):
        """The diffusers pipeline of these components (what ``model.path`` accepts once saved)."""
        from diffusers import DDPMPipeline, DDPMScheduler

        return DDPMPipeline(unet=comps["unet"], scheduler=DDPMScheduler(**scheduler))

    @classmethod
    def components(cls, m, cache_dir=None, show_progress: bool = False) -> tuple[dict, str]:
        """The model's components and where they came from (``model.tiny`` or the weights folder)."""
        if m.tiny is not None and not m.path:
            t = OmegaConf.to_container(m.tiny, resolve=True)
            torch.manual_seed(int(m.tiny.seed))
            return {**cls.tiny_components(t), "scheduler": dict(t["scheduler"])}, \
                "tiny (random weights built from model.tiny)"
        root = locate_weights(str(m.name), m.hub_id, m.path, cls.LAYOUT, m.revision)
        dtype = DTYPES[str(m.precision)] if str(m.finetune) == "lora" else torch.float32
        try:
            sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            return {**cls.load_components(root, dtype), "scheduler": sched}, str(root)
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:  # missing or corrupt weights, bad configs
            key = "model.path" if m.path else f"the cached copy of {m.hub_id}"
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{key}={str(root)!r} cannot be loaded ({type(exc).__name__}: {reason}); accepted: a "
                              f"folder written by DiffusionPipeline.save_pretrained") from None

    @classmethod
    def pipeline_components(cls, pipe) -> tuple[dict, str]:
        """The components of a diffusers pipeline object the caller already holds (:func:`using_pipeline`):
        the UNet copied, so that the run's adapters go onto the copy and the caller's pipeline stays as it
        was (it then loads the run's LoRA file like any other); the frozen parts shared."""
        names = [k for k in cls.LAYOUT if k != "scheduler"]
        missing = [k for k in names + ["scheduler"] if getattr(pipe, k, None) is None]
        if missing:
            raise ConfigError(f"pipeline: a {type(pipe).__name__} without {', '.join(missing)}; accepted for model "
                              f"family {cls.name}: a diffusers pipeline with {', '.join(cls.LAYOUT)}")
        comps = {k: getattr(pipe, k) for k in names}
        comps["unet"] = copy.deepcopy(comps["unet"])
        return {**comps, "scheduler": dict(pipe.scheduler.config)}, f"pipeline object ({type(pipe).__name__})"

    # -- building -------------------------------------------------------------------------------------
    def __init__(self, cfg: DictConfig, needs: frozenset = frozenset(), show_progress: bool = True):
        super().__init__(cfg, needs, show_progress)
        m = self.m
        missing = self.forget_data_missing()
        if missing:  # before any weights are loaded
            raise ConfigError(missing)
        self.device = _device(m)
        self.dtype = DTYPES[str(m.precision)]
        given = _PIPELINE.get()
        self.comps, self.source = self.pipeline_components(given) if given is not None else \
            self.components(m, str(cfg.paths.cache_dir), show_progress)
        unet = self.comps["unet"]
        self.schedule = schedule_from_scheduler_config(self.comps["scheduler"])
        size = int(unet.config.sample_size)
        self.lora_config = None
        if str(m.finetune) == "lora":
            self.place(unet)
            lc = m.lora
            targets = OmegaConf.to_container(lc.target_modules) if OmegaConf.is_config(lc.target_modules) \
                else str(lc.target_modules)
            self.lora_config = add_lora(unet, lc.rank, lc.alpha, targets, float(lc.dropout),
                                        seed=int(cfg.seed))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            pre_unet = None
        else:
            unet.to(self.device)  # in fp32 already (built so, or loaded so); diffusers warns on a dtype cast
            if any(p.dtype != torch.float32 for p in unet.parameters()):
                unet.to(torch.float32)
            pre_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            unet.requires_grad_(True)
        if bool(m.gradient_checkpointing) and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        unet.train(bool(m.gradient_checkpointing))  # checkpointing is only active in training mode
        for u in (unet, pre_unet) if pre_unet is not None else (unet,):
            if bool(m.channels_last):
                u.to(memory_format=torch.channels_last)
            if bool(m.compile):
                u.compile()  # in place: the module (and its peft adapters' switches) stays the same object
        kw = dict(conditioning=self.unet_conditioning(unet),
                  prediction_type=str(self.comps["scheduler"].get("prediction_type", "epsilon")),
                  precision=str(m.precision), max_batch=int(m.max_batch), batch_roles=bool(m.batch_roles))
        shape = (int(unet.config.in_channels), size, size)
        self.base = DiffusersScore(unet, self.schedule, shape, **kw)
        self.pre_base = DiffusersScore(pre_unet, self.schedule, shape, **kw) if pre_unet is not None else self.base
        self.adapters_off = pre_unet is None  # LoRA: the pretrained model is the base with adapters off
        self.vae = self.comps.get("vae")
        if self.vae is not None:
            self.place(self.vae).requires_grad_(False).eval()
            self.latent_scale = float(self.vae.config.get("scaling_factor", 0.18215))
            self.image_size = size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        else:
            self.image_size = size
        self.sampler = build_sampler(self.schedule, m.sampler)

    def unet_conditioning(self, unet) -> str:
        return self.conditioning

    def place(self, module):
        """Onto the run's device, in ``model.precision`` (cast only when not fp32: diffusers warns on any cast)."""
        module.to(self.device)
        return module.to(self.dtype) if self.dtype != torch.float32 else module

    def concept_condition(self, cond, null):
        """The condition of a concept model ``q_i``: ``formulation.concept_guidance`` is ``sampling`` (the
        sampling roles' ``model.guidance_scale``) or a scale; 1 is the plain conditional model. Every use
        of ``q_i`` in a run (constraints, importance weights, metrics, forget samples) takes this one."""
        v = self.cfg.formulation.concept_guidance
        scale = float(self.m.guidance_scale) if str(v) == "sampling" else float(v)
        return cond if scale == 1.0 else Guidance(cond, null, scale)

    def view(self, cond, trained: bool, name: str):
        """The shared UNet under one condition: the trainable model (adapters on) or the pretrained one."""
        base = self.base if trained else self.pre_base
        return ConditionedView(base, cond, adapters=trained or not self.adapters_off, name=name)

    def roles(self, gen: torch.Generator) -> Roles:
        """The family's model, pretrained model, concepts and forget sets (``gen``: their samples)."""
        raise NotImplementedError

    def setup(self) -> UnlearningSetup:
        m, cfg = self.m, self.cfg
        gen = generator(int(cfg.seed) + 12345)
        info = {"weights": self.source, "family": self.name, "finetune": str(m.finetune),
                "precision": str(m.precision), "device": str(self.device),
                "trainable_parameters": sum(p.numel() for p in self.base.parameters() if p.requires_grad)}
        r = self.roles(gen)
        info.update(r.info)
        if self.retain_folder is not None:
            info["retain_folder"] = self.retain_folder.info()
        return UnlearningSetup(
            reference_images=r.reference_images or self.folder_reference(), name=str(m.name), pretrained=r.pretrained, model=r.model,
            concepts=r.concepts, concept_names=r.names, forget_sets=r.forget_sets,
            retain_sampler=self.retain_sampler(), oracle=None, plot=self._plotter(r), save_samples=self.save_samples,
            info=info, likelihood_reference=r.likelihood_reference,
            save_model=lambda run_dir: self.save_unlearned(Path(run_dir)), to_images=self.to_images,
            from_images=self.from_images, prompts=r.prompts, metric_models=self.metric_models(),
            evaluate=self.family_metrics, concept_judge=self.concept_judge(), concept_data=self.concept_data(),
            soft_condition=self.soft_condition(r))

    # -- data -----------------------------------------------------------------------------------------
    def dataset(self) -> torch.Tensor | None:
        """Training images of a family with its own data (model space), or None."""
        return None

    def forget_sets(self, concept_views: list, gen: torch.Generator) -> list[torch.Tensor]:
        """Training images (``model.forget_indices``), image files, or samples of each concept view
        (of the pretrained model without concepts), each its own forget set."""
        m = self.m
        idx = list(m.forget_indices or [])  # checked by validate_forget_data: in range, each once
        if idx:  # specific training images, each its own forget set
            x = self.dataset()[idx]
            return [x[i:i + 1] for i in range(len(x))]
        files = list(m.forget_images or [])
        if files:
            x = self.from_images(load_images(files, self.image_size, "model.forget_images"))
            per = str(m.forget_grouping)
            return [x[i:i + 1] for i in range(len(x))] if per == "per_image" else [x]
        n = int(m.forget_generated)
        if n <= 0:
            raise ConfigError(self.forget_data_missing() or f"model.forget_generated must be > 0 (got {n})")
        if concept_views:  # samples of each concept
            return [self.sampler.sample(v, n, gen).x0.detach().cpu() for v in concept_views]
        pre = self.view(None, trained=False, name="pretrained")
        x = self.sampler.sample(pre, n, gen).x0.detach().cpu()
        return [x[i:i + 1] for i in range(n)]

    def not_forgotten(self, n: int) -> torch.Tensor:
        """Mask over the family's ``n`` training images: False at ``model.forget_indices``."""
        keep = torch.ones(n, dtype=torch.bool)
        keep[list(self.m.forget_indices or [])] = False
        return keep

    def retain_sampler(self):
        """Retain data: ``model.retain_folder``, else the family's training images without the forget
        images, else None (the formulation then uses pretrained samples; FU's ``formulation.retain``
        decides which it takes)."""
        m = self.m
        retain_x = None
        data = self.dataset()
        if data is not None:
            retain_x = data[self.not_forgotten(len(data))]  # the retain data never contain the forget images
        if self.retain_folder is not None:  # streamed from disk, the forget images left out
            return self.retain_folder
        if retain_x is None:
            return None
        return lambda n, g: retain_x[torch.randint(0, len(retain_x), (n,), generator=g)]

    @property
    def retain_folder(self):
        """``model.retain_folder`` as a :class:`~unlearn.retain.RetainFolder` (None without one)."""
        if "_retain_folder" not in self.__dict__:
            from ..retain import RetainFolder

            folder = self.m.retain_folder  # checked by validate: a folder holding images
            self._retain_folder = (RetainFolder(folder, self.image_size, self.from_images, list(self.m.forget_images))
                                   if folder else None)
            if self._retain_folder is not None and not len(self._retain_folder):
                raise ConfigError(f"model.retain_folder={str(folder)!r} holds only forget images "
                                  f"({len(self._retain_folder.excluded)}); accepted: a folder with other images too")
        return self._retain_folder

    def folder_reference(self):
        """KID's real-data reference from the retain folder (``metrics.retain.source=data``), or None."""
        folder = self.retain_folder
        if folder is None:
            return None
        mc = self.cfg.metrics
        return lambda: folder.reference(int(mc.retain.num_candidates), int(mc.seed) + 17)

    # -- the family's own evaluation (families with a classifier, e.g. the digits testbed) -------------
    def metric_models(self) -> dict:
        return {}

    def family_metrics(self, samples: torch.Tensor, formulation=None, multipliers=None, model=None) -> dict:
        return {}

    # -- what the attacks need (unlearn.attacks); None: this family cannot give it -----------------------
    def concept_judge(self):
        """The family's independent judge of the unlearned concepts (:class:`~unlearn.setup.ConceptJudge`)."""
        return None

    def concept_data(self):
        """``(k, generator) -> k real samples of the unlearned concepts`` in model space, or None."""
        return None

    def soft_condition(self, roles: Roles):
        """``() -> SoftCondition``: a trainable condition starting at the retain condition, or None."""
        return None

    # -- pixels <-> model space -----------------------------------------------------------------------
    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Model samples -> images (N, 3, H, W) in [0, 1] on the CPU (grey images repeated to RGB)."""
        return self.decode(x0.detach()).cpu()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`to_images` on the samples' device, differentiable in ``x0`` (the VAE decoder for latents)."""
        if self.vae is None:
            x = ((x0.float() + 1) / 2).clamp(0, 1)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out, b = [], int(self.m.max_batch)
        for s in range(0, len(x0), b):
            z = x0[s:s + b].to(self.device, self.dtype) / self.latent_scale
            out.append(self.vae.decode(z).sample.float().to(x0.device))
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model samples (VAE latent mean for latent models), on the CPU."""
        x = images.float() * 2 - 1
        if self.vae is None:
            return x.mean(1, keepdim=True) if self.base.sample_shape[0] == 1 and x.shape[1] != 1 else x
        out, b = [], int(self.m.max_batch)
        for s in range(0, len(x), b):
            xs = x[s:s + b].to(self.device, self.dtype)
            out.append((self.vae.encode(xs).latent_dist.mean * self.latent_scale).float().cpu())
        return torch.cat(out)

    # -- outputs --------------------------------------------------------------------------------------
    def save_samples(self, path: Path, samples: torch.Tensor):
        imgs = self.to_images(samples)
        np.save(path, (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))

    def _plotter(self, r: Roles):
        def plot(path: Path, pre_samples, samples, formulation, multipliers, title: str = "", trained: bool = True):
            k = min(8, len(samples))
            label = f": {r.retain_label!r}" if r.retain_label else ""
            rows = [("pretrained" + label, self.to_images(pre_samples[:k])),
                    ("unlearned" + label, self.to_images(samples[:k]))]
            for p, cond in r.rows:  # each concept, before / after (same noise)
                pre = self.sampler.sample(self.view(cond, False, p), k, generator(int(self.cfg.seed) + 7)).x0
                rows.append((f"pretrained: {p!r}", self.to_images(pre)))
                if trained:
                    post = self.sampler.sample(self.view(cond, True, p), k, generator(int(self.cfg.seed) + 7)).x0
                    rows.append((f"unlearned: {p!r}", self.to_images(post)))
            for i, x in enumerate(r.forget_sets if "forget_sets" in self.needs else []):
                rows.append((f"forget set {i}", self.to_images(x[:k])))
            save_grid(path, rows, title)
        return plot

    def save_unlearned(self, run_dir: Path) -> list[str]:
        """The full UNet (``unet/``), or the LoRA adapters in the family's format (:meth:`export_lora`)."""
        unet = self.base.unet
        if self.lora_config is None:
            unet.save_pretrained(run_dir / "unet")
            return ["unet/"]
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        return self.export_lora(state, run_dir)

    def export_lora(self, state: dict, run_dir: Path) -> list[str]:
        """peft's layout in ``run_dir/unet_lora`` (load with :func:`unlearn.families.ddpm.load_unet_lora`)."""
        from safetensors.torch import save_file

        out = run_dir / "unet_lora"
        out.mkdir(parents=True, exist_ok=True)
        self.lora_config.save_pretrained(out)
        save_file(state, out / "adapter_model.safetensors")
        return ["unet_lora/"]


def _device(m) -> torch.device:
    d = str(m.device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={d} but no CUDA device is available; accepted here: auto, cpu")
    return torch.device(d)


_PIPELINE: contextvars.ContextVar = contextvars.ContextVar("unlearn_pipeline", default=None)


@contextlib.contextmanager
def using_pipeline(pipe):
    """Runs built inside take their components from ``pipe`` (a diffusers pipeline object) instead of
    ``model.path``, the hub or the cache (``unlearn.run(..., pipeline=pipe)``)."""
    token = _PIPELINE.set(pipe)
    try:
        yield
    finally:
        _PIPELINE.reset(token)


def components(m, cache_dir=None, show_progress: bool = False) -> tuple[dict, str]:
    """The components of the image model ``m`` (a ``cfg.model``) and where they came from."""
    return family_class(m.family).components(m, cache_dir, show_progress)


def save_pipeline(m, comps: dict, out_dir: str | Path) -> Path:
    """Write components as a diffusers pipeline folder (what ``model.path`` accepts)."""
    out_dir = Path(out_dir)
    sc = {k: v for k, v in comps["scheduler"].items() if not k.startswith("_")}
    family_class(m.family).pipeline(comps, sc).save_pretrained(out_dir)
    return out_dir
