"""The one denoising-loss training loop behind every locally trained model (GMM pretraining,
digits pretraining, concept models fine-tuned on forget sets)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..utils import progress


def fit_denoiser(net, params, batch_fn: Callable, steps: int, lr: float, g: torch.Generator, desc: str,
                 show_progress: bool = True, weight_decay: float = 0.0, warmup_cosine: bool = True) -> None:
    """AdamW on ``denoising_loss(net, x, g, cond)`` for ``(x, cond) = batch_fn(g)``, ``steps`` times.

    ``warmup_cosine``: linear warm-up over 5% of the steps, then cosine decay to 0 (else a constant
    rate). The progress bar shows an exponential moving average of the loss.
    """
    from ..estimators import denoising_loss

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = None
    if warmup_cosine:
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = progress(range(steps), desc=desc, enabled=show_progress)
    ema = None
    for _ in bar:
        x, cond = batch_fn(g)
        loss = denoising_loss(net, x, g, cond=cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
