"""Class-conditional pixel UNets (UNet2DModel with class embeddings; label ``num_classes`` is the
null class of classifier-free guidance). The model generates ``model.classes.retain`` (null: the
unconditional model) and each label in ``model.classes.unlearn`` is one concept ``q_i`` (its
guided class-conditional view; LU's likelihoods use the plain conditional model)."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ..config import ConfigError, as_number
from ..models.diffusers_models import Guidance, PromptTable
from .base import register_family
from .diffusers_family import DiffusersFamily, Roles, int_list, no_repeats


@register_family("classcond")
class ClassConditional(DiffusersFamily):
    conditioning = "class"
    double = "tiny_classcond"

    def unet_conditioning(self, unet) -> str:
        return "class" if unet.config.get("num_class_embeds") else "none"

    @classmethod
    def validate(cls, m) -> None:
        super().validate(m)
        c = m.classes
        n = as_number(m.num_classes, "model.num_classes", int, "an integer >= 1")
        unl = int_list(c.unlearn if c is not None else None, "model.classes.unlearn", f"class labels in 0..{n - 1}")
        if not unl or any(not 0 <= i < n for i in unl):
            raise ConfigError(f"model.classes.unlearn must list class labels in 0..{n - 1} (got {unl})")
        no_repeats(unl, "model.classes.unlearn")
        if c.retain is not None:
            what = f"null (unconditional) or class labels in 0..{n - 1}"
            ret = int_list(c.retain, "model.classes.retain", what)
            if not ret or any(not 0 <= i < n for i in ret):
                raise ConfigError(f"model.classes.retain must be {what} (got {ret})")
        if as_number(m.guidance_scale, "model.guidance_scale", float, "a number >= 1") < 1.0:
            raise ConfigError(f"model.guidance_scale must be >= 1 (got {m.guidance_scale})")

    @classmethod
    def concept_count(cls, m) -> int:
        return len(m.classes.unlearn)

    def roles(self, gen: torch.Generator) -> Roles:
        m, C = self.m, self.m.classes
        null = torch.tensor([int(m.num_classes)])  # the classifier-free guidance null label
        ret = torch.tensor(list(C.retain)) if C.retain is not None else null
        if len(ret) > 1:  # a distribution over the retain classes: each trajectory draws its class
            ret = PromptTable(ret, [1.0] * len(ret), [f"{m.class_prefix}{i}" for i in C.retain])
        unl = [int(i) for i in C.unlearn]
        g = float(m.guidance_scale)
        labels = [f"{m.class_prefix}{i}" for i in unl]
        concepts = [self.view(self.concept_condition(torch.tensor([i]), null), trained=False, name=n)
                    for i, n in zip(unl, labels)]
        data_unlearning = "forget_sets" in self.needs and bool(m.forget_indices)
        return Roles(
            model=self.view(Guidance(ret, null, g), trained=True, name="model"),
            pretrained=self.view(Guidance(ret, null, g), trained=False, name="pretrained"),
            # data unlearning: each training image its own constraint
            names=[f"train image {i}" for i in m.forget_indices] if data_unlearning else labels,
            concepts=concepts,
            forget_sets=self.forget_sets(concepts, gen) if "forget_sets" in self.needs else [],
            likelihood_reference=self.view(null, trained=False, name="unconditional"),
            rows=[(n, Guidance(torch.tensor([i]), null, g)) for i, n in zip(unl, labels)],
            retain_label="unconditional" if C.retain is None else f"classes {list(C.retain)}",
            prompts=labels, info={"classes": OmegaConf.to_container(C)},
            reference_images=self.real_retain_images([] if "forget_sets" in self.needs else unl))

    def soft_condition(self, roles: Roles):
        """A class embedding vector starting at the retain class (the null class for the unconditional
        model; :class:`~unlearn.models.soft_conditions.SoftClassLabel`)."""
        from ..models.soft_conditions import SoftClassLabel

        unet = self.base.unet
        if getattr(unet, "class_embedding", None) is None or not hasattr(unet.class_embedding, "num_embeddings"):
            return None
        m = self.m
        init = int(m.classes.retain[0]) if m.classes.retain is not None else int(m.num_classes)
        return lambda: SoftClassLabel(unet, init, int(m.num_classes), float(m.guidance_scale))

    def real_retain_images(self, unlearn_classes: list[int]):
        """The family's real retain images in [0, 1] (KID's reference with ``metrics.retain.source=data``),
        or None: a class-conditional model from the hub brings no data."""
        return None
