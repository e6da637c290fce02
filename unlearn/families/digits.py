"""The handwritten-digits testbed: scikit-learn's 8x8 digits (no download), a class-conditional
UNet2DModel pretrained here and cached, and a digit classifier trained here for the metrics
(class shares, KID/SSCD/CLIP stand-ins; :mod:`unlearn.models.digits_eval`)."""
from __future__ import annotations

import torch

from .base import register_family
from .classcond import ClassConditional


class DigitsEvaluation:
    """The digits evaluation network (``model.eval_net``, trained here and cached) as the family's
    judge: KID features, concept score and copy descriptor (:mod:`unlearn.models.digits_eval`)."""

    def eval_net(self):
        if getattr(self, "_eval_net", None) is None:
            from ..models.digits_eval import train_eval_net

            e = self.m.eval_net
            self._eval_net, self.eval_accuracy = train_eval_net(self.cfg.paths.cache_dir, int(e.steps), int(e.seed))
        return self._eval_net

    def metric_models(self) -> dict:
        from ..models.digits_eval import metric_models

        return metric_models(self.eval_net(), self.eval_accuracy)


@register_family("digits")
class Digits(DigitsEvaluation, ClassConditional):
    double = "digits"  # small enough to be its own double (pretraining is cached)

    @classmethod
    def components(cls, m, cache_dir=None, show_progress: bool = False) -> tuple[dict, str]:
        if m.path:
            return super().components(m, cache_dir, show_progress)
        from ..models.digits import pretrain_digits

        unet, sched, hit = pretrain_digits(m, cache_dir or "outputs/cache", show_progress)
        return {"unet": unet, "scheduler": sched}, "digits UNet pretrained locally (" + ("cached" if hit else "new") + ")"

    @classmethod
    def dataset_size(cls, m) -> int:
        from ..models.digits import SPLITS

        return int(SPLITS["diffusion"])

    def dataset(self) -> torch.Tensor:
        from ..models.digits import load_digits_splits

        return load_digits_splits()["diffusion"][0]

    def real_retain_images(self, unlearn_classes: list[int]):
        """The training images without the forget images and the unlearned classes."""
        def images():
            from ..models.digits import load_digits_splits

            x, y = load_digits_splits()["diffusion"]
            keep = self.not_forgotten(len(x))
            for c in unlearn_classes:
                keep &= y != int(c)
            return self.to_images(x[keep])
        return images

    def family_metrics(self, samples: torch.Tensor, formulation=None, multipliers=None, model=None) -> dict:
        from ..models.digits_eval import class_shares

        net = self.eval_net()
        return class_shares(net, self.to_images(samples), [int(i) for i in self.m.classes.unlearn], self.eval_accuracy)
