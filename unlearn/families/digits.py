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

    def unlearned_digits(self) -> list[int]:
        raise NotImplementedError

    def concept_judge(self):
        """The evaluation network on decoded samples: the share of unlearned digits, and each sample's
        log-probability of one (differentiable through the decoder)."""
        from ..models.digits_eval import class_shares
        from ..setup import ConceptJudge

        net, digits = self.eval_net(), self.unlearned_digits()

        def share(x0):
            return class_shares(net, self.to_images(x0), digits, self.eval_accuracy)["unlearned_share"]

        def log_prob(x0):
            return torch.logsumexp(torch.log_softmax(net(self.decode(x0).cpu()), -1)[:, digits], -1)

        return ConceptJudge(f"digits evaluation network (accuracy {self.eval_accuracy:.3f}), digits {digits}",
                            share, log_prob)

    def concept_data(self):
        """Real images of the unlearned digits (the diffusion split), at the model's image size, in model space."""
        import torch.nn.functional as F

        from ..models.digits import load_digits_splits

        def images():  # encoded once, when an attack first asks
            if getattr(self, "_concept_x", None) is None:
                x, y = load_digits_splits()["diffusion"]
                x = (x[torch.isin(y, torch.tensor(self.unlearned_digits()))] + 1) / 2
                if x.shape[-1] != self.image_size:
                    x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
                ch = int(self.vae.config.in_channels) if self.vae is not None else int(self.base.sample_shape[0])
                self._concept_x = self.from_images(x.clamp(0, 1).repeat(1, ch, 1, 1))
            return self._concept_x

        def data(k, gen):
            x = images()
            return x[torch.randperm(len(x), generator=gen)[:int(k)]]
        return data


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

    def unlearned_digits(self) -> list[int]:
        return [int(i) for i in self.m.classes.unlearn]

    COPY_SIGMA = 1.0  # pixel-space kernel width of the copy judge's soft log-probability (images in [-1, 1], 8x8)

    def forgotten_images(self) -> torch.Tensor | None:
        """Data unlearning with ``model.forget_indices``: those training images (model space), else None."""
        idx = list(self.m.forget_indices or [])
        return self.dataset()[idx] if "forget_sets" in self.needs and idx else None

    def concept_judge(self):
        """Concept unlearning: the evaluation network. Data unlearning (``forget_indices``): a sample is a
        copy when its nearest training image (in pixels) is a forget image; its soft log-probability
        compares Gaussian kernels (width ``COPY_SIGMA``) on the forget images and on all training images."""
        from ..setup import ConceptJudge

        forget = self.forgotten_images()
        if forget is None:
            return super().concept_judge()
        data = self.dataset()
        f, rest = forget.flatten(1), data[self.not_forgotten(len(data))].flatten(1)

        def dists(x0):
            x = x0.flatten(1).float().cpu()
            return torch.cdist(x, f), torch.cdist(x, rest)

        def share(x0):
            d_f, d_r = dists(x0.detach())
            return float((d_f.min(1).values < d_r.min(1).values).float().mean())

        def log_prob(x0):
            d_f, d_r = dists(x0)
            a, b = -d_f**2 / (2 * self.COPY_SIGMA**2), -d_r**2 / (2 * self.COPY_SIGMA**2)
            return torch.logsumexp(a, 1) - torch.logsumexp(torch.cat([a, b], 1), 1)

        return ConceptJudge(f"nearest training image is one of the {len(f)} forget images (pixels)", share, log_prob)

    def concept_data(self):
        forget = self.forgotten_images()
        if forget is None:
            return super().concept_data()
        return lambda k, gen: forget[torch.randperm(len(forget), generator=gen)[:int(k)]]

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
