"""The interface of a method: how an unlearning problem (a formulation) is solved.

A formulation holds its constraints, their estimates, its Lagrangian and its exact target; a
method decides whether the multipliers move (dual ascent) or stay fixed, how they are built from
``cfg.method`` and which primal the formulation runs: the minimiser of its Lagrangian, or the
distillation of a fixed target (the ESD-style baseline). ``configs/method/<name>.yaml`` names the
class (``_target_: unlearn.methods.<module>.<Class>``); a subclass with a ``name`` registers itself
in :data:`METHODS`, so a new baseline is one module and one YAML file.

``method.multiplier`` (fixed weights) is validated in one place, :meth:`Method.fixed_values`,
with the formulation's own hook :meth:`~unlearn.formulations.base.Formulation.check_multipliers`
(e.g. RU's ``sum < 1``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

if TYPE_CHECKING:
    from ..dual import Multipliers
    from ..formulations.base import Formulation

METHODS: dict[str, type["Method"]] = {}


class Method:
    """One way of solving a formulation (subclasses set ``name`` and register themselves)."""

    name: str = ""
    learnable: bool = False  # the multipliers move (dual ascent) or stay where method.multiplier puts them
    target_distillation: bool = False  # the primal distils a fixed target instead of minimising the Lagrangian

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            METHODS[cls.name] = cls

    def __init__(self, cfg: DictConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})

    @property
    def label(self) -> str:
        """The name the config gives (``method.name``; e.g. ``baseline`` for the method it resolves to)."""
        return str(self.cfg.get("name") or self.name)

    def resolve(self, formulation_cls: type["Formulation"]) -> "Method":
        """The method that actually runs on ``formulation_cls`` (itself; a paper baseline delegates)."""
        return self

    def check_config(self, cfg: DictConfig, formulation_cls: type["Formulation"]) -> None:
        """Checks that need no model, run before any pretraining (``cfg``: the whole config)."""

    def build_multipliers(self, formulation: "Formulation") -> "Multipliers":
        raise NotImplementedError

    # -- fixed weights (method.multiplier) ---------------------------------------------------------
    def to_multipliers(self, formulation_cls: type["Formulation"], values: torch.Tensor) -> torch.Tensor:
        """The formulation's multipliers for the configured weights (default: the weights themselves)."""
        return values

    def fixed_values(self, formulation_cls: type["Formulation"], count: int | None = None) -> torch.Tensor:
        """``method.multiplier`` checked and as the formulation's multipliers: a number ``>= 0`` (every
        constraint gets it) or one per constraint (``count``, where known), then the formulation's own
        check (:meth:`~unlearn.formulations.base.Formulation.check_multipliers`)."""
        v = self.cfg.multiplier  # declared by every fixed-weight method's YAML (null: not set)
        if v is None:
            raise ConfigError(f"method.multiplier must be set for method={self.label} "
                              f"(a number >= 0, or one per constraint)")
        vals = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        vals = vals if isinstance(vals, list) else [vals]
        try:
            vals = [float(x) for x in vals]
        except (TypeError, ValueError):
            raise ConfigError(f"method.multiplier must be a number or a list of numbers (got {v!r})") from None
        if any(x < 0 for x in vals):
            raise ConfigError(f"method.multiplier must be >= 0 (got {vals})")
        t = torch.as_tensor(vals, dtype=torch.float32)
        if count is not None:
            if t.numel() == 1:
                t = t.expand(count).clone()
            if t.numel() != count:
                raise ConfigError(f"method.multiplier must be one number or a list of {count} (got {t.numel()})")
        t = self.to_multipliers(formulation_cls, t)
        formulation_cls.check_multipliers(t, count)
        return t


def import_methods() -> None:
    import importlib
    import pkgutil

    from .. import methods as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "base":
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def method_class(name: str) -> type[Method]:
    """The registered method called ``name`` (every module of :mod:`unlearn.methods` is imported
    first: each registers its class, so a new method is one module and its config)."""
    import_methods()

    try:
        return METHODS[str(name)]
    except KeyError:
        raise ConfigError(f"method must be one of {sorted(METHODS)} (got {name!r})") from None


def build_method(method_cfg: DictConfig) -> Method:
    """The method ``cfg.method`` describes: its ``_target_`` class, else the registered ``name``."""
    from hydra.utils import get_class

    target = method_cfg.get("_target_")
    if target is None:
        return method_class(str(method_cfg.name))(method_cfg)
    try:
        cls = get_class(str(target))
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method._target_ must name a method class, e.g. unlearn.methods.constrained.DualAscentMethod "
                          f"(got {target!r})")
    return cls(method_cfg)
