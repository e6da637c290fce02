"""Configuration errors and validation of the composed config."""
from __future__ import annotations

from omegaconf import DictConfig


def register_resolvers() -> None:
    """``${pick:i,[a,b,c]}``: the i-th entry of a list (lets one sweep index drive several keys)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("pick"):
        OmegaConf.register_new_resolver("pick", lambda i, values: values[int(i)])


register_resolvers()


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is accepted."""


def as_number(value, key: str, cast=float, accepted: str = "a number"):
    """``cast(value)``, or one :class:`ConfigError` line naming ``key`` (a string, a list, null)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be {accepted} (got {value!r})")
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {accepted} (got {value!r})") from None
    return out


def positive(value, key: str, what: str = "a number > 0") -> float:
    v = as_number(value, key, float, what)
    if not v > 0:
        raise ConfigError(f"{key} must be {what} (got {value!r})")
    return v


REQUIRED = {"model": ("name", "family", "sampler"), "formulation": ("name", "_target_", "threshold_factor"),
            "method": ("name",), "train": ("dual_steps", "primal_steps_per_dual", "final_samples")}


def validate_config(cfg: DictConfig) -> None:
    """Checks that do not need a model; each error names the key and what is accepted."""
    from omegaconf import OmegaConf

    for group, keys in REQUIRED.items():
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"config group '{group}' is missing")
        for k in keys:
            if k not in cfg[group]:
                raise ConfigError(f"{group}.{k} is missing")

    def number(key, cast=float):
        return as_number(OmegaConf.select(cfg, key), key, cast)

    tf = number("formulation.threshold_factor")
    if not tf > 0:
        raise ConfigError(f"formulation.threshold_factor must be > 0 (got {tf})")
    if number("train.dual_steps", int) < 0:
        raise ConfigError("train.dual_steps must be >= 0")
    if number("train.primal_steps_per_dual", int) < 0:
        raise ConfigError("train.primal_steps_per_dual must be >= 0")
    if number("train.final_samples", int) < 1:
        raise ConfigError("train.final_samples must be >= 1")
    fm = str(cfg.train.final_multipliers)
    if fm not in ("last", "average"):
        raise ConfigError(f"train.final_multipliers must be one of ['last', 'average'] (got {fm!r})")
    fp = str(cfg.train.final_primal)
    if fp not in ("last", "average"):
        raise ConfigError(f"train.final_primal must be one of ['last', 'average'] (got {fp!r})")
    if not isinstance(cfg.train.cache_pretrained_eval, bool):
        raise ConfigError(f"train.cache_pretrained_eval must be true or false (got {cfg.train.cache_pretrained_eval!r})")
    if "primal_lr" in cfg.formulation:  # the primal step size (RU: its optional distillation's)
        positive(cfg.formulation.primal_lr, "formulation.primal_lr", "a learning rate > 0")
    if "weight_decay" in cfg.formulation and number("formulation.weight_decay") < 0:
        raise ConfigError(f"formulation.weight_decay must be >= 0 (got {cfg.formulation.weight_decay})")
    keys = ["formulation.primal_batch_size"] + (["formulation.batch_size"] if "batch_size" in cfg.formulation else [])
    for key in keys:  # formulation=fu has no batch_size (its estimates use the whole forget set)
        if number(key, int) < 1:
            raise ConfigError(f"{key} must be >= 1")
    if number("train.baseline_estimate_every", int) < 1:
        raise ConfigError(f"train.baseline_estimate_every must be an integer >= 1 "
                          f"(got {cfg.train.baseline_estimate_every})")
