"""Run logging: always ``metrics.jsonl`` in the run directory, W&B when configured."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class RunLogger:
    MODES = ("offline", "online", "disabled")

    def __init__(self, run_dir: Path, cfg_logger, config: dict, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:  # keep the lines up to the checkpoint's step, drop later or partial ones
            self._truncate(resume_step)
            self._f = open(self.path, "a")
        else:
            self._f = open(self.path, "w")
        self.wandb = None
        if cfg_logger is not None and str(cfg_logger.name) == "wandb":
            mode = str(cfg_logger.mode)
            if mode not in self.MODES:
                from .config import ConfigError

                raise ConfigError(f"logger.mode must be one of {list(self.MODES)} (got {mode!r})")
            if mode != "disabled":
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(mode=mode, project=str(cfg_logger.project),
                                        entity=cfg_logger.entity, group=cfg_logger.group,
                                        name=cfg_logger.run_name, dir=str(self.run_dir), config=config,
                                        reinit="finish_previous")

    def _truncate(self, step: int):
        from .utils import atomic_write_text

        keep = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                    keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))

    def log(self, step: int, record: dict):
        rec = {"step": step, **record}
        self._f.write(json.dumps(_jsonable(rec)) + "\n")
        self._f.flush()
        if self.wandb is not None:
            self.wandb.log(_flatten(record), step=step)

    def finish(self, summary: dict):
        self._f.close()
        if self.wandb is not None:
            self.wandb.summary.update(_flatten({k: v for k, v in summary.items() if k != "config"}))
            self.wandb.finish()
