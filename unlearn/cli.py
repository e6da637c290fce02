"""Thin Hydra wrapper around :func:`unlearn.train.train` with one-line errors for bad input."""
from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "formulation", "method", "logger", "experiment")


def check_group_overrides(argv: list[str], config_dir: Path = CONFIG_DIR, groups=GROUPS) -> str | None:
    """Unknown group options, caught before Hydra prints a multi-line error."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in groups or not (config_dir / key).is_dir():
            continue
        options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for v in value.split(","):
            if v and v not in options and not v.startswith(("choice(", "range(", "glob(")):
                return f"error: {key}={v!r} is not a known option; accepted: {', '.join(options)}"
    return None


def write_failed_summary(run_dir, cfg, exc: BaseException):
    """A failed sweep job leaves a summary that says so (figures mark the point as missing)."""
    import json
    import traceback

    from omegaconf import OmegaConf

    from .utils import atomic_write_text

    summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "model": OmegaConf.select(cfg, "model.name"), "formulation": OmegaConf.select(cfg, "formulation.name"),
               "method": OmegaConf.select(cfg, "method.name"),
               "threshold_factor": OmegaConf.select(cfg, "formulation.threshold_factor"),
               "traceback": traceback.format_exc()[-4000:]}
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=str))


EXIT_DIVERGED = 3


def diverged_message(summary: dict, run_dir) -> str:
    d = summary["diverged"]
    kept = (f"last good checkpoint (dual step {summary['checkpoint_step']}) kept in {Path(run_dir) / 'checkpoint.pt'}"
            if summary.get("checkpoint_step") is not None else "no checkpoint was written before it")
    return (f"{run_dir}: run diverged at dual step {d['step']} ({d['quantity']} = {d['value']}); {kept}; "
            f"lower the step sizes (formulation.primal_lr, formulation.dual_lr) and run in a new directory")


def main():
    from .config import register_resolvers

    register_resolvers()
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
        from .checkpoint import RunDirError, holds_run
        from .train import train

        run_dir = HydraConfig.get().runtime.output_dir
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        try:
            summary = train(cfg, run_dir=run_dir)
        except ConfigError as exc:
            if multirun:  # one bad point must not stop the sweep: record it and go on
                print(f"error (job {HydraConfig.get().job.num}): {exc}", file=sys.stderr)
                # raised before anything is written: a directory that holds a run's files is left as it is
                if not isinstance(exc, RunDirError) and not holds_run(run_dir):
                    write_failed_summary(run_dir, cfg, exc)
                return None
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:
            if not multirun:
                raise
            print(f"error (job {HydraConfig.get().job.num}): {type(exc).__name__}: {exc}", file=sys.stderr)
            write_failed_summary(run_dir, cfg, exc)
            return None
        if summary.get("status") == "diverged":  # summary.json says so; the sweep goes on
            msg = diverged_message(summary, run_dir)
            if multirun:
                print(f"error (job {HydraConfig.get().job.num}): {msg}", file=sys.stderr)
                return summary
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(EXIT_DIVERGED)
        return summary

    _run()
