"""The metric suite: built from ``cfg.metrics``, evaluated on an :class:`EvalContext`.

The metrics themselves are :class:`~unlearn.metrics.base.Metric` subclasses registered by name
(the built-in ones in ``kid.py``, ``sscd.py``, ``clip.py``, ``kl.py``, ``likelihood.py``); the
suite knows none of them by name. It imports ``unlearn/metrics/<name>.py`` once for each metric
block of ``configs/metrics/default.yaml`` (loaded as :data:`DEFAULTS`, the one source of the
defaults), whose classes register themselves; registered metrics the file does not list add the
``defaults`` of their class. See the package docstring (:mod:`unlearn.metrics`) for the API and
the result format.
"""
from __future__ import annotations

import copy
import importlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from . import weights as W
from .base import Checks, Metric, Skip, Weights, metric_class, protocol_id, registered
from .context import EvalContext
from .images import save_image_grid
from .kid import retain_set

logger = logging.getLogger("unlearn.metrics")

DEFAULTS_FILE = Path(__file__).resolve().parents[2] / "configs" / "metrics" / "default.yaml"
ENABLED = ("auto", "true", "false")
_Skip = Skip  # the former private name

__all__ = ["DEFAULTS", "NAMES", "IMAGE_METRICS", "EvalContext", "MetricSuite", "metrics_config",
           "validate_metrics_config", "metric_names", "protocol_id"]


def load_defaults(path: str | Path = DEFAULTS_FILE) -> dict:
    """The ``metrics`` config group file as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


DEFAULTS: dict = load_defaults()  # configs/metrics/default.yaml: the one source of the defaults


def _is_metric_block(block) -> bool:
    return isinstance(block, dict) and "enabled" in block


def _import_listed_metrics() -> None:
    """Import ``unlearn/metrics/<name>.py`` for each metric block of ``configs/metrics/default.yaml``
    (the modules register their classes); a block without its module or class is an ImportError."""
    for n, block in DEFAULTS.items():
        if not _is_metric_block(block):
            continue
        try:
            importlib.import_module(f"{__package__}.{n}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{n}":
                raise
            raise ImportError(f"{DEFAULTS_FILE} has a block for metric {n!r} but there is no module "
                              f"unlearn/metrics/{n}.py") from None
        if n not in registered():
            raise ImportError(f"unlearn/metrics/{n}.py registers no metric named {n!r} "
                              f"(class ...(Metric, name={n!r}))")


_import_listed_metrics()


def metric_names(cfg=None) -> list[str]:
    """Registered metrics in config order: those of ``configs/metrics/default.yaml`` as listed there,
    then the others in registration order; with ``cfg``, only those with a block in it."""
    reg = registered()
    names = [n for n, block in DEFAULTS.items() if _is_metric_block(block) and n in reg] + [n for n in reg if n not in DEFAULTS]
    return names if cfg is None else [n for n in names if n in cfg]


NAMES = tuple(metric_names())                                    # the built-in metrics
IMAGE_METRICS = tuple(n for n in NAMES if metric_class(n).weights)  # those with feature-model weights


# -- config ------------------------------------------------------------------------------------
def _schema() -> dict:
    """:data:`DEFAULTS` plus the block of every registered metric it does not list."""
    base = copy.deepcopy(DEFAULTS)
    for n, cls in registered().items():
        if n not in base:
            base[n] = cls.config_block()
    return base


def metrics_config(cfg=None):
    """``cfg`` (a ``metrics`` block, dict or DictConfig, possibly partial) merged over the defaults
    (:data:`DEFAULTS` and the blocks of registered metrics) and validated; unknown keys and bad
    values raise :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.create(_schema())
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, cfg if cfg is not None else {})
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"metrics: unknown or invalid key {key!r}; accepted keys: see configs/metrics/default.yaml") \
            from None
    validate_metrics_config(merged)
    return merged


def validate_metrics_config(m) -> None:
    """One-line :class:`ConfigError` naming the first bad key: the suite's keys, then each metric's
    ``enabled`` and its own :meth:`Metric.validate`."""
    check = Checks(m)
    names = metric_names(m)
    for n in names:
        check.one_of(f"{n}.enabled", ENABLED, lower=True)
    check.one_of("download", ENABLED, lower=True)
    for key, cast, lo in (("eval_every", int, 0), ("download_timeout", float, 0.1), ("batch_size", int, 1),
                          ("seed", int, None), ("num_images", int, 1), ("max_grid_images", int, 1),
                          ("retain.factor", float, 0.0)):
        check.number(key, cast, lo)
    check.one_of("retain.source", ("samples", "data"), default="samples")
    check.one_of("retain.score", ("likelihood", "clip"))
    for n in names:
        metric_class(n).validate(Checks(m[n], f"metrics.{n}"))


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# -- the suite ---------------------------------------------------------------------------------
class MetricSuite:
    """The registered metrics (KID, SSCD, CLIP, KL to the pretrained model, expected likelihood, ...), as configured.

    Build with :meth:`from_config`; call :meth:`check_available` before training (it loads the
    feature models, warns once per missing metric, and raises :class:`ConfigError` under
    ``metrics.strict``); call :meth:`evaluate` when :meth:`due`.
    """

    def __init__(self, cfg, image_model: bool = True, given: dict[str, Any] | None = None):
        self.cfg = cfg
        self.image_model = bool(image_model)
        self.strict = bool(cfg.strict)
        dev = str(cfg.device)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else torch.device(dev)
        self.metrics: dict[str, Metric] = {n: metric_class(n)(cfg, self.device) for n in metric_names(cfg)}
        self._loaded: dict[str, Any] = {}
        self._records: dict[str, dict] = {}
        self._missing: dict[str, str] = {}
        for name, obj in (given or {}).items():
            if name not in self.metrics:
                raise KeyError(f"an object was given for metric {name!r}, which is not registered "
                               f"(registered: {', '.join(self.metrics)})")
            self._set(name, self.metrics[name].given(obj))
        self.last_images: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg=None, *, image_model: bool = True, given: dict[str, Any] | None = None,
                    **objects) -> "MetricSuite":
        """``cfg``: the ``metrics`` block (``cfg.metrics``), a dict, or None for the defaults.

        ``image_model``: whether the model family produces images; ``enabled: auto`` metrics are
        on only for image models. ``given``: ``{metric: object}`` replacing what a metric would
        load (tests, custom extractors); the same by keyword, under the metric's name or its
        ``given_keyword``: ``kid_feature=``, ``sscd_descriptor=``, ``clip_scorer=`` (None: not given).
        """
        return cls(metrics_config(cfg), image_model, {**_given_by_keyword(objects), **(given or {})})

    # -- configuration -------------------------------------------------------------------------
    def is_enabled(self, name: str) -> bool:
        e = str(self.cfg[name].enabled).lower()
        if e == "auto":
            return self.image_model or not self.metrics[name].image_only
        return e == "true"

    @property
    def enabled(self) -> list[str]:
        return [n for n in self.metrics if self.is_enabled(n)]

    def due(self, step: int, final: bool = False) -> bool:
        """Whether to evaluate after ``step`` (every ``eval_every`` steps; always at the end)."""
        every = int(self.cfg.eval_every)
        return bool(self.enabled) and (final or (every > 0 and step > 0 and step % every == 0))

    # -- weights -------------------------------------------------------------------------------
    def _set(self, name: str, w: Weights) -> None:
        self._loaded[name] = w.obj
        if w.record is not None:
            self._records[name] = w.record

    def _load(self, name: str) -> Weights:
        """What metric ``name`` loads (once); raises WeightsUnavailable, warned once per metric and process."""
        if name not in self._loaded:
            if name in self._missing:
                raise W.WeightsUnavailable(self._missing[name])
            try:
                self._set(name, self.metrics[name].load())
            except W.WeightsUnavailable as e:
                self._missing[name] = str(e)
                W.warn_missing(name, str(e))
                raise
        return Weights(self._loaded[name], self._records.get(name))

    def check_available(self) -> dict[str, str]:
        """Load the feature model of every enabled metric; return ``{metric: reason}`` for the missing.

        Each missing metric is warned about once per process. With ``metrics.strict=true`` any
        missing metric raises :class:`ConfigError` (call this before training starts).
        """
        missing = {}
        for n in self.enabled:
            try:
                self._load(n)
            except W.WeightsUnavailable as e:
                missing[n] = str(e)
        if missing and self.strict:
            raise ConfigError("metrics.strict=true and metric weights are missing: "
                              + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        return missing

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, ctx: EvalContext, show_progress: bool = False, desc: str = "metrics") -> dict:
        """``{metric: result}`` for every enabled metric.

        A result is ``{"status": "ok", "value": ..., <details>, "protocol": {...}, "seconds": ...}``,
        ``{"status": "missing", "reason": ...}`` (weights not available),
        ``{"status": "skipped", "reason": ...}`` (the context lacks the inputs) or
        ``{"status": "error", "reason": ...}`` (an exception; re-raised under ``metrics.strict``).
        """
        self.last_images = {}
        seed = int(ctx.seed if ctx.seed is not None else self.cfg.seed)
        from ..utils import progress

        bar = progress(list(self.enabled), desc=desc, enabled=show_progress)
        out = {}
        for n in bar:
            bar.set_postfix_str(n, refresh=True)
            out[n] = self._evaluate_one(n, ctx, seed)
        return out

    def _evaluate_one(self, name: str, ctx: EvalContext, seed: int) -> dict:
        metric = self.metrics[name]
        t0 = time.perf_counter()
        try:
            weights = self._load(name)
            why = metric.missing_input(ctx)
            if why:
                raise Skip(why)
            r = metric.evaluate(ctx, weights, seed)
            for k, imgs in r.images.items():
                self.last_images.setdefault(k, imgs)
            proto = dict(r.protocol)
            proto["step"] = ctx.step
            proto["id"] = protocol_id({k: v for k, v in proto.items() if k != "step"})
            res = {"value": r.value, **r.details, "protocol": proto}
            return {"status": "ok", **_jsonable(res), "seconds": round(time.perf_counter() - t0, 3)}
        except W.WeightsUnavailable as e:
            if self.strict:
                raise ConfigError(f"metrics.strict=true and the weights of metric '{name}' are missing: {e}") from None
            return {"status": "missing", "reason": str(e)}
        except Skip as e:
            return {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - one broken metric must not end a run, unless strict
            if self.strict:
                raise
            logger.exception("metric '%s' failed", name)
            return {"status": "error", "reason": f"{type(e).__name__}: {e}"}

    # -- retain sets, outputs ------------------------------------------------------------------
    def retain_set(self, images: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The paper's retain set: pretrained ``images`` whose unlearn-concept ``scores`` are below
        ``metrics.retain.factor`` times their mean (see :func:`unlearn.metrics.kid.retain_mask`)."""
        kept, info = retain_set(images, scores, float(self.cfg.retain.factor))
        info["score"] = str(self.cfg.retain.score)
        return kept, info

    def save_images(self, out_dir: str | Path, prefix: str = "") -> list[Path]:
        """Save the images of the last :meth:`evaluate` as PNG grids ``<prefix><name>.png``."""
        if not bool(self.cfg.save_images):
            return []
        paths = []
        for name, imgs in self.last_images.items():
            if imgs is not None and len(imgs):
                paths.append(save_image_grid(imgs, Path(out_dir) / f"{prefix}{name}.png",
                                             max_images=int(self.cfg.max_grid_images)))
        return paths

    @staticmethod
    def scalars(results: dict) -> dict[str, float]:
        """Flat numbers for ``metrics.jsonl`` / W&B: only metrics with status ``ok`` (each metric's
        :meth:`Metric.scalars`)."""
        reg = registered()
        out = {}
        for n, r in results.items():
            if r.get("status") == "ok":
                out.update(reg[n].scalars(r) if n in reg else {n: r["value"]})
        return out

    @staticmethod
    def statuses(results: dict) -> dict[str, str]:
        return {n: r.get("status", "?") for n, r in results.items()}


def _given_by_keyword(objects: dict) -> dict:
    """``{metric: object}`` from keywords naming a metric or its ``given_keyword``; None values are not given."""
    by_kw = {cls.given_keyword: n for n, cls in registered().items() if cls.given_keyword}
    out = {}
    for kw, obj in objects.items():
        name = by_kw.get(kw, kw)
        if name not in registered():
            raise TypeError(f"MetricSuite.from_config() got an unexpected keyword argument {kw!r} "
                            f"(objects are given as <metric>= or {', '.join(f'{k}=' for k in by_kw)})")
        if obj is not None:
            out[name] = obj
    return out
