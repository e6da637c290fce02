"""Image-model evaluation during and after training: the metric suite fed from the setup.

The GMM family has its own exact metrics (``setup.evaluate``); image families (``setup.to_images``
set) get KID, SSCD, CLIP, KL to the pretrained model and expected likelihood from
:mod:`unlearn.metrics`, every ``metrics.eval_every`` dual steps and at the end. Families can
supply their own feature models (``setup.metric_models``: the digits evaluation network plays
Inception, CLIP and SSCD).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ConfigError
from .metrics import EvalContext, MetricSuite, sample_images
from .utils import generator

log = logging.getLogger(__name__)


class ImageEvaluator:
    def __init__(self, cfg, setup, sampler, run_dir: Path):
        self.cfg, self.setup, self.sampler, self.run_dir = cfg, setup, sampler, Path(run_dir)
        self.m = cfg.metrics
        self.suite = MetricSuite.from_config(self.m, image_model=True, **(setup.metric_models or {}))
        self.missing = self.suite.check_available()  # warns once per metric; strict -> ConfigError
        self._retain = None
        self.retain_info: dict = {}
        self.source = str(self.m.retain.source)  # its values are checked with the metrics config
        if self.source == "data" and setup.reference_images is None:
            raise ConfigError(f"metrics.retain.source=data needs real retain images: a model with its own data "
                              f"(model=digits) or model.retain_folder; model {cfg.model.name} has neither and "
                              f"accepts metrics.retain.source=samples")

    @property
    def active(self) -> bool:
        return bool(self.suite.enabled)

    def due(self, step: int) -> bool:
        return self.suite.due(step, final=False)

    def _batch(self) -> int:
        return int(self.m.batch_size)

    def retain_images(self) -> torch.Tensor:
        """KID's reference: pretrained samples without the unlearn concepts (paper E.1: score <
        factor * mean), or with ``metrics.retain.source=data`` the family's real retain images."""
        if self._retain is None and self.source == "data":
            self._retain = self.setup.reference_images()
            self.retain_info = {"source": "data", "size": int(len(self._retain))}
        if self._retain is None:
            s = self.setup
            n = int(self.m.retain.num_candidates)
            seed = int(self.m.seed) + 17
            x0 = torch.cat([self.sampler.sample(s.pretrained, min(self._batch(), n - i), generator(seed + i)).x0.cpu()
                            for i in range(0, n, self._batch())])
            images = s.to_images(x0)
            score_kind = str(self.m.retain.score)
            if score_kind == "clip" and "clip" in self.suite._loaded and s.prompts:
                scores = self.suite._loaded["clip"].scores(images, list(s.prompts), self._batch()).max(1).values
            else:
                from .metrics import concept_likelihood

                concepts = list(s.concepts)
                ref = s.likelihood_reference or s.pretrained
                if concepts:
                    llr = concept_likelihood(x0, concepts, ref, seed, None, None,
                                             int(self.m.likelihood.num_timesteps), 1, True, self._batch())
                    scores = torch.exp(llr.double()).max(1).values
                else:  # nothing to filter against (FU on an unconditional model): all pretrained samples
                    scores = torch.zeros(len(images))
                    score_kind = "none"
            self._retain, self.retain_info = self.suite.retain_set(images, scores)
            self.retain_info["score"] = score_kind
        return self._retain

    def use_retain_set(self, images: torch.Tensor, info: dict) -> None:
        """KID's reference as an earlier, identical run drew it (:mod:`unlearn.reference_cache`)."""
        self._retain, self.retain_info = images, dict(info)

    def context(self, model, step: int, samples: torch.Tensor | None = None) -> EvalContext:
        """``samples``: the run's final samples when they do not come from a sampler of ``model`` (RU's
        importance resampling). The image metrics then see them, and the metrics that follow the
        model's own trajectories (KL, expected likelihood) are skipped: ``model`` is not what they show."""
        s = self.setup
        n = int(self.m.num_images)
        if samples is not None:
            images = s.to_images(samples[:n]).clamp(0, 1).float().cpu()
            model = None
        else:
            images = sample_images(model, self.sampler, n, int(self.m.seed), None, s.to_images, self._batch())
        forget_x0 = torch.cat(s.forget_sets) if s.forget_sets else None
        return EvalContext(
            images=images, reference_images=self.retain_images(), reference_name="retain set", step=step,
            forget_images=s.to_images(forget_x0) if forget_x0 is not None else None, forget_x0=forget_x0,
            prompts=s.prompts, model=model, pretrained=s.pretrained,
            sampler=self.sampler, concepts=list(s.concepts), concept_names=list(s.concept_names),
            likelihood_reference=s.likelihood_reference, encode=s.from_images, decode=s.to_images)

    def evaluate(self, model, step: int, tag: str, samples: torch.Tensor | None = None) -> tuple[dict, dict]:
        """``(scalars, results)``; PNG grids of the evaluated images under ``run_dir/eval``."""
        ctx = self.context(model, step, samples)
        results = self.suite.evaluate(ctx, show_progress=bool(self.cfg.progress), desc=f"metrics ({tag})")
        self.suite.last_images.setdefault("samples", ctx.images)  # the evaluated images, whatever metric ran
        self.suite.save_images(self.run_dir / "eval", prefix=f"{tag}_")
        return MetricSuite.scalars(results), results
