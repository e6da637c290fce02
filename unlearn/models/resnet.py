"""ResNet MLP denoiser for low-dimensional data (the paper's GMM backbone)."""
from __future__ import annotations

import torch
from torch import nn

from ..schedule import NoiseSchedule
from .base import ScoreModel


class ResBlock(nn.Module):
    def __init__(self, hidden: int, widen: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden * widen)
        self.emb = nn.Linear(emb_dim, hidden * widen)
        self.fc2 = nn.Linear(hidden * widen, hidden)
        self.act = nn.SiLU()

    def forward(self, h, emb):
        z = self.act(self.fc1(self.norm(h)) + self.emb(emb))
        return h + self.fc2(z)


class ResNetDenoiser(ScoreModel):
    """MLP with residual blocks and a learned timestep embedding (``nn.Embedding`` over t).

    With ``gaussian_skip`` the network predicts a residual on top of the exact noise prediction
    of a Gaussian fitted to the training data (``set_gaussian_skip``), like EDM's skip
    preconditioning. Far from the training data the prediction then falls back to that
    Gaussian's, instead of an arbitrary extrapolation: this matters for the GMM's separate
    concept models ``q_i``, whose noise predictions are queried on the other components'
    samples by the pathwise KL and the likelihood-ratio estimators.
    """

    def __init__(self, dim: int, schedule: NoiseSchedule, num_layers: int = 4, hidden: int = 128,
                 time_embed_dim: int = 32, widen: int = 2, gaussian_skip: bool = False):
        super().__init__()
        self.schedule = schedule
        self.sample_shape = (dim,)
        self.gaussian_skip = bool(gaussian_skip)
        self.register_buffer("skip_mean", torch.zeros(dim))
        self.register_buffer("skip_var", torch.ones(()))
        self.time_embed = nn.Sequential(nn.Embedding(schedule.T, time_embed_dim),
                                        nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, widen, time_embed_dim) for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    @torch.no_grad()
    def set_gaussian_skip(self, data: torch.Tensor):
        self.skip_mean.copy_(data.mean(0))
        self.skip_var.copy_(data.var(0).mean())

    def eps(self, x, t, cond=None):
        t = self._timesteps(t, x)
        emb = self.time_embed(t)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        out = self.out(h)
        if self.gaussian_skip:
            a = self.schedule.abar_at(t, x)
            out = out + (1 - a).sqrt() * (x - a.sqrt() * self.skip_mean) / (a * self.skip_var + 1 - a)
        return out
