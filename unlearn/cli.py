"""Thin Hydra wrapper around :func:`unlearn.train.train` with one-line errors for bad input."""
from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "formulation", "method", "logger", "experiment")


def check_group_overrides(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """Unknown group options, caught before Hydra prints a multi-line error."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or not (config_dir / key).is_dir():
            continue
        options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for v in value.split(","):
            if v and v not in options and not v.startswith(("choice(", "range(", "glob(")):
                return f"error: {key}={v!r} is not a known option; accepted: {', '.join(options)}"
    return None


def main():
    msg = check_group_overrides(sys.argv[1:])
    if msg:
        print(msg, file=sys.stderr)
        sys.exit(2)
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .config import ConfigError

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def _run(cfg: DictConfig):
        from .train import train

        run_dir = HydraConfig.get().runtime.output_dir
        try:
            return train(cfg, run_dir=run_dir)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if HydraConfig.get().mode.name == "MULTIRUN":
                raise
            sys.exit(2)

    _run()
