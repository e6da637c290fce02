"""The interface every attack implements, and its registry (``attack.kind`` picks the class)."""
from __future__ import annotations

from omegaconf import DictConfig

from ..config import ConfigError

ATTACKS: dict[str, type["Attack"]] = {}


class AttackError(ConfigError):
    """An attack that cannot run on this run directory or with these settings: one line, exit 2."""


def _import_builtin() -> None:
    import importlib
    import pkgutil

    from .. import attacks as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in ("base", "target", "run", "report"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def attack_class(kind) -> type["Attack"]:
    _import_builtin()
    if str(kind) not in ATTACKS:
        raise AttackError(f"attack.kind must be one of {sorted(ATTACKS)} (got {kind!r})")
    return ATTACKS[str(kind)]


class Attack:
    """One attack: :meth:`run` on one side (``"pretrained"`` or ``"unlearned"``) of an
    :class:`~unlearn.attacks.target.AttackTarget`, then :meth:`compare` the two sides."""

    kind: str = ""

    def __init_subclass__(cls, kind: str = "", **kw):
        super().__init_subclass__(**kw)
        if kind:
            cls.kind = kind
            ATTACKS[kind] = cls

    def __init__(self, cfg: DictConfig, show_progress: bool = True):
        self.validate(cfg)
        self.cfg, self.show = cfg, show_progress

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        """Checks of ``cfg.attack`` that need no model (one :class:`AttackError` line each)."""

    def cannot_run(self, target) -> str | None:
        """Why this attack cannot run on ``target`` (one line), or None."""
        return None

    def run(self, target, side: str) -> dict:
        raise NotImplementedError

    def compare(self, pretrained: dict, unlearned: dict) -> dict:
        """The headline numbers of both sides and the sanity check (the attack recovers the concept on
        the pretrained model)."""
        raise NotImplementedError


def number(cfg, key: str, kind=float, low=None, what: str | None = None):
    """``cfg[key]`` as ``kind`` with ``value >= low``, else one :class:`AttackError` line."""
    v = cfg[key]
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (kind is float or float(v).is_integer())
    if ok and low is not None:
        ok = kind(v) >= low
    if not ok:
        raise AttackError(f"attack.{key} must be {what or ('a number' if kind is float else 'an integer')}"
                          f"{'' if low is None else f' >= {low}'} (got {v!r})")
    return kind(v)


def step_counts(cfg, what: str) -> list[int]:
    """``cfg.steps``: a non-empty list of step counts >= 0 (after which the attack measures), else one line."""
    steps = cfg.steps
    try:
        ok = len(steps) > 0 and all(not isinstance(v, bool) and int(v) == v and v >= 0 for v in steps)
    except TypeError:
        ok = False
    if not ok:
        raise AttackError(f"attack.steps must be a list of {what} step counts >= 0 (got {steps!r})")
    return sorted({int(v) for v in steps})


def positive(cfg, key: str) -> float:
    """``cfg[key]`` as a number > 0 (a learning rate), else one :class:`AttackError` line."""
    v = number(cfg, key, float, 0)
    if not v > 0:
        raise AttackError(f"attack.{key} must be > 0 (got {cfg[key]})")
    return v
