"""A finished run, rebuilt for attacking: its config rebuilds the setup (pretrained models from the
cache), ``model.pt`` puts the run's trained weights back, and the weights the run started from
(the pretrained state: LoRA at zero, or the pretrained copy) are kept to attack the pretrained
model with the same protocol."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError

from ..checkpoint import FINISHED
from ..metrics.divergence import concept_likelihood
from ..models.base import ScoreModel
from ..models.diffusers_models import ConditionedView, Guidance
from ..utils import generator
from .base import AttackError

SIDES = ("pretrained", "unlearned")


def _trained_params(model: ScoreModel) -> dict:
    """The parameters ``model.pt`` names: a view's trainable state is named inside its base network."""
    base = getattr(model, "base", None)
    if callable(getattr(model, "trainable_state", None)) and base is not None:
        return dict(base.named_parameters())
    return dict(model.state_dict(keep_vars=True))  # the whole network (its buffers too)


class AttackTarget:
    """The run's setup with its trained weights, switchable between the two sides: :meth:`use`."""

    def __init__(self, run_dir: Path, cfg, summary: dict, setup, sampler, formulation, blob: dict):
        self.run_dir, self.cfg, self.summary = run_dir, cfg, summary
        self.setup, self.sampler, self.formulation = setup, sampler, formulation
        self.mu = torch.as_tensor(blob["multipliers"], dtype=torch.float32)
        self.composed = bool(blob.get("composed"))
        self.params = _trained_params(setup.model)
        self.trained = {k: v for k, v in blob["state_dict"].items()}
        unknown = [k for k in self.trained if k not in self.params]
        if unknown:
            raise AttackError(f"{run_dir / 'model.pt'}: does not fit the model this config builds (unknown weight "
                              f"{unknown[0]}); attack it with the version of unlearn that wrote it")
        self.initial = {k: self.params[k].detach().clone() for k in self.trained}

    # -- the two sides ----------------------------------------------------------------------------
    def use(self, side: str) -> ScoreModel:
        """The model to attack: the run's unlearned model, or (``"pretrained"``) the model it started
        from, with the run's trainable weights reset to their pretrained values."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES} (got {side!r})")
        state = self.trained if side == "unlearned" else self.initial
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v)
        if self.composed:  # RU dual-only: the composed score of the final multipliers
            return self.formulation.final_model(self.mu) if side == "unlearned" else self.setup.pretrained
        return self.setup.model

    def trainable(self) -> list[torch.nn.Parameter]:
        """The run's trainable weights (what relearning fine-tunes); none for a composed score."""
        if self.composed:
            return []
        return [self.params[k] for k in self.trained if self.params[k].requires_grad]

    # -- data and judgement -------------------------------------------------------------------------
    def concept_samples(self, k: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
        """``k`` samples of the unlearned concepts in model space and where they come from: the family's
        real data where it has them, else samples of the (pretrained) concept models."""
        s = self.setup
        if s.concept_data is not None:
            return s.concept_data(k, gen).detach(), f"real samples of the concepts ({s.name}'s data)"
        per = [k // len(s.concepts) + (1 if i < k % len(s.concepts) else 0) for i in range(len(s.concepts))]
        xs = [self.sampler.sample(c, n, gen).x0.detach() for c, n in zip(s.concepts, per) if n > 0]
        return torch.cat(xs), "samples of the pretrained concept models"

    @property
    def judge(self):
        j = self.setup.concept_judge
        if j is None:
            raise AttackError(f"model {self.setup.name}: no judge of the concepts (an evaluation network or exact "
                              f"densities); accepted: models with one (gmm, digits, digits_sd)")
        return j

    def sample(self, model: ScoreModel, n: int, seed: int, batch: int = 256) -> torch.Tensor:
        gen = generator(seed)
        with torch.no_grad():
            return torch.cat([self.sampler.sample(model, min(batch, n - i), gen).x0 for i in range(0, n, batch)])

    def expected_likelihood(self, x0: torch.Tensor, seed: int, num_timesteps: int, batch: int) -> list[float]:
        """``E[q_i / p_pre]`` per concept over ``x0``: exact where the judge has densities, else estimated
        from denoising errors (Lemma 2, as the ``likelihood`` metric); ``[]`` without concept models."""
        if self.judge.expected_likelihood is not None:
            return [float(v) for v in self.judge.expected_likelihood(x0)]
        s = self.setup
        if not s.concepts:  # data unlearning: no concept model to compare with
            return []
        with torch.no_grad():
            llr = concept_likelihood(x0, s.concepts, s.likelihood_reference or s.pretrained, seed, None, None,
                                     int(num_timesteps), 1, True, int(batch))
        return [float(v) for v in torch.exp(llr.double()).mean(0)]


def plain_view(model: ScoreModel) -> ScoreModel:
    """The conditional model without classifier-free guidance (what the denoising loss trains)."""
    if isinstance(model, ConditionedView) and isinstance(model.cond, Guidance):
        return model.with_cond(model.cond.cond, model.name)
    return model


def check_run_dir(run_dir) -> tuple[Path, dict]:
    """A finished run's directory (config.yaml, model.pt, a summary of a finished status), else one line."""
    path = Path(str(run_dir)).expanduser()
    need = ("config.yaml", "model.pt", "summary.json")
    missing = [f for f in need if not (path / f).is_file()]
    if not path.is_dir() or missing:
        what = "is not a folder" if not path.is_dir() else f"holds no {', '.join(missing)}"
        raise AttackError(f"run_dir={str(run_dir)!r} {what}; accepted: the directory of a finished run of "
                          f"python train.py (with {', '.join(need)})")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except Exception:
        raise AttackError(f"run_dir={str(run_dir)!r}: summary.json is unreadable (corrupt); accepted: the directory "
                          f"of a finished run") from None
    if summary.get("status") not in FINISHED:
        raise AttackError(f"run_dir={str(run_dir)!r}: the run ended {summary.get('status')!r}, it has no result to "
                          f"attack; accepted: a run that finished ({', '.join(FINISHED)})")
    return path, summary


def load_run(run_dir, cache_dir: str | None = None, num_threads: int | None = None,
             show_progress: bool = False) -> AttackTarget:
    """Rebuild a finished run for attacking (its pretrained models come from the cache it used, or
    ``cache_dir``)."""
    from ..train import build

    path, summary = check_run_dir(run_dir)
    cfg = OmegaConf.load(path / "config.yaml")
    with open_dict(cfg):
        cfg.progress = bool(show_progress)
        cfg.logger = "none"
        if cache_dir:
            cfg.paths.cache_dir = str(cache_dir)
        if num_threads:
            cfg.num_threads = int(num_threads)
    torch.set_num_threads(int(cfg.num_threads))
    try:
        blob = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AttackError(f"{path / 'model.pt'}: unreadable ({type(exc).__name__}); accepted: the model.pt a finished "
                          f"run wrote") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "multipliers" not in blob:
        raise AttackError(f"{path / 'model.pt'}: not a run's weights (no state_dict and multipliers)")
    cfg, filled = fill_new_keys(cfg)
    torch.manual_seed(int(cfg.seed))
    try:
        setup, sampler, formulation, _, _ = build(cfg, show_progress=show_progress)
    except ConfigAttributeError as exc:  # a config.yaml of another version of unlearn
        raise AttackError(f"{path / 'config.yaml'}: lacks {exc.full_key or exc} (written by another version of "
                          f"unlearn); attack it with that version, or rerun the run with this one") from None
    target = AttackTarget(path, cfg, summary, setup, sampler, formulation, blob)
    target.filled = filled
    return target


def fill_new_keys(cfg):
    """A run's config with the keys this version added since it was written, at their defaults (the
    composed config of the run's model, formulation and method; every value the run had wins).
    Returns the config and the keys filled, which the attack's record lists."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra

    from ..api import compose

    overrides = [f"model={cfg.model.name}", f"formulation={cfg.formulation.name}", f"method={cfg.method.name}",
                 "logger=none"]
    try:  # inside attack.py's Hydra app the config tree is loaded already
        base = hydra_compose("train", overrides) if GlobalHydra.instance().is_initialized() else compose(overrides)
    except Exception:  # noqa: BLE001  (a model or method this version no longer has: use the run's config as it is)
        return cfg, []
    have = set(_flat_keys(OmegaConf.to_container(cfg, resolve=False)))
    new = sorted(k for k in _flat_keys(OmegaConf.to_container(base, resolve=False)) if k not in have
                 and not any(k.startswith(h + ".") for h in have))
    if not new:
        return cfg, []
    OmegaConf.set_struct(base, False)  # keys the run has and the defaults lack (a sweep's, e.g. method.multiplier) stay
    merged = OmegaConf.merge(base, cfg)
    return merged, new


def _flat_keys(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out
