"""Trainable conditions of a diffusers UNet: what an adversarial-prompt attack optimises.

:class:`SoftTextPrompt`: the input token embeddings of a text prompt (every position of the
tokenizer's context), passed through the frozen text encoder, so the UNet sees encoder states of
a prompt no tokenizer can write. :class:`SoftClassLabel`: a class embedding vector of a
class-conditional UNet, read through an extra label one past the embedding table.

Both hand out ``condition(guided)``: the condition a :class:`~unlearn.models.diffusers_models.ConditionedView`
takes (a :class:`Guidance` with the null condition at the model's guidance scale, or the plain
conditional one), differentiable in :meth:`parameters`. ``close()`` removes what they hooked.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .diffusers_models import Guidance


class SoftCondition:
    """A trainable condition started at ``origin`` (the retain condition's values). ``project(radius)``
    keeps each row (a token's embedding, the class vector) within ``radius`` times its starting norm of
    where it started: a perturbation budget, as adversarial training states its threat model."""

    kind: str = ""
    origin: list[torch.Tensor]

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _set_origin(self) -> None:
        self.origin = [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def project(self, radius: float | None) -> None:
        """Each row of every parameter back into the L2 ball of ``radius`` times its starting norm
        around its start (``None``: unbounded)."""
        if radius is None:
            return
        for p, o in zip(self.parameters(), self.origin):
            d = p - o
            cap = float(radius) * o.norm(dim=-1, keepdim=True)
            p.copy_(o + d * (cap / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))

    @torch.no_grad()
    def distance(self) -> float:
        """The largest row's distance from its start, relative to its starting norm."""
        return max(float(((p - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12)).max())
                   for p, o in zip(self.parameters(), self.origin))

    def condition(self, guided: bool = True):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


class SoftTextPrompt(SoftCondition):
    """``prompt``'s token embeddings (1, L, D) as the trainable parameter; the text encoder's token
    embedding layer is hooked to return them while :meth:`condition` encodes."""

    kind = "text token embeddings"

    def __init__(self, tokenizer, text_encoder, prompt: str, null_cond: torch.Tensor, scale: float, dtype):
        self.text_encoder, self.prompt, self.null, self.scale, self.dtype = text_encoder, prompt, null_cond, scale, dtype
        dev = next(text_encoder.parameters()).device
        self.ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(dev)
        self.layer = text_encoder.get_input_embeddings()
        with torch.no_grad():
            init = self.layer(self.ids).float()
        self.tokens = nn.Parameter(init.clone())
        self._set_origin()

    def parameters(self):
        return [self.tokens]

    def condition(self, guided: bool = True):
        handle = self.layer.register_forward_hook(lambda mod, args, out: self.tokens.to(out.dtype))
        try:
            states = self.text_encoder(self.ids)[0].to(self.dtype)
        finally:
            handle.remove()
        return Guidance(states, self.null, self.scale) if guided else states

    def describe(self) -> dict:
        return {"kind": self.kind, "init": self.prompt, "shape": list(self.tokens.shape)}


class SoftClassLabel(SoftCondition):
    """A class embedding vector, initialised at label ``init``'s row, read through a label past the
    UNet's embedding table. One pair of hooks per embedding serves every soft label on it (each its own
    label): the lookup sees those labels clamped into the table, and their rows get their vectors."""

    kind = "class embedding"

    def __init__(self, unet, init: int, null: int, scale: float):
        emb = unet.class_embedding
        self.emb, self.init, self.null, self.scale = emb, int(init), int(null), float(scale)
        self.vector = nn.Parameter(emb.weight[self.init].detach().float().clone())
        self._set_origin()
        self.slot = _SoftLabels.of(emb).add(self)

    def parameters(self):
        return [self.vector]

    def condition(self, guided: bool = True):
        label = torch.tensor([self.slot])
        return Guidance(label, torch.tensor([self.null]), self.scale) if guided else label

    def describe(self) -> dict:
        return {"kind": self.kind, "init_label": self.init, "dim": int(self.vector.numel())}

    def close(self) -> None:
        _SoftLabels.of(self.emb).remove(self)


class _SoftLabels:
    """The soft labels registered on one embedding module and its two hooks."""

    _all: "weakref.WeakKeyDictionary" = None

    @classmethod
    def of(cls, emb) -> "_SoftLabels":
        if cls._all is None:
            cls._all = weakref.WeakKeyDictionary()
        if emb not in cls._all:
            cls._all[emb] = cls(emb)
        return cls._all[emb]

    def __init__(self, emb):
        self.emb, self.labels, self.hooks, self._masks = emb, {}, [], None

    def add(self, soft) -> int:
        slot = int(self.emb.num_embeddings) + max([-1, *(s - int(self.emb.num_embeddings) for s in self.labels)]) + 1
        self.labels[slot] = soft
        if not self.hooks:
            self.hooks = [self.emb.register_forward_pre_hook(self._pre), self.emb.register_forward_hook(self._post)]
        return slot

    def remove(self, soft) -> None:
        self.labels = {k: v for k, v in self.labels.items() if v is not soft}
        if not self.labels:
            for h in self.hooks:
                h.remove()
            self.hooks = []

    def _pre(self, mod, args):
        labels = args[0]
        self._masks = [(labels == slot, soft) for slot, soft in self.labels.items()]
        return (labels.clamp(max=int(self.emb.num_embeddings) - 1),) + tuple(args[1:])

    def _post(self, mod, args, out):
        masks, self._masks = self._masks or [], None
        for mask, soft in masks:
            if bool(mask.any()):
                out = torch.where(mask[:, None], soft.vector.to(out.dtype)[None], out)
        return out


def check_radius(value, key: str, error=None) -> float | None:
    """A perturbation budget for :meth:`SoftCondition.project`: ``None`` (unbounded) or a number > 0 as a
    float, else one ``error`` line (default :class:`~unlearn.config.ConfigError`) naming ``key``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        from ..config import ConfigError

        raise (error or ConfigError)(f"{key} must be null (unbounded) or a number > 0 (got {value!r})")
    return float(value)


@contextlib.contextmanager
def weights_fixed(model):
    """``model``'s trainable weights without gradients inside (only a soft condition learns), restored after."""
    weights = [p for p in model.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in weights:
            p.requires_grad_(True)


def ascent_step(model, soft: SoftCondition, log_prob, sampler, batch: int, generator, opt,
                radius: float | None = None) -> float:
    """One Adam step of ``soft`` raising ``log_prob`` (the judge's concept score) of ``model``'s samples
    under it, through ``sampler`` (a few deterministic steps, differentiated end to end), projected back
    into its ``radius`` (:meth:`SoftCondition.project`). Returns the loss."""
    from .diffusers_models import recondition

    view = recondition(model, soft.condition(guided=True))
    x0 = sampler.sample(view, int(batch), generator, grad=True).x0
    loss = -log_prob(x0).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    soft.project(radius)
    return float(loss.detach())
