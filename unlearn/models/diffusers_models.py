"""diffusers UNets behind the one score-model interface.

:class:`DiffusersScore` turns a ``UNet2DModel`` (unconditional or class-conditional) or a
``UNet2DConditionModel`` (text embeddings) into a :class:`~unlearn.models.base.ScoreModel`:
``eps(x_t, t, cond)`` at our integer timesteps, with the noise schedule read from the model's
scheduler config. ``cond`` is ``None``, a tensor (text embeddings ``(P, L, D)`` or class
labels ``(P,)``; ``P`` conditions cycle over the batch) or a :class:`Guidance` (classifier-free
guidance in one batched call).

:class:`ConditionedView` fixes the condition (and whether LoRA adapters are active) of a
shared UNet, so one set of weights serves as the trainable model (adapters on), the frozen
pretrained model (adapters off) and one model per concept prompt (adapters off, the concept's
embeddings). The formulations see only score models and never know about prompts or LoRA.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..schedule import NoiseSchedule
from .base import ComposedScore, ScoreModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PromptTable:
    """A distribution of prompts as a condition: embeddings ``(P, L, D)`` and weights. Each trajectory
    draws its prompt when sampling starts (:meth:`draw`, stratified: every prompt gets its weight's
    share of the batch, give or take one row), and every later evaluation of that batch's rows, in
    whatever chunks or step stacks, reads row ``r``'s prompt at ``r mod n``. Views of one table
    (the trained and the pretrained model) share the draw, so objective and constraints are
    expectations over the joint distribution of prompt and image."""

    def __init__(self, emb: torch.Tensor, weights, prompts: list[str]):
        self.emb = emb
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.prompts = list(prompts)
        self.idx: torch.Tensor | None = None  # row -> prompt of the current batch (None: cycle)

    def draw(self, n: int, generator=None) -> torch.Tensor:
        """Systematic sampling of ``n`` prompts by weight, in random order."""
        u = torch.rand((), generator=generator, dtype=torch.float64)
        cdf = torch.cumsum(self.weights, 0)
        pos = (u + torch.arange(n, dtype=torch.float64)) / n
        idx = torch.searchsorted(cdf, pos).clamp_(max=len(self.weights) - 1)
        self.idx = idx[torch.randperm(n, generator=generator)]
        return self.idx

    def rows(self, n: int, offset: int, device) -> torch.Tensor:
        pos = torch.arange(offset, offset + n)
        pick = pos % self.emb.shape[0] if self.idx is None else self.idx[pos % len(self.idx)]
        return self.emb.to(device)[pick.to(device)]


class AnchoredTable(PromptTable):
    """The pretrained model's side of a retain distribution with anchors: the draw (``idx``) of its
    ``base`` table, read with other embeddings, so a chain drawn under retain prompt ``c`` is compared
    with the pretrained model under ``c``'s anchor (``model.prompts.anchors``)."""

    def __init__(self, base: PromptTable, emb: torch.Tensor, prompts: list[str]):
        self.base, self.emb, self.prompts = base, emb, list(prompts)
        self.weights = base.weights

    @property
    def idx(self):
        return self.base.idx

    @idx.setter
    def idx(self, value):
        self.base.idx = value


def condition_tables(cond) -> list:
    """The :class:`PromptTable` objects inside a condition (a table, a Guidance or anything else)."""
    if isinstance(cond, PromptTable):
        return [cond]
    if isinstance(cond, Guidance):
        return condition_tables(cond.cond) + condition_tables(cond.uncond)
    return []


@dataclass
class Guidance:
    """Classifier-free guidance: ``eps_u + scale (eps_c - eps_u)``; ``scale = 1`` is plain ``eps_c``."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    scale: float = 1.0

    def plain(self) -> bool:
        """Whether this is just the conditional model (no unconditional branch, scale 1, or the same
        condition on both branches): one UNet evaluation instead of two."""
        return self.uncond is None or self.scale == 1.0 or (
            isinstance(self.cond, torch.Tensor) and isinstance(self.uncond, torch.Tensor)
            and self.cond.shape == self.uncond.shape and torch.equal(self.cond.to(self.uncond.device), self.uncond))


def schedule_from_scheduler_config(sc: dict) -> NoiseSchedule:
    """The training noise schedule of a diffusers scheduler config (DDPM/DDIM/PNDM/...)."""
    kind = sc.get("beta_schedule", "linear")
    T = int(sc.get("num_train_timesteps", 1000))
    b0, b1 = float(sc.get("beta_start", 1e-4)), float(sc.get("beta_end", 0.02))
    if sc.get("trained_betas") is not None:
        return NoiseSchedule(torch.tensor(sc["trained_betas"], dtype=torch.float64))
    if kind == "linear":
        return NoiseSchedule.linear(b0, b1, T)
    if kind == "scaled_linear":
        return NoiseSchedule.scaled_linear(b0, b1, T)
    raise ConfigError(f"scheduler beta_schedule {kind!r} is not supported; accepted: linear, scaled_linear")


_LORA_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def lora_layers(module: nn.Module):
    """The LoRA layers of ``module`` (found once: a UNet has thousands of modules; :func:`add_lora`
    forgets the list when it adds adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module not in _LORA_LAYERS:
        _LORA_LAYERS[module] = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    return _LORA_LAYERS[module]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Run ``module`` as the base model: every LoRA layer switched off, restored afterwards."""
    layers = lora_layers(module)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)  # what peft's LoRA adapts here


def lora_targets(unet: nn.Module, target_modules) -> list[str]:
    """The names of the layers LoRA adapts for ``target_modules``, as peft matches them: a regex
    matched in full against each module name, or a list of module-name suffixes."""
    import re

    names = [n for n, mod in unet.named_modules() if isinstance(mod, LORA_LAYER_TYPES)]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    keys = [str(k) for k in target_modules]
    return [n for n in names if any(n == k or n.endswith("." + k) for k in keys)]


def no_lora_target_message(unet: nn.Module, target_modules) -> str:
    """The one line for ``model.lora.target_modules`` matching nothing, with names that exist."""
    names = [n for n, mod in unet.named_modules() if isinstance(mod, LORA_LAYER_TYPES)]
    leaf = [n.rsplit(".", 1)[-1] for n in names]
    picks = [n for n, e in zip(names, leaf) if e in ("to_q", "to_v")][:2] + \
        [n for n, e in zip(names, leaf) if e.startswith("conv")][:1]
    return (f"model.lora.target_modules={target_modules!r} matches no layer of the UNet that LoRA can adapt "
            f"(Linear, Conv, Embedding); accepted: a regex matched in full against module names, or a list of "
            f"name suffixes; e.g. {', '.join(picks or names[:3])} (of {len(names)} such layers)")


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules, dropout: float = 0.0, seed: int = 0):
    """Freeze ``unet`` and add LoRA adapters (B = 0, so the model starts at the pretrained one).
    ``target_modules`` matching no adaptable layer is a :class:`ConfigError`, raised before any change."""
    from peft import LoraConfig, inject_adapter_in_model

    if not lora_targets(unet, target_modules):
        raise ConfigError(no_lora_target_message(unet, target_modules))
    unet.requires_grad_(False)
    _LORA_LAYERS.pop(unet, None)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                     target_modules=target_modules, init_lora_weights=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, unet)
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError(f"model.lora.target_modules matched no layer of the UNet (got {target_modules!r})")
    return cfg


class DiffusersScore(ScoreModel):
    """A diffusers UNet as a noise predictor at discrete timesteps."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, sample_shape, conditioning: str = "none",
                 prediction_type: str = "epsilon", precision: str = "fp32", max_batch: int = 64,
                 batch_roles: bool = False):
        super().__init__()
        if conditioning not in ("none", "text", "class"):
            raise ValueError(f"conditioning must be none, text or class (got {conditioning!r})")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"model prediction_type {prediction_type!r} is not supported; accepted: epsilon, "
                              f"v_prediction")
        self.unet = unet
        self.schedule = schedule
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.conditioning, self.prediction_type = conditioning, prediction_type
        self.precision = precision
        self.max_batch = int(max_batch)
        self.batch_roles = bool(batch_roles)  # views under different conditions share one UNet call (eps_many)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _autocast(self, device: torch.device):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=DTYPES[self.precision])

    @staticmethod
    def _cycle(c, n: int, offset: int = 0, device=None) -> torch.Tensor:
        """The condition of rows ``offset .. offset + n - 1``: a :class:`PromptTable`'s drawn prompts,
        else ``P`` conditions cycling over the rows (by their index in the whole batch)."""
        if isinstance(c, PromptTable):
            return c.rows(n, offset, device)
        c = c.to(device) if device is not None else c
        if c.shape[0] == n and offset == 0 or c.shape[0] == 1:
            return c if c.shape[0] == n else c.expand(n, *c.shape[1:])
        return c[(torch.arange(n, device=c.device) + offset) % c.shape[0]]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, c, offset: int = 0) -> torch.Tensor:
        n = x.shape[0]
        if self.conditioning == "text":
            if c is None:
                raise ValueError("a text-conditioned UNet needs text embeddings as its condition")
            out = self.unet(x, t, encoder_hidden_states=self._cycle(c, n, offset, x.device)).sample
        elif self.conditioning == "class":
            if c is None:
                raise ValueError("a class-conditional UNet needs class labels as its condition")
            out = self.unet(x, t, class_labels=self._cycle(c, n, offset, x.device)).sample
        else:
            out = self.unet(x, t).sample
        return out[:, : x.shape[1]]  # models that also predict a variance: keep the noise part

    def eps(self, x, t, cond=None):
        dev = self.device
        t = self._timesteps(t, x).to(dev)
        xin = x.to(dev, torch.float32)
        outs = []
        with self._autocast(dev):
            for s in range(0, xin.shape[0], self.max_batch):
                xs, ts = xin[s:s + self.max_batch], t[s:s + self.max_batch]
                if isinstance(cond, Guidance):
                    c = cond.cond
                    if cond.plain():
                        e = self._forward(xs, ts, c, s)
                    else:
                        both = self._forward(torch.cat([xs, xs]), torch.cat([ts, ts]),
                                             torch.cat([self._cycle(cond.uncond, len(xs), s, dev),
                                                        self._cycle(c, len(xs), s, dev)]))
                        e_u, e_c = both.chunk(2)
                        e = e_u + cond.scale * (e_c - e_u)
                else:
                    e = self._forward(xs, ts, cond, s)
                outs.append(e.float())
        return self.output_to_eps(torch.cat(outs), t, xin).to(x.device, x.dtype)

    def output_to_eps(self, e: torch.Tensor, t: torch.Tensor, xin: torch.Tensor) -> torch.Tensor:
        """The UNet's output as a noise prediction (v-prediction: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``)."""
        if self.prediction_type == "v_prediction":
            a = self.schedule.abar_at(t, xin)
            e = a.sqrt() * e + (1 - a).sqrt() * xin
        return e


def _slot(uniq: list, c) -> int:
    for j, u in enumerate(uniq):
        if u is c or (isinstance(u, torch.Tensor) and isinstance(c, torch.Tensor) and u.shape == c.shape
                      and torch.equal(u.to(c.device), c)):
            return j
    uniq.append(c)
    return len(uniq) - 1


def eps_many(base: "DiffusersScore", x: torch.Tensor, t: torch.Tensor, conds: list) -> list[torch.Tensor]:
    """``base.eps(x, t, c)`` for every condition in ``conds`` (a tensor or a :class:`Guidance`) with one
    UNet call per chunk: the distinct conditions (guidance's unconditional one counted once) are stacked
    along the batch, so a target of k roles costs one call of ``(distinct conditions) x n`` rows."""
    dev = base.device
    t = base._timesteps(t, x).to(dev)
    xin = x.to(dev, torch.float32)
    uniq: list = []
    plan = []
    for c in conds:
        if isinstance(c, Guidance) and not c.plain():
            plan.append((_slot(uniq, c.uncond), _slot(uniq, c.cond), float(c.scale)))
        else:
            plan.append((_slot(uniq, c.cond if isinstance(c, Guidance) else c), None, 1.0))
    r, n = len(uniq), xin.shape[0]
    per = max(1, base.max_batch // r)
    outs: list = [[] for _ in conds]
    with base._autocast(dev):
        for s in range(0, n, per):
            xs, ts = xin[s:s + per], t[s:s + per]
            m = xs.shape[0]
            rows = torch.cat([base._cycle(u, m, s, dev) for u in uniq])
            e = base._forward(xs.repeat(r, *([1] * (xs.ndim - 1))), ts.repeat(r), rows).float().view(r, m, *xs.shape[1:])
            for i, (a, b, scale) in enumerate(plan):
                outs[i].append(e[a] if b is None else e[a] + scale * (e[b] - e[a]))
    return [base.output_to_eps(torch.cat(o), t, xin).to(x.device, x.dtype) for o in outs]


class ConditionedView(ScoreModel):
    """A :class:`DiffusersScore` with a fixed condition; ``adapters=False`` runs the base weights."""

    def __init__(self, base: DiffusersScore, cond=None, adapters: bool = True, name: str = ""):
        super().__init__()
        self.base = base
        self.cond = cond
        self.adapters = adapters
        self.name = name
        self.schedule = base.schedule
        self.sample_shape = base.sample_shape
        self.max_batch = base.max_batch

    def eps(self, x, t, cond=None):
        if self.adapters:
            return self.base.eps(x, t, self.cond)
        with adapters_disabled(self.base.unet):
            return self.base.eps(x, t, self.cond)

    def trainable_parameters(self):
        return [p for p in self.base.parameters() if p.requires_grad] if self.adapters else []

    def condition_tables(self) -> list:
        return condition_tables(self.cond)

    def batch_key(self):
        if not self.base.batch_roles or self.cond is None or self.base.conditioning == "none":
            return None
        return (id(self.base), self.adapters)

    def eps_views(self, views: list, x, t) -> list:
        """Several views of this base (same adapters setting) in one UNet call per chunk."""
        conds = [v.cond for v in views]
        if self.adapters:
            return eps_many(self.base, x, t, conds)
        with adapters_disabled(self.base.unet):
            return eps_many(self.base, x, t, conds)

    def with_cond(self, cond, name: str = "") -> "ConditionedView":
        return ConditionedView(self.base, cond, self.adapters, name)

    def trainable_state(self) -> dict:
        """The trainable part only (LoRA adapters, or the whole UNet when fine-tuned)."""
        return {k: v.detach().cpu() for k, v in self.base.named_parameters() if v.requires_grad}


def recondition(model, cond):
    """``model`` under another condition: a view of the UNet takes the new condition; the RU composition
    ``(eps_pre - sum_i mu_i eps_i) / (1 - mu_bar)`` takes it in its pretrained term (the concepts keep
    theirs). None for anything else (a model that takes no condition)."""
    if isinstance(model, ConditionedView):
        return model.with_cond(cond, model.name)
    if isinstance(model, ComposedScore) and isinstance(model.models[0], ConditionedView):
        return ComposedScore([recondition(model.models[0], cond), *model.models[1:]], model.weights)
    return None
