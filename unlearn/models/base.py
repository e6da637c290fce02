"""The one score-model interface every sampler, estimator and formulation sees.

A :class:`ScoreModel` predicts the noise ``eps(x_t, t, cond)`` at discrete timesteps
``t in {0..T-1}`` of its :class:`~unlearn.schedule.NoiseSchedule`. Backbones (the GMM ResNet,
exact GMM denoisers, diffusers UNets) are wrapped so that they all look alike; compositions of
models (the RU target) are score models too.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from ..schedule import NoiseSchedule


class ScoreModel(nn.Module):
    """Noise prediction at discrete timesteps, with its schedule and sample shape."""

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x, t, cond=None):
        return self.eps(x, t, cond)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_copy(self) -> "ScoreModel":
        """A deep copy with gradients switched off (the pretrained reference)."""
        other = copy.deepcopy(self)
        for p in other.parameters():
            p.requires_grad_(False)
        other.eval()
        return other

    def condition_tables(self) -> list:
        """The distributions among this model's conditions (prompt tables, drawn per trajectory by
        :func:`draw_conditions`); none: ``[]``."""
        return []

    def batch_key(self):
        """Models with the same key answer :func:`eps_all` in one network call (``None``: alone)."""
        return None

    @staticmethod
    def _timesteps(t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t.long()


def draw_conditions(model: ScoreModel, n: int, generator=None) -> list:
    """Each condition distribution of ``model`` draws the conditions of a batch of ``n`` trajectories
    (a table shared by several views draws once); returns ``(table, draw)`` pairs, which
    :func:`restore_conditions` sets back. No distribution: ``[]``, and no random numbers used."""
    drawn: list = []
    for t in model.condition_tables():
        if all(t is not d for d, _ in drawn):
            drawn.append((t, t.draw(n, generator)))
    return drawn


def restore_conditions(drawn) -> None:
    """Set condition distributions back to the draws a trajectory was sampled with."""
    for table, idx in drawn:
        table.idx = idx


def eps_all(models: Sequence[ScoreModel], x: torch.Tensor, t: torch.Tensor, cond=None) -> list[torch.Tensor]:
    """Each model's ``eps(x, t)``: models sharing a :meth:`ScoreModel.batch_key` (views of one network
    under different conditions) are evaluated together, the others one by one."""
    out: list = [None] * len(models)
    groups: dict = {}
    for i, m in enumerate(models):
        key = m.batch_key()
        if key is None:
            out[i] = m.eps(x, t, cond)
        else:
            groups.setdefault(key, []).append(i)
    for idx in groups.values():
        views = [models[i] for i in idx]
        for i, e in zip(idx, views[0].eps_views(views, x, t) if len(idx) > 1 else [views[0].eps(x, t, cond)]):
            out[i] = e
    return out


def eps_each(models: Sequence[ScoreModel], x: torch.Tensor, t: torch.Tensor, conds: Sequence) -> list[torch.Tensor]:
    """Each model's ``eps(x, t, conds[i])``: models given the same condition object go through
    :func:`eps_all` together (views of one network then share its call)."""
    groups: list = []  # (condition, indices), in order of first appearance
    for i, c in enumerate(conds):
        for g in groups:
            if g[0] is c:
                g[1].append(i)
                break
        else:
            groups.append((c, [i]))
    out: list = [None] * len(models)
    for c, idx in groups:
        for i, e in zip(idx, eps_all([models[i] for i in idx], x, t, c)):
            out[i] = e
    return out


class ComposedScore(ScoreModel):
    """``eps = (w_0 eps_0 + sum_i w_i eps_i) / norm``: the RU target's score composition.

    For the reverse-KL target: ``eps_rev = (eps_pre - sum_i mu_i eps_i) / (1 - mu_bar)``,
    built with :meth:`reverse_kl`.
    """

    def __init__(self, models: Sequence[ScoreModel], weights: torch.Tensor):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))
        self.schedule = models[0].schedule
        self.sample_shape = models[0].sample_shape
        self._last = None  # (x, cond, parts) of the last call without gradients: see :meth:`part`

    @classmethod
    def reverse_kl(cls, pretrained: ScoreModel, concepts: Sequence[ScoreModel], mu: torch.Tensor):
        mu = torch.as_tensor(mu, dtype=torch.float32).detach()
        mu_bar = float(mu.sum())
        if mu_bar >= 1.0:
            raise ValueError(f"RU target needs sum of multipliers < 1 (got {mu_bar:.4f})")
        w = torch.cat([torch.ones(1), -mu]) / (1.0 - mu_bar)
        return cls([pretrained, *concepts], w)

    def eps(self, x, t, cond=None):
        parts = eps_all(list(self.models), x, t, cond)
        self._last = None if torch.is_grad_enabled() else (x, cond, parts)
        out = 0.0
        for w, e in zip(self.weights, parts):
            out = out + w * e
        return out

    def condition_tables(self) -> list:
        return [t for m in self.models for t in m.condition_tables()]

    def part(self, model: ScoreModel, x: torch.Tensor, cond=None) -> torch.Tensor | None:
        """``model.eps`` at ``x`` as computed by the last call on this very ``x`` (same tensor, same
        condition object), or ``None``: a path KL to one of the composed models reuses its prediction."""
        if self._last is None or self._last[0] is not x or self._last[1] is not cond:
            return None
        for m, e in zip(self.models, self._last[2]):
            if m is model:
                return e
        return None

    def trainable_parameters(self):
        return []


def freeze(models: Iterable[nn.Module]):
    for m in models:
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
