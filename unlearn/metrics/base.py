"""The :class:`Metric` base class and the registry of metrics by name.

A metric is a subclass of :class:`Metric` registered by name with a class keyword::

    class Brightness(Metric, name="brightness"):
        needs = ("images",)                     # EvalContext fields; absent -> "skipped"

        def evaluate(self, ctx, weights, seed):
            return Result(float(ctx.images.mean()), {"n_images": len(ctx.images)})

Its config block is ``metrics.<name>`` - the block of ``configs/metrics/default.yaml`` for the
built-in metrics, or the class's :attr:`Metric.defaults` for a metric that has none there.
The suite (:mod:`unlearn.metrics.suite`) does the rest generically: loading once, ``missing``
/ ``skipped`` / ``error`` results, the protocol id, the scalars for ``metrics.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..config import ConfigError
from . import weights as W
from .context import EvalContext

_REGISTRY: dict[str, type["Metric"]] = {}


class Skip(Exception):
    """The context lacks what a metric needs (not an error: e.g. no prompts for CLIP)."""


class Weights(NamedTuple):
    """What :meth:`Metric.load` returns: the loaded object and its provenance record (``None`` for
    metrics without weights); the record is what protocols show as the weights."""

    obj: Any = None
    record: dict | None = None


@dataclass
class Result:
    """One evaluation: ``value``, the ``protocol`` that made it, extra numbers (``details``, stored
    next to ``value``) and images to save as PNG grids (``images``: name -> ``(N, 3, H, W)``)."""

    value: float
    protocol: dict
    details: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)


# -- registry ------------------------------------------------------------------------------------
def register(cls: type["Metric"]) -> type["Metric"]:
    """Register ``cls`` under ``cls.name`` (done by ``class X(Metric, name=...)``); a name taken by
    another class raises ``ValueError``."""
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"metric name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a metric from the registry (tests that define their own)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, type["Metric"]]:
    """``{name: class}`` of every registered metric, in registration order."""
    return dict(_REGISTRY)


def metric_class(name: str) -> type["Metric"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no metric named {name!r} (registered: {', '.join(_REGISTRY)})") from None


# -- config checks -------------------------------------------------------------------------------
class Checks:
    """Checks of one config block; each failure is a one-line :class:`ConfigError` naming ``<prefix>.<key>``."""

    def __init__(self, cfg, prefix: str = "metrics"):
        self.cfg, self.prefix = cfg, prefix

    def get(self, key: str):
        from omegaconf import OmegaConf

        return OmegaConf.select(self.cfg, key)

    def fail(self, key: str, message: str):
        raise ConfigError(f"{self.prefix}.{key} {message}")

    def number(self, key: str, cast=float, lo=None, allow_none: bool = False):
        v = self.get(key)
        if v is None and allow_none:
            return None
        try:
            v = cast(v)
        except (TypeError, ValueError):
            self.fail(key, f"must be a number (got {v!r})")
        if lo is not None and v < lo:
            self.fail(key, f"must be >= {lo} (got {v})")
        return v

    def one_of(self, key: str, options, lower: bool = False, default=None):
        v = self.get(key)
        v = default if v is None and default is not None else v
        s = str(v).lower() if lower else str(v)
        if s not in options:
            opts = list(options)
            self.fail(key, f"must be {', '.join(opts[:-1])} or {opts[-1]} (got {v!r})")
        return s


# -- provenance helpers --------------------------------------------------------------------------
def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_record(module: nn.Module) -> dict:
    """The provenance record of a feature module handed to the suite in code."""
    return {"source": "given", "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "state_sha256": module_fingerprint(module)}


def callable_name(f) -> str | None:
    if f is None:
        return None
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"


def protocol_id(protocol: dict) -> str:
    """A short hash of a protocol: equal ids, comparable numbers."""
    s = json.dumps(protocol, sort_keys=True, default=str)
    return hashlib.sha256(s.encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def versions() -> dict:
    """Versions of the libraries the protocols record."""
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("torchmetrics", "torch-fidelity", "open_clip_torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# -- the base class ------------------------------------------------------------------------------
class Metric:
    """One metric of the suite, built per suite with the merged ``metrics`` config.

    Class attributes (the declaration):

    * ``name`` - the config key and result key, set by ``class X(Metric, name="...")``.
    * ``needs`` - :class:`EvalContext` fields that must be present (not None, not empty); an entry
      that is a tuple of fields needs any one of them. Missing -> the result is ``skipped``.
    * ``weights`` - whether :meth:`load` fetches a feature model's weights.
    * ``image_only`` - ``enabled: auto`` turns the metric on for image models only (False: for
      every model).
    * ``given_keyword`` - the keyword of :meth:`MetricSuite.from_config` that hands the loaded
      object in code (besides the metric's name), e.g. ``kid_feature``.
    * ``defaults`` - the config block when ``configs/metrics/default.yaml`` has none for ``name``.

    Instance attributes: ``root`` (the whole ``metrics`` block), ``cfg`` (``metrics.<name>``),
    ``device`` (for feature models).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple] = ()
    weights: ClassVar[bool] = False
    image_only: ClassVar[bool] = True
    given_keyword: ClassVar[str | None] = None
    defaults: ClassVar[dict] = {"enabled": "auto"}

    def __init_subclass__(cls, name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if name is not None:
            cls.name = name
            register(cls)

    def __init__(self, root, device: torch.device):
        self.root, self.cfg, self.device = root, root[self.name], device

    # -- hooks -------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, check: Checks) -> None:
        """Check ``metrics.<name>`` (``check.cfg``) beyond its keys; ``enabled`` is checked by the suite."""

    def load(self) -> Weights:
        """Load the feature model; raise :class:`~unlearn.metrics.weights.WeightsUnavailable` with a
        one-line message naming the config key and file when it is not available."""
        if self.weights:
            raise NotImplementedError(f"metric {self.name!r} declares weights but no load()")
        return Weights()

    def given(self, obj) -> Weights:
        """An object handed in code in place of :meth:`load`'s (default: a module, moved to the device)."""
        return Weights(obj.eval().to(self.device), module_record(obj))

    def evaluate(self, ctx: EvalContext, weights: Weights, seed: int) -> Result:
        raise NotImplementedError

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        """Flat numbers of an ``ok`` result for ``metrics.jsonl`` / W&B (default: ``{name: value}``)."""
        return {cls.name: result["value"]}

    # -- used by the suite and by subclasses -------------------------------------------------------
    @classmethod
    def config_block(cls) -> dict:
        """The config block of a metric that ``configs/metrics/default.yaml`` does not list."""
        return {"enabled": "auto", **cls.defaults}

    def missing_input(self, ctx: EvalContext) -> str | None:
        """Why ``ctx`` cannot be evaluated (the first absent field of :attr:`needs`), or None."""
        for need in self.needs:
            fields = (need,) if isinstance(need, str) else tuple(need)
            if all(_absent(getattr(ctx, f)) for f in fields):
                alt = "".join(f" (or ctx.{f})" for f in fields[1:])
                return f"{self.name} needs ctx.{fields[0]}{alt}"
        return None

    def resolve(self, path, path_key: str, filename: str, url: str | None):
        """``(file, source)`` of a weight file: configured path, cache, or download (see :mod:`.weights`)."""
        c = self.root
        return W.resolve_weights(self.name, path=path, path_key=path_key, filename=filename, url=url,
                                 cache_dir=c.cache_dir, download_setting=c.download,
                                 timeout=float(c.download_timeout))


def _absent(v) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and not v)
