"""CLIP score with open_clip (paper section 4.3, Figure 6 right).

Per (image, prompt): ``100 * max(cos(f_image, f_text), 0)`` - the clamp is applied to each
image's cosine before any averaging (torchmetrics' ``CLIPScore`` convention; Hessel et al.'s
CLIP-S uses the factor 2.5 instead of 100). For RU the reported value is the largest, over the
unlearning prompts, of the mean score of the model's images ("max CLIP over the unlearning
prompts").

Images are float tensors ``(N, 3, H, W)`` in ``[0, 1]``. They are preprocessed as open_clip
would preprocess a PIL image, but on tensors: resize (bicubic, antialiased) so that the
shortest side is the model's input size, center crop, clamp to ``[0, 1]``, normalise with the
model's mean and std (``resize_mode: squash`` resizes to the square size instead).

:class:`CLIPScore` is the registered ``clip`` metric of the suite.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch import nn

from .base import Checks, Metric, Result, Weights
from .images import check_images
from .weights import WeightsUnavailable, download_allowed, file_record, reachable

logger = logging.getLogger("unlearn.metrics")

HF_URL = "https://huggingface.co"


def clip_score_matrix(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` for every (image, text) pair, shape (N, P); the clamp is per pair."""
    a = nn.functional.normalize(image_features.float(), dim=-1)
    b = nn.functional.normalize(text_features.float(), dim=-1)
    return 100.0 * (a @ b.T).clamp(min=0.0)


def preprocess_images(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """open_clip's image preprocessing on ``[0, 1]`` tensors (see module docstring)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        str(cfg.get("interpolation", "bicubic")), InterpolationMode.BICUBIC)
    mode = str(cfg.get("resize_mode", "shortest"))
    x = images.float()
    if mode == "squash":
        x = TF.resize(x, [h, w], interpolation=interp, antialias=True)
    elif mode == "shortest":
        x = TF.resize(x, [min(h, w)], interpolation=interp, antialias=True)
        x = TF.center_crop(x, [h, w])
    else:
        raise ValueError(f"CLIP preprocessing: resize_mode {mode!r} is not supported (shortest, squash)")
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(cfg.get("mean"), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std"), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class CLIPScorer:
    """An open_clip model, its tokenizer and preprocessing, and the weights it was loaded from."""

    def __init__(self, model: nn.Module, tokenizer, preprocess_cfg: dict, record: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess_cfg)
        self.record = record or {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = preprocess_images(images[i:i + batch_size].to(self.device), self.preprocess_cfg)
            out.append(self.model.encode_image(x).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()

    def scores(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Per-image CLIP scores against each prompt, shape (N, P)."""
        return clip_score_matrix(self.image_features(images, batch_size), self.text_features(prompts))

    def protocol(self) -> dict:
        import open_clip

        pc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()}
        return {"open_clip_version": open_clip.__version__, "weights": self.record, "preprocess": pc,
                "preprocess_impl": "tensor resize (antialiased) + center crop + clamp [0,1] + normalise",
                "score": "100 * max(cos(image, text), 0) per image"}


def _cached_tag_file(pretrained_cfg: dict, cache_dir=None) -> str | None:
    """The locally cached weight file of an open_clip pretrained tag, without network access."""
    if "file" in pretrained_cfg and os.path.isfile(pretrained_cfg["file"]):
        return pretrained_cfg["file"]
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    repo, fname = os.path.split(hub)  # 'org/model/' -> ('org/model', ''); 'org/model/f.bin' -> ('org/model', 'f.bin')
    names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for n in names:
        hit = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def load_clip(model_name: str, checkpoint: str | None, device="cpu", download_setting="auto",
              timeout: float = 20.0, cache_dir=None) -> CLIPScorer:
    """Build an open_clip model from a local checkpoint file (or a pretrained tag when it is in the
    Hugging Face cache - ``cache_dir``, default HF's own - or can be downloaded there).
    Raises :class:`WeightsUnavailable` when the weights are not there."""
    import open_clip

    hint = "set metrics.clip.checkpoint=/path/to/open_clip_pytorch_model.bin (and metrics.clip.model to its architecture)"
    if not checkpoint:
        raise WeightsUnavailable(f"metrics.clip.checkpoint is not set; {hint}")
    checkpoint = os.path.expanduser(str(checkpoint))
    name = str(model_name)
    force_pp = None
    if name.startswith("local-dir:"):
        raise WeightsUnavailable("metrics.clip.model: use a built-in architecture name with "
                                 "metrics.clip.checkpoint=<file>, not a local-dir: schema")
    if os.path.isfile(checkpoint):
        path, source = checkpoint, "config"
    else:
        cfg = open_clip.get_pretrained_cfg(name, checkpoint)
        if not cfg:
            raise WeightsUnavailable(f"metrics.clip.checkpoint={checkpoint} is neither a file nor an open_clip "
                                     f"pretrained tag of {name}; {hint}")
        force_pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        cache_dir = os.path.expanduser(str(cache_dir)) if cache_dir else None
        path = _cached_tag_file(cfg, cache_dir)
        source = f"tag {checkpoint} (cache)"
        if path is None:
            allowed, why = download_allowed(download_setting)
            if not allowed:
                raise WeightsUnavailable(f"open_clip tag {checkpoint!r} is not cached and downloads are off ({why}); {hint}")
            ok, err = reachable(HF_URL, timeout)
            if not ok:
                raise WeightsUnavailable(f"open_clip tag {checkpoint!r}: {HF_URL} is not reachable ({err}); {hint}")
            try:
                path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001
                raise WeightsUnavailable(f"download of open_clip tag {checkpoint!r} failed ({e}); {hint}") from None
            source = f"tag {checkpoint} (download)"
    try:
        model = open_clip.create_model(name, pretrained=str(path), device=device, force_preprocess_cfg=force_pp)
    except Exception as e:  # noqa: BLE001 - a wrong architecture or a corrupt file
        raise WeightsUnavailable(f"open_clip could not load {path} as {name} ({type(e).__name__}: {e}); {hint}") from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - an HF tokenizer that is not cached
        raise WeightsUnavailable(f"the tokenizer of {name} is not available ({type(e).__name__}: {e})") from None
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    record = {**file_record(path, source), "model": name}
    return CLIPScorer(model, tokenizer, pp, record)


# -- the metric --------------------------------------------------------------------------------
class CLIPScore(Metric, name="clip"):
    """CLIP score of ``ctx.images`` against ``ctx.prompts``: max (or mean) over prompts of the mean over images."""

    needs = ("images", "prompts")
    weights = True
    given_keyword = "clip_scorer"

    @classmethod
    def validate(cls, check: Checks) -> None:
        check.one_of("reduction", ("max", "mean"))

    def load(self) -> Weights:
        c, root = self.cfg, self.root
        scorer = load_clip(str(c.model), c.checkpoint, self.device, root.download, float(root.download_timeout),
                           root.cache_dir)
        return Weights(scorer, scorer.record)

    def given(self, scorer) -> Weights:
        """A scorer with ``scores(images, prompts, batch_size) -> (N, P)``, ``protocol()``, ``to()``, ``record``."""
        return Weights(scorer.to(self.device), scorer.record or {"source": "given"})

    def evaluate(self, ctx, weights, seed) -> Result:
        scorer = weights.obj
        images = check_images(ctx.images, "ctx.images")
        prompts = list(ctx.prompts)
        s = scorer.scores(images, prompts, int(self.root.batch_size))  # (N, P), clamped per image
        per_prompt = s.mean(0)
        red = str(self.cfg.reduction)
        value = float(per_prompt.max()) if red == "max" else float(per_prompt.mean())
        proto = {**scorer.protocol(), "prompts": prompts, "n_images": len(images),
                 "image_size": list(images.shape[-2:]),
                 "reduction": ("max over prompts of the mean score over images" if red == "max"
                               else "mean over prompts and images")}
        return Result(value, proto, {"per_prompt": dict(zip(prompts, per_prompt.tolist()))}, {"samples": images})
