"""What one evaluation sees: :class:`EvalContext`, filled by the training loop, read by the metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..models.base import ScoreModel
from ..samplers import GaussianSampler


@dataclass
class EvalContext:
    """What one evaluation sees. Images are float ``(N, 3, H, W)`` tensors in ``[0, 1]``.

    Every field is optional; a metric whose inputs are absent is reported as ``skipped``.
    """

    images: torch.Tensor | None = None            # samples of the model under evaluation (KID fake set, CLIP)
    reference_images: torch.Tensor | None = None  # KID reference set: the retain set (LU) or pretrained samples
    reference_name: str = "reference"             # what the reference set is, recorded in the KID protocol
    forget_images: torch.Tensor | None = None     # FU: the images to unlearn (SSCD originals)
    forget_x0: torch.Tensor | None = None         # FU: the same in the model's data space (skips encode)
    prompts: Sequence[str] | None = None          # the unlearning prompts (CLIP)
    model: ScoreModel | None = None               # the model under evaluation
    pretrained: ScoreModel | None = None          # the frozen pretrained model (KL)
    sampler: GaussianSampler | None = None        # the run's sampler (KL, likelihood)
    cond: Any = None                              # conditioning of model/pretrained samples (e.g. retain prompt)
    concepts: Sequence[ScoreModel] = ()           # q_i models (likelihood)
    concept_conds: Sequence[Any] = ()             # conditioning of each q_i
    concept_names: Sequence[str] = ()
    likelihood_reference: ScoreModel | None = None  # the p of l_i = q_i / p when it is not `pretrained` (text: unconditional)
    encode: Callable | None = None                # [0, 1] images -> model space (default 2x - 1)
    decode: Callable | None = None                # model space -> [0, 1] images (default (x + 1) / 2)
    step: int | None = None                       # training step (recorded)
    seed: int | None = None                       # overrides metrics.seed

    @classmethod
    def from_setup(cls, setup, sampler: GaussianSampler | None = None, **kw) -> "EvalContext":
        """Models, conditioning and concepts from an :class:`~unlearn.setup.UnlearningSetup`."""
        base = dict(model=setup.model, pretrained=setup.pretrained, sampler=sampler, cond=setup.cond,
                    concepts=list(setup.concepts), concept_conds=list(setup.concept_conds or []),
                    concept_names=list(setup.concept_names))
        base.update(kw)
        return cls(**base)
