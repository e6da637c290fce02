"""``model=digits_sd``: the text-to-image path on a trained model. A Stable-Diffusion-class pipeline
pretrained here on the digits (:mod:`unlearn.models.digits_sd`), loaded from its diffusers folder
through ``model.path``'s code, judged by the digits evaluation network on VAE-decoded images: the
share of each digit under the retain prompt, under each unlearn prompt and under paraphrases of it
that unlearning never used."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf, open_dict

from ..config import ConfigError
from ..models.diffusers_models import Guidance, recondition
from ..utils import generator, progress
from .base import register_family
from .digits import DigitsEvaluation
from .text2img import TextToImage


@register_family("digits_sd")
class DigitsSD(DigitsEvaluation, TextToImage):
    double = "digits_sd"  # pretraining is cached; the contract battery shortens it

    @classmethod
    def validate(cls, m) -> None:
        from ..models.digits_sd import digit_of

        super().validate(m)
        for i, p in enumerate(m.prompts.unlearn):
            if digit_of(p) is None:
                raise ConfigError(f"model.prompts.unlearn[{i}]={p!r} names no digit; accepted: a prompt whose last "
                                  f"word is a digit 0-9 or its name (e.g. 'seven', 'the digit 7')")
        para = m.prompts.paraphrases
        if para is not None and not OmegaConf.is_dict(para):
            raise ConfigError(f"model.prompts.paraphrases must map a concept prompt to a list of prompts (got {para!r})")
        for k, v in (para or {}).items():
            if k not in list(m.prompts.unlearn):
                raise ConfigError(f"model.prompts.paraphrases.{k}: not one of model.prompts.unlearn "
                                  f"{list(m.prompts.unlearn)}")
            if not OmegaConf.is_list(v) or any(not isinstance(s, str) or not s.strip() for s in v):
                raise ConfigError(f"model.prompts.paraphrases.{k} must be a list of non-empty prompts (got {v!r})")

    @classmethod
    def components(cls, m, cache_dir=None, show_progress: bool = False) -> tuple[dict, str]:
        """A local ``model.path`` as given; otherwise the pipeline pretrained here (cached), loaded
        through the same ``model.path`` code as a local Stable Diffusion copy."""
        if m.path:
            return super().components(m, cache_dir, show_progress)
        from ..models.digits_sd import pretrain_digits_sd

        folder, _ = pretrain_digits_sd(m, cache_dir or "outputs/cache", show_progress)
        local = m.copy()
        with open_dict(local):
            local.path = str(folder)
        return super().components(local, cache_dir, show_progress)

    def roles(self, gen: torch.Generator):
        r = super().roles(gen)
        r.info["model_path"] = self.source
        r.info["paraphrases"] = self.paraphrases()
        return r

    def unlearned_digits(self) -> list[int]:
        from ..models.digits_sd import digit_of

        return [digit_of(p) for p in self.m.prompts.unlearn]

    def paraphrases(self) -> dict:
        """Each concept prompt's paraphrases: ``model.prompts.paraphrases``, else its digit's pretraining
        captions other than the prompt itself (never used in unlearning)."""
        from ..models.digits_sd import captions, digit_of

        para = self.m.prompts.paraphrases
        given = OmegaConf.to_container(para, resolve=True) if para is not None else {}
        return {p: list(given.get(p) or [c for c in captions(digit_of(p)) if c != p]) for p in self.m.prompts.unlearn}

    # -- evaluation: the digits network on decoded images (eval_net, metric_models: DigitsEvaluation) -
    def family_metrics(self, samples: torch.Tensor, formulation=None, multipliers=None, model=None) -> dict:
        """Digit shares of ``samples`` (the retain prompt's), then of ``model`` sampled under each unlearn
        prompt and each of its paraphrases (``model.eval_samples`` each, the same seeds for every model)."""
        from ..models.digits_eval import class_shares
        from ..models.digits_sd import digit_of

        net = self.eval_net()
        digits = [digit_of(p) for p in self.m.prompts.unlearn]
        out = class_shares(net, self.to_images(samples), digits, self.eval_accuracy)
        if model is None:
            return out
        n, g = int(self.m.eval_samples), float(self.m.guidance_scale)
        e_null = self.encode_prompts([""])
        prompts = {}
        todo = [(p, d, kind, q) for p, d in zip(self.m.prompts.unlearn, digits)
                for kind, q in [("prompt", p)] + [("paraphrase", s) for s in self.paraphrases()[p]]]
        retain = list(self.m.prompts.retain)
        if len(retain) > 1:  # a retain distribution: its first prompt (the generic one) on its own too
            todo.insert(0, (None, digits, "retain prompt", retain[0]))
        if self.m.eval_other_digits:  # does each other digit's prompt still draw that digit?
            todo += [(None, d, "other digit", f"the digit {d}") for d in range(10) if d not in digits]
        for p, d, kind, q in progress(todo, desc="prompt shares", enabled=bool(self.cfg.progress)):
            view = recondition(model, Guidance(self.encode_prompts([q]), e_null, g))
            if view is None:
                return {**out, "prompt_shares": "not measured: the final model cannot take another prompt"}
            with torch.no_grad():
                x = self.sampler.sample(view, n, generator(int(self.cfg.seed) + 4242)).x0
            share = class_shares(net, self.to_images(x), d if isinstance(d, list) else [d], self.eval_accuracy)
            prompts[q] = {"concept": p, "kind": kind, "digit": d, "share": share["unlearned_share"],
                          "class_share": share["class_share"]}
        out["prompt_shares"] = prompts
        return out
