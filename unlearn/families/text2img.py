"""Text-to-image latent diffusion: Stable Diffusion v1.4, BK-SDM-tiny and the offline double
``tiny_sd`` (UNet2DConditionModel + AutoencoderKL + CLIPTextModel/CLIPTokenizer).

Prompts come from ``model.prompts`` (``retain``: what the model generates and must stay close to;
``unlearn``: one concept ``q_i`` per prompt), encoded once. Sampling roles use classifier-free
guidance (``model.guidance_scale``). A concept ``q_i`` is its prompt's model at
``formulation.concept_guidance`` (RU, FU: the sampling guidance; LU: 1, the plain conditional model,
whose ratio to the unconditional model is Lemma 2's likelihood), the same in every use of a run. The trained LoRA is written
in diffusers' format: ``pipeline.load_lora_weights(run_dir)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..config import ConfigError, as_number
from ..models.diffusers_models import AnchoredTable, Guidance, PromptTable
from .base import register_family
from .diffusers_family import DiffusersFamily, Roles, no_repeats

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROMPT_LISTS = {"retain": "what the model generates and must keep", "unlearn": "one concept q_i per prompt"}


def retain_weights(p, key: str) -> None:
    """``<key>.retain_weights``: null, or one positive number per retain entry."""
    w = p.retain_weights
    if w is None:
        return
    n = len(p.retain) if p.retain is not None else 0
    if not OmegaConf.is_list(w) or len(w) != n or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                      or not v > 0 for v in w):
        raise ConfigError(f"{key}.retain_weights={OmegaConf.to_container(w) if OmegaConf.is_list(w) else w!r} is not "
                          f"a weight per retain entry; accepted: null (equal weights) or {n} positive numbers")


def retain_anchors(p, key: str) -> None:
    """``<key>.anchors``: a mapping from retain prompts to prompts (each retain prompt's pretrained reference)."""
    a = p.anchors
    if a is None or (OmegaConf.is_dict(a) and not len(a)):
        return
    retain = list(p.retain) if OmegaConf.is_list(p.retain) else []
    if not OmegaConf.is_dict(a) or any(k not in retain or not isinstance(v, str) or not v.strip() for k, v in a.items()):
        raise ConfigError(f"{key}.anchors={OmegaConf.to_container(a) if OmegaConf.is_dict(a) else a!r} is not a "
                          f"mapping of retain prompts to prompts; accepted: null or {{retain prompt: anchor prompt}} "
                          f"with keys among {key}.retain")


@register_family("text2img")
class TextToImage(DiffusersFamily):
    LAYOUT = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    conditioning = "text"
    double = "tiny_sd"

    @classmethod
    def validate(cls, m) -> None:
        super().validate(m)
        p = m.prompts
        if not OmegaConf.is_dict(p) or "retain" not in p or "unlearn" not in p:
            raise ConfigError("model.prompts must set retain (what the model generates) and unlearn (one concept "
                              "per prompt), each a list of prompts")
        for key, what in PROMPT_LISTS.items():
            v = p[key]
            if not OmegaConf.is_list(v):
                raise ConfigError(f"model.prompts.{key} must be a list of prompts (got {v!r}); write "
                                  f"model.prompts.{key}=['...']")
            if not len(v):
                raise ConfigError(f"model.prompts.{key} is empty; accepted: a list of at least one prompt ({what})")
            for i, s in enumerate(v):
                if not isinstance(s, str):
                    raise ConfigError(f"model.prompts.{key}[{i}] must be a string (got {s!r}; a nested list or a "
                                      f"number is not a prompt); accepted: a list of prompts ({what})")
        for i, s in enumerate(p.unlearn):
            if not s.strip():
                raise ConfigError(f"model.prompts.unlearn[{i}] is empty; accepted: a concept's prompt (the empty "
                                  f"prompt is the unconditional model every likelihood is compared with)")
        no_repeats(list(p.unlearn), "model.prompts.unlearn")
        retain_weights(p, "model.prompts")
        retain_anchors(p, "model.prompts")
        if as_number(m.guidance_scale, "model.guidance_scale", float, "a number >= 1") < 1.0:
            raise ConfigError(f"model.guidance_scale must be >= 1 (got {m.guidance_scale})")

    def check_prompt_lengths(self, prompts: dict) -> None:
        """Every prompt fits the text encoder (its tokenizer's ``model_max_length``, 77 for CLIP):
        a longer one is an error, not a silent truncation that would change the concept."""
        tok = self.comps["tokenizer"]
        limit = int(tok.model_max_length)
        for key in PROMPT_LISTS:
            for i, s in enumerate(prompts[key]):
                n = len(tok(s, truncation=False, verbose=False).input_ids)  # with the start and end tokens
                if n > limit:
                    raise ConfigError(f"model.prompts.{key}[{i}] is {n} tokens long ({s[:40]!r}...); accepted: at "
                                      f"most {limit} tokens with the start and end tokens (the text encoder's "
                                      f"context); shorten it, it is not truncated")

    @classmethod
    def concept_count(cls, m) -> int:
        return len(m.prompts.unlearn)

    @classmethod
    def tiny_components(cls, t: dict) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        return {"unet": UNet2DConditionModel(**t["unet"]), "vae": AutoencoderKL(**t["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**t["text_encoder"])),
                "tokenizer": CLIPTokenizer.from_pretrained(str(ASSETS / "tiny_clip_tokenizer"))}

    @classmethod
    def load_components(cls, root: Path, dtype) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return {"unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype),
                "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype),
                "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")}

    @classmethod
    def pipeline(cls, comps: dict, scheduler: dict):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                       tokenizer=comps["tokenizer"], unet=comps["unet"],
                                       scheduler=DDIMScheduler(**scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok, te = self.comps["tokenizer"], self.comps["text_encoder"]
        self.place(te).requires_grad_(False).eval()
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return te(ids)[0].to(self.dtype)

    def roles(self, gen: torch.Generator) -> Roles:
        P = OmegaConf.to_container(self.m.prompts, resolve=True)
        self.check_prompt_lengths(P)
        e_ret, e_null = self.encode_prompts(P["retain"]), self.encode_prompts([""])
        e_ret = self.retain_distribution(e_ret, P["retain"], P["retain_weights"], bool(P["anchors"]))
        e_pre = self.anchored(e_ret, P["retain"], P["anchors"])
        e_unl = [self.encode_prompts([p]) for p in P["unlearn"]]
        g = float(self.m.guidance_scale)
        concepts = [self.view(self.concept_condition(e, e_null), trained=False, name=p)
                    for e, p in zip(e_unl, P["unlearn"])]
        forget = self.forget_sets(concepts, gen) if "forget_sets" in self.needs else []
        names = list(P["unlearn"])
        if forget and len(forget) != len(names):  # image files (FU): one constraint per file, or one for all
            names = [f"forget set {i}" for i in range(len(forget))]
        return Roles(
            model=self.view(Guidance(e_ret, e_null, g), trained=True, name="model"),
            pretrained=self.view(Guidance(e_pre, e_null, g), trained=False, name="pretrained"),
            names=names, concepts=concepts, forget_sets=forget,
            likelihood_reference=self.view(e_null, trained=False, name="unconditional"),
            rows=[(p, Guidance(e, e_null, g)) for e, p in zip(e_unl, P["unlearn"])], retain_label=P["retain"][0],
            prompts=list(P["unlearn"]), info={"prompts": P, "guidance_scale": g})

    def soft_condition(self, roles: Roles):
        """The retain prompt's token embeddings (:class:`~unlearn.models.soft_conditions.SoftTextPrompt`)."""
        from ..models.soft_conditions import SoftTextPrompt

        prompt, g = str(self.m.prompts.retain[0]), float(self.m.guidance_scale)
        return lambda: SoftTextPrompt(self.comps["tokenizer"], self.comps["text_encoder"], prompt,
                                      self.encode_prompts([""]), g, self.dtype)

    def retain_distribution(self, cond, names: list, weights, anchored: bool = False):
        """Several retain prompts (or weights, or anchors): one :class:`PromptTable` shared by the trained
        and the pretrained model, each trajectory drawing its prompt; one prompt: its condition as it is."""
        if len(names) == 1 and weights is None and not anchored:
            return cond
        if "forget_sets" in self.needs:
            raise ConfigError(f"model.prompts.retain: a distribution of {len(names)} prompts is for formulation=lu "
                              f"and formulation=ru; formulation={self.cfg.formulation.name}'s retain data carry no "
                              f"prompt; accepted here: one retain prompt")
        return PromptTable(cond, weights if weights is not None else [1.0] * len(names), names)

    def anchored(self, table, names: list, anchors: dict):
        """The pretrained model's retain condition: ``table`` itself, or with ``model.prompts.anchors`` an
        :class:`AnchoredTable` sharing its draw, each retain prompt read as its anchor's embedding. The
        objective becomes ``E_c KL(p(.|c) || p_pre(.|anchor(c)))``: under an anchored prompt the model is
        kept near another prompt's pretrained distribution (as concept ablation maps a concept to an
        anchor), so a concept's own prompt can lose the concept at a small cost."""
        if not anchors:
            return table
        ref = [anchors[p] if p in anchors else p for p in names]
        self.check_prompt_lengths({"retain": ref, "unlearn": []})
        return AnchoredTable(table, self.encode_prompts(ref), ref)

    def export_lora(self, state: dict, run_dir: Path) -> list[str]:
        """diffusers' LoRA file: ``StableDiffusionPipeline.load_lora_weights(run_dir)``."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(run_dir, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                  safe_serialization=True)
        return ["pytorch_lora_weights.safetensors"]
