"""The metric suite: built from ``cfg.metrics``, evaluated on an :class:`EvalContext`.

See the package docstring (:mod:`unlearn.metrics`) for the API and the result format.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError
from ..models.base import ScoreModel
from ..samplers import GaussianSampler
from . import weights as W
from .clip import CLIPScorer, load_clip
from .divergence import expected_likelihood, kl_to_pretrained, sampler_protocol
from .images import check_images, save_image_grid
from .kid import INCEPTION_DIMS, INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, compute_kid, retain_set
from .sscd import (IMAGENET_MEAN, IMAGENET_STD, SSCD_FILENAME, SSCD_URL, SSCDPreprocess, denoising_sampler,
                   load_descriptor, pixel_decode, pixel_encode, sscd_protocol)

logger = logging.getLogger("unlearn.metrics")

NAMES = ("kid", "sscd", "clip", "kl", "likelihood")
IMAGE_METRICS = ("kid", "sscd", "clip")

DEFAULTS: dict = {
    "eval_every": 0,
    "strict": False,
    "download": "auto",
    "download_timeout": 20.0,
    "cache_dir": None,
    "device": "auto",
    "batch_size": 32,
    "seed": 0,
    "num_images": 256,
    "save_images": True,
    "max_grid_images": 64,
    "retain": {"source": "samples", "score": "likelihood", "factor": 1.0, "num_candidates": 512},
    "kid": {"enabled": "auto", "feature": "inception", "feature_dim": 2048, "inception_path": None,
            "subset_size": 1000, "num_subsets": 100, "image_size": None, "degree": 3, "coef": 1.0},
    "sscd": {"enabled": "auto", "path": None, "url": SSCD_URL, "resize": 288, "mean": list(IMAGENET_MEAN),
             "std": list(IMAGENET_STD), "timestep": 250, "seeds": [0],
             "denoise": {"kind": "ddpm", "variance": "posterior", "eta": 1.0, "num_steps": None}},
    "clip": {"enabled": "auto", "model": "ViT-B-32-quickgelu", "checkpoint": "openai", "reduction": "max"},
    "kl": {"enabled": "auto", "num_samples": 64, "batch_size": 16},
    "likelihood": {"enabled": "auto", "num_samples": 64, "batch_size": 16, "num_timesteps": 32, "num_noise": 1,
                   "antithetic": True},
}


class _Skip(Exception):
    """The context lacks what a metric needs (not an error: e.g. no prompts for CLIP)."""


# -- config ------------------------------------------------------------------------------------
def metrics_config(cfg=None):
    """``cfg`` (a ``metrics`` block, dict or DictConfig, possibly partial) merged over :data:`DEFAULTS`
    and validated; unknown keys and bad values raise :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.create(DEFAULTS)
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
    def num(key, cast=float, lo=None, allow_none=False):
        from omegaconf import OmegaConf

        v = OmegaConf.select(m, key)
        if v is None and allow_none:
            return None
        try:
            v = cast(v)
        except (TypeError, ValueError):
            raise ConfigError(f"metrics.{key} must be a number (got {v!r})") from None
        if lo is not None and v < lo:
            raise ConfigError(f"metrics.{key} must be >= {lo} (got {v})")
        return v

    for k in NAMES:
        if str(m[k].enabled).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"metrics.{k}.enabled must be auto, true or false (got {m[k].enabled!r})")
    if str(m.download).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"metrics.download must be auto, true or false (got {m.download!r})")
    num("eval_every", int, 0)
    num("download_timeout", float, 0.1)
    num("batch_size", int, 1)
    num("seed", int)
    num("num_images", int, 1)
    num("max_grid_images", int, 1)
    num("retain.factor", float, 0.0)
    if str(m.retain.get("source", "samples")) not in ("samples", "data"):
        raise ConfigError(f"metrics.retain.source must be samples or data (got {m.retain.source!r})")
    if str(m.retain.score) not in ("likelihood", "clip"):
        raise ConfigError(f"metrics.retain.score must be likelihood or clip (got {m.retain.score!r})")
    num("kid.subset_size", int, 2)
    num("kid.num_subsets", int, 1)
    num("kid.degree", int, 1)
    num("kid.coef", float, 1e-12)
    num("kid.image_size", int, 8, allow_none=True)
    if str(m.kid.feature_dim) not in INCEPTION_DIMS:
        raise ConfigError(f"metrics.kid.feature_dim must be one of {list(INCEPTION_DIMS)} (got {m.kid.feature_dim})")
    f = str(m.kid.feature)
    if f != "inception" and ":" not in f:
        raise ConfigError(f"metrics.kid.feature must be 'inception' or 'package.module:factory' (got {f!r})")
    num("sscd.timestep", int, 0)
    r = m.sscd.resize
    if not (isinstance(r, int) or (hasattr(r, "__len__") and len(r) == 2)):
        raise ConfigError(f"metrics.sscd.resize must be an int (short edge) or [h, w] (got {r!r})")
    if len(m.sscd.seeds) < 1:
        raise ConfigError("metrics.sscd.seeds must list at least one seed")
    if str(m.sscd.denoise.kind) not in GaussianSampler.KINDS:
        raise ConfigError(f"metrics.sscd.denoise.kind must be one of {list(GaussianSampler.KINDS)}")
    if str(m.sscd.denoise.variance) not in ("beta", "posterior"):
        raise ConfigError("metrics.sscd.denoise.variance must be beta or posterior")
    num("sscd.denoise.num_steps", int, 1, allow_none=True)
    if str(m.clip.reduction) not in ("max", "mean"):
        raise ConfigError(f"metrics.clip.reduction must be max or mean (got {m.clip.reduction!r})")
    for k in ("kl", "likelihood"):
        num(f"{k}.num_samples", int, 1)
        num(f"{k}.batch_size", int, 1)
    num("likelihood.num_timesteps", int, 1)
    num("likelihood.num_noise", int, 1)


# -- context -----------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What one evaluation sees. Images are float ``(N, 3, H, W)`` tensors in ``[0, 1]``.

    Every field is optional; a metric whose inputs are absent is reported as ``skipped``.
    """

    images: torch.Tensor | None = None            # samples of the model under evaluation (KID fake set, CLIP)
    reference_images: torch.Tensor | None = None  # KID reference set: the retain set (LU) or pretrained samples
    reference_name: str = "reference"             # what the reference set is, recorded in the KID protocol
    forget_images: torch.Tensor | None = None     # FU: the images to unlearn (SSCD originals)
    forget_x0: torch.Tensor | None = None         # FU: the same in the model's data space (skips encode)
    prompts: Sequence[str] | None = None          # the unlearning prompts (CLIP)
    model: ScoreModel | None = None               # the model under evaluation
    pretrained: ScoreModel | None = None          # the frozen pretrained model (KL)
    sampler: GaussianSampler | None = None        # the run's sampler (KL, likelihood)
    cond: Any = None                              # conditioning of model/pretrained samples (e.g. retain prompt)
    concepts: Sequence[ScoreModel] = ()           # q_i models (likelihood)
    concept_conds: Sequence[Any] = ()             # conditioning of each q_i
    concept_names: Sequence[str] = ()
    likelihood_reference: ScoreModel | None = None  # the p of l_i = q_i / p when it is not `pretrained` (text: unconditional)
    encode: Callable | None = None                # [0, 1] images -> model space (default 2x - 1)
    decode: Callable | None = None                # model space -> [0, 1] images (default (x + 1) / 2)
    step: int | None = None                       # training step (recorded)
    seed: int | None = None                       # overrides metrics.seed

    @classmethod
    def from_setup(cls, setup, sampler: GaussianSampler | None = None, **kw) -> "EvalContext":
        """Models, conditioning and concepts from an :class:`~unlearn.setup.UnlearningSetup`."""
        base = dict(model=setup.model, pretrained=setup.pretrained, sampler=sampler, cond=setup.cond,
                    concepts=list(setup.concepts), concept_conds=list(setup.concept_conds or []),
                    concept_names=list(setup.concept_names))
        base.update(kw)
        return cls(**base)


# -- helpers -----------------------------------------------------------------------------------
def _module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _callable_name(f) -> str | None:
    if f is None:
        return None
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"


def protocol_id(protocol: dict) -> str:
    """A short hash of a protocol: equal ids, comparable numbers."""
    s = json.dumps(protocol, sort_keys=True, default=str)
    return hashlib.sha256(s.encode()).hexdigest()[:12]


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@lru_cache(maxsize=None)
def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("torchmetrics", "torch-fidelity", "open_clip_torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# -- the suite ---------------------------------------------------------------------------------
class MetricSuite:
    """KID, SSCD, CLIP, KL to the pretrained model and expected likelihood, as configured.

    Build with :meth:`from_config`; call :meth:`check_available` before training (it loads the
    feature models, warns once per missing metric, and raises :class:`ConfigError` under
    ``metrics.strict``); call :meth:`evaluate` when :meth:`due`.
    """

    def __init__(self, cfg, image_model: bool = True, kid_feature: nn.Module | None = None,
                 sscd_descriptor: nn.Module | None = None, clip_scorer: CLIPScorer | None = None):
        self.cfg = cfg
        self.image_model = bool(image_model)
        self.strict = bool(cfg.strict)
        dev = str(cfg.device)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else torch.device(dev)
        self._loaded: dict[str, Any] = {}
        self._records: dict[str, dict] = {}
        self._missing: dict[str, str] = {}
        if kid_feature is not None:
            self._set("kid", kid_feature.eval().to(self.device), self._custom_record(kid_feature))
        if sscd_descriptor is not None:
            self._set("sscd", sscd_descriptor.eval().to(self.device), self._custom_record(sscd_descriptor))
        if clip_scorer is not None:
            self._set("clip", clip_scorer.to(self.device), clip_scorer.record or {"source": "given"})
        self.last_images: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg=None, *, image_model: bool = True, kid_feature: nn.Module | None = None,
                    sscd_descriptor: nn.Module | None = None, clip_scorer: CLIPScorer | None = None) -> "MetricSuite":
        """``cfg``: the ``metrics`` block (``cfg.metrics``), a dict, or None for the defaults.

        ``image_model``: whether the model family produces images; ``enabled: auto`` metrics are
        on only for image models. ``kid_feature`` / ``sscd_descriptor`` / ``clip_scorer``
        replace the configured feature models (tests, custom extractors).
        """
        return cls(metrics_config(cfg), image_model, kid_feature, sscd_descriptor, clip_scorer)

    # -- configuration -------------------------------------------------------------------------
    def is_enabled(self, name: str) -> bool:
        e = str(self.cfg[name].enabled).lower()
        return self.image_model if e == "auto" else e == "true"

    @property
    def enabled(self) -> list[str]:
        return [n for n in NAMES if self.is_enabled(n)]

    def due(self, step: int, final: bool = False) -> bool:
        """Whether to evaluate after ``step`` (every ``eval_every`` steps; always at the end)."""
        every = int(self.cfg.eval_every)
        return bool(self.enabled) and (final or (every > 0 and step > 0 and step % every == 0))

    # -- weights -------------------------------------------------------------------------------
    def _set(self, name, obj, record):
        self._loaded[name] = obj
        self._records[name] = record

    @staticmethod
    def _custom_record(module: nn.Module) -> dict:
        return {"source": "given", "class": f"{type(module).__module__}.{type(module).__qualname__}",
                "state_sha256": _module_fingerprint(module)}

    def _resolve(self, name: str, path, path_key, filename, url):
        c = self.cfg
        return W.resolve_weights(name, path=path, path_key=path_key, filename=filename, url=url,
                                 cache_dir=c.cache_dir, download_setting=c.download,
                                 timeout=float(c.download_timeout))

    def _load(self, name: str):
        """The feature model of ``name`` (loaded once); raises WeightsUnavailable."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._missing:
            raise W.WeightsUnavailable(self._missing[name])
        c = self.cfg
        try:
            if name == "kid":
                if str(c.kid.feature) == "inception":
                    path, src = self._resolve("kid", c.kid.inception_path, "metrics.kid.inception_path",
                                              INCEPTION_FILENAME, INCEPTION_URL)
                    try:
                        mod = InceptionFeatures(path, str(c.kid.feature_dim))
                    except Exception as e:  # noqa: BLE001 - a corrupt or wrong file
                        raise W.WeightsUnavailable(f"{path} could not be loaded as torch-fidelity's InceptionV3 "
                                                   f"({type(e).__name__}: {e}); set metrics.kid.inception_path") from None
                    rec = W.file_record(path, src)
                else:
                    mod_name, fn = str(c.kid.feature).split(":", 1)
                    mod = getattr(importlib.import_module(mod_name), fn)()
                    rec = {**self._custom_record(mod), "factory": str(c.kid.feature)}
                self._set("kid", mod.eval().to(self.device), rec)
            elif name == "sscd":
                path, src = self._resolve("sscd", c.sscd.path, "metrics.sscd.path", SSCD_FILENAME, c.sscd.url)
                try:
                    mod = load_descriptor(path, self.device)
                except Exception as e:  # noqa: BLE001
                    raise W.WeightsUnavailable(f"{path} could not be loaded with torch.jit.load "
                                               f"({type(e).__name__}: {e}); set metrics.sscd.path") from None
                self._set("sscd", mod, W.file_record(path, src))
            elif name == "clip":
                scorer = load_clip(str(c.clip.model), c.clip.checkpoint, self.device, c.download,
                                   float(c.download_timeout), c.cache_dir)
                self._set("clip", scorer, scorer.record)
            else:
                self._loaded[name] = None  # kl, likelihood: no weights
        except W.WeightsUnavailable as e:
            self._missing[name] = str(e)
            W.warn_missing(name, str(e))
            raise
        return self._loaded[name]

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
    def evaluate(self, ctx: EvalContext) -> dict:
        """``{metric: result}`` for every enabled metric.

        A result is ``{"status": "ok", "value": ..., <details>, "protocol": {...}, "seconds": ...}``,
        ``{"status": "missing", "reason": ...}`` (weights not available),
        ``{"status": "skipped", "reason": ...}`` (the context lacks the inputs) or
        ``{"status": "error", "reason": ...}`` (an exception; re-raised under ``metrics.strict``).
        """
        self.last_images = {}
        out = {}
        seed = int(ctx.seed if ctx.seed is not None else self.cfg.seed)
        for n in self.enabled:
            t0 = time.perf_counter()
            try:
                obj = self._load(n)
                res = getattr(self, f"_eval_{n}")(ctx, obj, seed)
                res["protocol"]["step"] = ctx.step
                res["protocol"]["id"] = protocol_id({k: v for k, v in res["protocol"].items() if k != "step"})
                res = {"status": "ok", **_jsonable(res), "seconds": round(time.perf_counter() - t0, 3)}
            except W.WeightsUnavailable as e:
                if self.strict:
                    raise ConfigError(f"metrics.strict=true and the weights of metric '{n}' are missing: {e}") from None
                res = {"status": "missing", "reason": str(e)}
            except _Skip as e:
                res = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - one broken metric must not end a run, unless strict
                if self.strict:
                    raise
                logger.exception("metric '%s' failed", n)
                res = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            out[n] = res
        return out

    def _need(self, ctx, metric, *fields):
        for f in fields:
            v = getattr(ctx, f)
            if v is None or (isinstance(v, (list, tuple)) and not v):
                raise _Skip(f"{metric} needs ctx.{f}")

    def _eval_kid(self, ctx, feature, seed):
        self._need(ctx, "kid", "images", "reference_images")
        c = self.cfg.kid
        real = check_images(ctx.reference_images, "ctx.reference_images")
        fake = check_images(ctx.images, "ctx.images")
        r = compute_kid(real, fake, feature, int(c.subset_size), int(c.num_subsets), seed,
                        c.image_size, int(self.cfg.batch_size), int(c.degree), float(c.coef), self.device)
        self.last_images.update(samples=fake, reference=real)
        inception = str(c.feature) == "inception" and isinstance(feature, InceptionFeatures)
        v = _versions()
        proto = {
            "feature": (f"torch-fidelity InceptionV3 (TF port), pool features {c.feature_dim}" if inception
                        else self._records["kid"].get("class", "custom")),
            "weights": self._records["kid"],
            "input": "float (N,3,H,W) in [0,1]" + (" -> uint8 round(255 x) -> bilinear antialiased 299x299 "
                                                    "(torchmetrics NoTrainInceptionV3)" if inception else ""),
            "image_size": list(fake.shape[-2:]), "reference_image_size": list(real.shape[-2:]),
            "resize": c.image_size, "reference": ctx.reference_name,
            "n_real": r["n_real"], "n_fake": r["n_fake"], "subset_size": r["subset_size"],
            "subset_size_configured": int(c.subset_size), "num_subsets": int(c.num_subsets),
            "kernel": f"polynomial degree {int(c.degree)}, gamma 1/D, coef {float(c.coef)}", "seed": seed,
            "torchmetrics": v["torchmetrics"], "torch_fidelity": v["torch-fidelity"],
        }
        return {"value": r["value"], "std": r["std"], "protocol": proto}

    def _eval_sscd(self, ctx, descriptor, seed):
        self._need(ctx, "sscd", "model")
        if ctx.forget_images is None and ctx.forget_x0 is None:
            raise _Skip("sscd needs ctx.forget_images (or ctx.forget_x0)")
        c = self.cfg.sscd
        model = ctx.model
        t = int(c.timestep)
        if t > model.schedule.T - 1:
            raise ConfigError(f"metrics.sscd.timestep must be in 0..{model.schedule.T - 1} (got {t})")
        decode = ctx.decode or pixel_decode
        encode = ctx.encode or pixel_encode
        images = ctx.forget_images
        if images is None:
            with torch.no_grad():
                images = decode(ctx.forget_x0).clamp(0, 1).float().cpu()
        check_images(images, "ctx.forget_images")
        d = c.denoise
        sampler = denoising_sampler(model.schedule, t, str(d.kind), str(d.variance), float(d.eta),
                                    None if d.num_steps is None else int(d.num_steps))
        pre = SSCDPreprocess(c.resize if isinstance(c.resize, int) else list(c.resize), list(c.mean), list(c.std))
        seeds = [int(s) for s in c.seeds]
        r = sscd_protocol(model, images, descriptor, pre, t, seeds, sampler, ctx.cond, encode, decode,
                          int(self.cfg.batch_size), self.device, x0=ctx.forget_x0)
        self.last_images.update(sscd_original=images, sscd_denoised=r["denoised"])
        proto = {
            "descriptor": self._records["sscd"], "preprocess": pre.protocol(),
            "similarity": "cosine of L2-normalised descriptors", "timestep": t, "seeds": seeds,
            "denoise": sampler_protocol(sampler), "n_forget": len(images), "image_size": list(images.shape[-2:]),
            "encode": _callable_name(ctx.encode) or "pixel: 2x - 1", "decode": _callable_name(ctx.decode) or
            "pixel: (x + 1) / 2, clamped", "reduction": "max over forget images and seeds",
        }
        return {"value": r["max"], "mean": r["mean"], "per_image": r["per_image"], "similarity": r["similarity"],
                "protocol": proto}

    def _eval_clip(self, ctx, scorer, seed):
        self._need(ctx, "clip", "images", "prompts")
        images = check_images(ctx.images, "ctx.images")
        prompts = list(ctx.prompts)
        s = scorer.scores(images, prompts, int(self.cfg.batch_size))  # (N, P), clamped per image
        per_prompt = s.mean(0)
        red = str(self.cfg.clip.reduction)
        value = float(per_prompt.max()) if red == "max" else float(per_prompt.mean())
        self.last_images.setdefault("samples", images)
        proto = {**scorer.protocol(), "prompts": prompts, "n_images": len(images),
                 "image_size": list(images.shape[-2:]),
                 "reduction": ("max over prompts of the mean score over images" if red == "max"
                               else "mean over prompts and images")}
        return {"value": value, "per_prompt": dict(zip(prompts, per_prompt.tolist())), "protocol": proto}

    def _eval_kl(self, ctx, _, seed):
        self._need(ctx, "kl", "model", "pretrained", "sampler")
        c = self.cfg.kl
        r = kl_to_pretrained(ctx.model, ctx.pretrained, ctx.sampler, int(c.num_samples), seed, ctx.cond,
                             batch_size=int(c.batch_size))
        proto = {"estimator": "pathwise KL (Lemma 3), exact weights c_t^2/(2 s_t^2)",
                 "direction": "KL(P_model || P_pretrained), trajectories of the model",
                 "sampler": sampler_protocol(ctx.sampler), "n": r["n"], "seed": seed}
        return {"value": r["value"], "stderr": r["stderr"], "protocol": proto}

    def _eval_likelihood(self, ctx, _, seed):
        self._need(ctx, "likelihood", "model", "pretrained", "sampler", "concepts")
        c = self.cfg.likelihood
        r = expected_likelihood(ctx.model, list(ctx.concepts), ctx.likelihood_reference or ctx.pretrained, ctx.sampler, int(c.num_samples), seed,
                                ctx.cond, list(ctx.concept_conds) or None, int(c.num_timesteps), int(c.num_noise),
                                bool(c.antithetic), int(c.batch_size))
        names = list(ctx.concept_names) or [str(i) for i in range(len(ctx.concepts))]
        proto = {"estimator": "E_model[exp(log q_i - log p_pre)], log-ratio from denoising errors over log-SNR (Lemma 2)",
                 "num_timesteps": int(c.num_timesteps), "num_noise": int(c.num_noise),
                 "antithetic": bool(c.antithetic), "sampler": sampler_protocol(ctx.sampler), "n": r["n"],
                 "seed": seed, "concepts": names}
        return {"value": r["value"], "per_concept": dict(zip(names, r["per_concept"])),
                "stderr": dict(zip(names, r["stderr"])), "mean_log_ratio": dict(zip(names, r["mean_log_ratio"])),
                "protocol": proto}

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
        """Flat numbers for ``metrics.jsonl`` / W&B: only metrics with status ``ok``."""
        out = {}
        for n, r in results.items():
            if r.get("status") != "ok":
                continue
            if n == "kid":
                out.update(kid=r["value"], kid_std=r["std"])
            elif n == "sscd":
                out.update(max_sscd=r["value"], mean_sscd=r["mean"])
            elif n == "clip":
                out["clip"] = r["value"]
            elif n == "kl":
                out.update(kl_to_pretrained=r["value"], kl_to_pretrained_stderr=r["stderr"])
            elif n == "likelihood":
                out["expected_likelihood"] = r["value"]
                for k, v in r["per_concept"].items():
                    out[f"expected_likelihood/{k}"] = v
        return out

    @staticmethod
    def statuses(results: dict) -> dict[str, str]:
        return {n: r.get("status", "?") for n, r in results.items()}
