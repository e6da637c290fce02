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
    """MLP with residual blocks and a learned timestep embedding (``nn.Embedding`` over t)."""

    def __init__(self, dim: int, schedule: NoiseSchedule, num_layers: int = 4, hidden: int = 128,
                 time_embed_dim: int = 32, widen: int = 2):
        super().__init__()
        self.schedule = schedule
        self.sample_shape = (dim,)
        self.time_embed = nn.Sequential(nn.Embedding(schedule.T, time_embed_dim),
                                        nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, widen, time_embed_dim) for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def eps(self, x, t, cond=None):
        t = self._timesteps(t, x)
        emb = self.time_embed(t)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(h)
