"""What a formulation needs from a model family, independent of the backbone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .models.base import ScoreModel


@dataclass
class ConceptJudge:
    """The model family's independent judge of the unlearned concepts (the attacks' measure):
    ``share(x0)``: the share of model samples judged to show one of them; ``log_prob(x0)``: each
    sample's log-probability of showing one, differentiable in ``x0`` (``None``: not differentiable);
    ``expected_likelihood(x0)``: ``E[q_i / p_pre]`` per concept from exact densities (``None``:
    estimated from denoising errors)."""

    name: str
    share: Callable[[torch.Tensor], float]
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None
    expected_likelihood: Callable[[torch.Tensor], list[float]] | None = None


@dataclass
class UnlearningSetup:
    """Models and data of one unlearning problem.

    ``model`` is the trainable copy of ``pretrained`` (frozen); ``concepts[i]`` models ``q_i``
    (RU and LU need them); ``forget_sets[i]`` holds samples of ``q_i`` (FU needs only these);
    ``retain_sampler(n, generator)`` gives retain data (``None``: use pretrained samples).
    ``oracle`` is the exact side where one exists (the GMM). ``evaluate`` and ``plot`` are the
    model family's own metrics and pictures. Conditioning lives inside the score models (text
    models hand out one conditioned view of a shared UNet per role), so ``cond`` is ``None``
    for them.
    """

    name: str
    pretrained: ScoreModel
    model: ScoreModel
    concepts: list[ScoreModel]
    concept_names: list[str]
    forget_sets: list[torch.Tensor]
    retain_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None
    oracle: Any = None
    cond: Any = None
    concept_conds: list[Any] = field(default_factory=list)
    evaluate: Callable[..., dict] | None = None
    plot: Callable[..., None] | None = None
    save_samples: Callable[..., None] | None = None
    info: dict = field(default_factory=dict)
    # LU's likelihood ratio l_i = q_i / p: the concepts over this reference (guided families: the
    # unconditional model), by default over the pretrained model
    likelihood_reference: ScoreModel | None = None
    save_model: Callable[..., list[str]] | None = None  # write the trained weights in the family's own format;
    # returns the files / folders written, relative to the run directory
    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None  # model samples -> images in [0, 1]
    from_images: Callable[[torch.Tensor], torch.Tensor] | None = None
    # feature models the family supplies to the metric suite (kid_feature, sscd_descriptor, clip_scorer)
    metric_models: dict = field(default_factory=dict)
    prompts: list[str] | None = None  # the unlearning prompts (CLIP score), text-like families only
    # real retain images in [0, 1] (the family's data minus forget images and unlearned classes): the
    # KID reference with metrics.retain.source=data; None: filtered pretrained samples (paper E.1)
    reference_images: Callable[[], torch.Tensor] | None = None
    # what the attacks (unlearn.attacks) need: the family's judge of the concepts, ``concept_data(k, gen)``:
    # k real samples of the unlearned concepts in model space (None: samples of the concept models), and
    # ``soft_condition()``: a trainable condition of the family's conditioning (None: the model takes none)
    concept_judge: ConceptJudge | None = None
    concept_data: Callable[[int, torch.Generator], torch.Tensor] | None = None
    soft_condition: Callable[[], Any] | None = None

    @property
    def schedule(self):
        return self.pretrained.schedule
