"""A model family: how to get its components, encode a condition, call the network, build the
roles the formulations need and export what was trained. Families register under the name that
``model.family`` gives; the config picks the class, no code branches on the name.

A new family is one module with a subclass of :class:`Family` decorated with
``@register_family("name")`` (imported in :mod:`unlearn.families`), a ``configs/model/<name>.yaml``
with ``family: name``, and nothing else: the contract battery in ``tests/test_contract.py`` runs it
with every registered formulation and method.
"""
from __future__ import annotations

from typing import ClassVar

from omegaconf import DictConfig

from ..config import ConfigError
from ..setup import UnlearningSetup

FAMILIES: dict[str, type["Family"]] = {}

# what a formulation can ask of a family (``Formulation.needs``)
NEEDS = frozenset({"concepts", "forget_sets"})


def register_family(name: str):
    """Class decorator: ``model.family: <name>`` selects the class."""

    def deco(cls):
        cls.name = name
        FAMILIES[name] = cls
        return cls
    return deco


def family_class(name) -> type["Family"]:
    from . import builtin  # noqa: F401  (the families shipped with the package register themselves)

    if str(name) not in FAMILIES:
        raise ConfigError(f"model.family must be one of {sorted(FAMILIES)} (got {name!r})")
    return FAMILIES[str(name)]


class Family:
    """Builds the :class:`~unlearn.setup.UnlearningSetup` of one model config.

    ``needs``: what the formulation asks for (:data:`NEEDS`): ``concepts`` -- one score model per
    concept ``q_i`` (RU, LU); ``forget_sets`` -- samples of each ``q_i`` (FU). A family builds only
    what is needed (e.g. the pixel DDPM fine-tunes its concept models only for ``concepts``).
    """

    name: ClassVar[str] = ""
    double: ClassVar[str | None] = None  # the model config of its offline double (the contract battery runs it)

    def __init__(self, cfg: DictConfig, needs: frozenset = frozenset(), show_progress: bool = True):
        self.validate(cfg.model)
        unknown = set(needs) - NEEDS
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        self.cfg, self.m, self.needs, self.show = cfg, cfg.model, frozenset(needs), show_progress

    @classmethod
    def validate(cls, m: DictConfig) -> None:
        """Checks of ``cfg.model`` that need no weights (one-line :class:`ConfigError` each)."""

    @classmethod
    def concept_count(cls, m: DictConfig) -> int | None:
        """The number of concepts ``q_i`` that ``cfg.model`` lists, where known before the model is
        built (None: only the built model knows, e.g. concepts fitted to forget sets)."""
        return None

    def setup(self) -> UnlearningSetup:
        raise NotImplementedError


def build_setup(cfg: DictConfig, needs: frozenset, show_progress: bool = True) -> UnlearningSetup:
    """The setup of ``cfg.model`` for a formulation that needs ``needs``."""
    return family_class(cfg.model.family)(cfg, needs, show_progress).setup()
