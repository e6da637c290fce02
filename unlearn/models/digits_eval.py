"""The digits evaluation network: what Inception, CLIP and SSCD are for the large models.

A small CNN trained on the ``eval_train`` split (never seen by the diffusion model), its
accuracy measured on ``eval_test``. It supplies

* ``features(images)``: the 128-d penultimate activations (KID's feature space),
* ``class_probs(images)``: softmax over the 10 digits (the concept score "how much 7 is in this
  image", CLIP's role),
* ``descriptor(images)``: L2-normalised penultimate activations (the copy-detection
  descriptor, SSCD's role).

Images follow the metrics' convention: float (N, C, H, W) in [0, 1]; colour is averaged to
grey and other sizes are resized to 8x8.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import atomic_torch_save, config_hash, generator

log = logging.getLogger(__name__)


class DigitsNet(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, 1, 8, 8) in [-1, 1]."""
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return x * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # logits
        return self.head(self.features(images))

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(images), -1)

    @torch.no_grad()
    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(images), dim=-1)


def train_eval_net(cache_dir: str | Path, steps: int = 1500, seed: int = 0, show_progress: bool = False):
    """The evaluation network (cached) and its held-out accuracy."""
    from .digits import load_digits_splits

    key = {"arch": "DigitsNet(32,128)", "steps": steps, "seed": seed, "data": "sklearn-digits/eval_train/seed0",
           "augment": "shift1"}
    path = Path(str(cache_dir)) / f"digits_evalnet_{config_hash(key)}.pt"
    net = DigitsNet()
    splits = load_digits_splits()
    xt, yt = splits["eval_test"]
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(blob["state_dict"])
            return net.eval(), float(blob["accuracy"])
        except Exception as exc:
            log.warning("cache entry %s unreadable (%s); retraining", path, exc)
    torch.manual_seed(seed)
    g = generator(seed)
    x, y = splits["eval_train"]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx]
        # random 1-pixel shifts: a classifier that does not hinge on exact pixel positions
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net((xb + 1) / 2), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net((xt + 1) / 2).argmax(-1) == yt).float().mean())
    atomic_torch_save({"state_dict": net.state_dict(), "accuracy": acc}, path)
    return net, acc


class DigitsFeatures(nn.Module):
    """KID's feature space for the digits: the evaluation network's penultimate activations."""

    def __init__(self, net: DigitsNet):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


class DigitsDescriptor(nn.Module):
    """The copy-detection descriptor for the digits (SSCD's role): L2-normalised features.

    Use it with ``metrics.sscd.resize=[8,8]``, mean 0 and std 1 (the digits presets set this)."""

    def __init__(self, net: DigitsNet):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.descriptor(images)


class DigitsConceptScorer:
    """CLIP's role for the digits: ``100 * p(digit | image)`` for prompts ending in the digit ("digit 7")."""

    def __init__(self, net: DigitsNet, accuracy: float):
        self.net, self.accuracy = net, accuracy
        self.record = {"source": "digits evaluation network (unlearn.models.digits_eval)",
                       "held_out_accuracy": round(accuracy, 4)}

    def to(self, device):
        self.net.to(device)
        return self

    @staticmethod
    def label(prompt: str) -> int:
        from .digits_sd import digit_of

        d = digit_of(prompt)
        if d is None:
            raise ValueError(f"digits concept prompts must end in a digit 0-9 or its name (got {prompt!r})")
        return d

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts, batch_size: int = 32) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        probs = torch.cat([self.net.class_probs(images[i:i + batch_size].to(dev)).cpu()
                           for i in range(0, len(images), batch_size)])
        return 100.0 * probs[:, [self.label(p) for p in prompts]]

    def protocol(self) -> dict:
        return {"weights": self.record, "score": "100 * softmax probability of the prompt's digit",
                "preprocess": "grey, 8x8 (area resize), [-1, 1]"}


def metric_models(net: DigitsNet, accuracy: float) -> dict:
    """The evaluation network plugged into the metric suite where Inception, SSCD and CLIP go."""
    return {"kid_feature": DigitsFeatures(net), "sscd_descriptor": DigitsDescriptor(net),
            "clip_scorer": DigitsConceptScorer(net, accuracy)}


@torch.no_grad()
def class_shares(net: DigitsNet, images: torch.Tensor, unlearn: list[int], accuracy: float) -> dict:
    """Share of images the evaluation network assigns to each digit, and to the unlearned ones."""
    pred = torch.cat([net(images[i:i + 256]).argmax(-1) for i in range(0, len(images), 256)])
    share = torch.bincount(pred, minlength=10).float() / len(pred)
    probs = torch.cat([net.class_probs(images[i:i + 256]) for i in range(0, len(images), 256)])
    return {"num_samples": len(images), "class_share": [round(float(v), 4) for v in share],
            "unlearned_classes": [int(d) for d in unlearn], "unlearned_share": float(share[unlearn].sum()),
            "unlearned_prob": float(probs[:, unlearn].sum(1).mean()),
            "eval_net_accuracy": accuracy}
