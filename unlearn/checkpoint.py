"""Checkpoints of a run, resuming it, and checks that a run directory is ours and intact.

``run_dir/checkpoint.pt`` (written atomically: temporary file, then rename) holds
``{"format": FORMAT, "version": FORMAT_VERSION, "config_hash", "step", "state"}`` where
``state`` is :meth:`unlearn.primal_dual.PrimalDual.state_dict`: the formulation's trainable
weights, primal optimiser state and generator, the multipliers with their dual optimiser,
the driver's history and thresholds, and the global RNG states (torch, numpy, python).

``config_hash`` covers the resolved config except the keys in :data:`RUNTIME_KEYS` (they do
not change results) and :data:`EXTENSIBLE_KEYS` (they do not change the state a checkpoint
holds: the number of dual steps, which may be raised to extend a run, and the final-phase
settings). Any other difference means the checkpoint belongs to another run.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .config import ConfigError
from .utils import atomic_torch_save, config_hash

FORMAT = "unlearn-run"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
RUN_INFO = "run_info.json"
# files a run writes; a directory holding any of them holds a run
RUN_FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt", "summary.json", RUN_INFO)

RUNTIME_KEYS = ("progress", "logger", "num_threads", "paths", "train.resume", "train.checkpoint_every",
                "train.log_every", "metrics.strict", "metrics.download", "metrics.download_timeout",
                "metrics.cache_dir")
EXTENSIBLE_KEYS = ("train.dual_steps", "formulation.dual_steps", "train.final_samples", "train.satisfied_tol",
                   "train.oracle_multipliers")


class RunDirError(ConfigError):
    """The run directory cannot be resumed or reused: ``<path>: <what is wrong>; <what to do>``.
    Raised before anything in the directory is written."""


def _drop(resolved: dict, keys) -> dict:
    out = json.loads(json.dumps(resolved, default=str))
    for key in keys:
        node, parts = out, key.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def resume_hash(resolved: dict) -> str:
    """Hash of the config keys a checkpoint's state depends on."""
    return config_hash(_drop(resolved, RUNTIME_KEYS + EXTENSIBLE_KEYS))


def result_hash(resolved: dict) -> str:
    """Hash of the config keys the outputs (summary.json, model.pt, samples) depend on."""
    return config_hash(_drop(resolved, RUNTIME_KEYS))


# -- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files -----------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict, step: int, cfg_hash: str) -> None:
    atomic_torch_save({"format": FORMAT, "version": FORMAT_VERSION, "config_hash": cfg_hash, "step": int(step),
                       "state": state}, path)


def _safe_globals() -> list:
    """Non-tensor types in optimiser states that ``torch.load(weights_only=True)`` must accept."""
    out = []
    try:
        from cooper.optim.torch_optimizers.nupi_optimizer import nuPIInitType

        out.append(nuPIInitType)
    except ImportError:
        pass
    return out


def load_checkpoint(path: Path) -> dict:
    """Read and check a checkpoint's envelope; every failure is one :class:`RunDirError` line."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path}: checkpoint is unreadable (truncated or corrupt: {reason}); delete it to restart "
                          f"this run from scratch, or run in a new directory (hydra.run.dir=...)") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise RunDirError(f"{path}: not a checkpoint of unlearn; run in a new directory (hydra.run.dir=...)")
    if blob.get("version") != FORMAT_VERSION:
        raise RunDirError(f"{path}: checkpoint written by format version {blob.get('version')}, this version of "
                          f"unlearn reads version {FORMAT_VERSION}; run in a new directory (hydra.run.dir=...) or "
                          f"resume with the version that wrote it")
    for k in ("config_hash", "step", "state"):
        if k not in blob:
            raise RunDirError(f"{path}: checkpoint lacks '{k}' (corrupt); delete it to restart this run from scratch")
    return blob


def read_run_info(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except Exception:
        raise RunDirError(f"{path}: unreadable (corrupt); run in a new directory (hydra.run.dir=...)") from None
    return info


# summary.json statuses of a run that reached its end (with model.pt): every constraint met and the
# estimators reliable; a constrained run that ended outside its constraints; estimates that did not
# hold at the final multipliers. "diverged" and "failed" runs have no result.
FINISHED = ("completed", "constraints_violated", "unreliable")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's files (a lone summary of a sweep job that failed before it
    started does not count: that job is retried from scratch)."""
    run_dir = Path(run_dir)
    present = [f for f in RUN_FILES if (run_dir / f).exists()]
    if present == ["summary.json"]:
        try:
            return json.loads((run_dir / "summary.json").read_text()).get("status") != "failed"
        except Exception:
            return True
    return bool(present)


def inspect_run_dir(run_dir: Path, resolved: dict, resume: str, dual_steps: int) -> dict | None:
    """Decide what to do with ``run_dir`` before anything is written to it.

    Returns ``None`` for a fresh start, or ``{"checkpoint": blob | None, "completed": bool}``
    for a resume of the same run. Raises :class:`RunDirError` (nothing written) when the
    directory holds a run of another config or format version, or an unreadable checkpoint.
    """
    run_dir = Path(run_dir)
    if not holds_run(run_dir):  # fresh, or a sweep job that failed before it started: retry from scratch
        return None
    present = [f for f in RUN_FILES if (run_dir / f).exists()]
    where = f"{run_dir}"
    if resume == "never":
        raise RunDirError(f"{where}: already holds a run ({', '.join(present)}) and train.resume=never; resume it "
                          f"with train.resume=auto or run in a new directory (hydra.run.dir=...)")
    info = read_run_info(run_dir)
    if info is None or info.get("format") != FORMAT:
        raise RunDirError(f"{where}: holds outputs of another version of unlearn (no {RUN_INFO}); run in a new "
                          f"directory (hydra.run.dir=...)")
    if info.get("format_version") != FORMAT_VERSION:
        raise RunDirError(f"{where}: written by run format version {info.get('format_version')}, this version of "
                          f"unlearn writes version {FORMAT_VERSION}; run in a new directory (hydra.run.dir=...)")
    want = resume_hash(resolved)
    ckpt = None
    if (run_dir / CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
        have, source = ckpt["config_hash"], run_dir / CHECKPOINT
    else:
        have, source = info.get("resume_hash"), run_dir / RUN_INFO
    if have != want:
        diff = _config_diff(run_dir / "config.yaml", resolved)
        raise RunDirError(f"{source}: belongs to a run with another config{diff}; rerun with that run's config "
                          f"(see {run_dir / 'config.yaml'}) or run in a new directory (hydra.run.dir=...)")
    if ckpt is not None and int(ckpt["step"]) > int(dual_steps):
        raise RunDirError(f"{run_dir / CHECKPOINT}: checkpoint is at dual step {ckpt['step']} but "
                          f"train.dual_steps={dual_steps}; raise train.dual_steps to at least {ckpt['step']} or run "
                          f"in a new directory (hydra.run.dir=...)")
    completed = False
    if ckpt is not None and int(ckpt["step"]) == int(dual_steps) and info.get("result_hash") == result_hash(resolved):
        try:
            s = json.loads((run_dir / "summary.json").read_text())
            completed = s.get("status") in FINISHED and (run_dir / "model.pt").exists()
        except Exception:
            completed = False
    return {"checkpoint": ckpt, "completed": completed}


def _config_diff(path: Path, resolved: dict) -> str:
    """`` (formulation.threshold_factor: 0.1 -> 0.3)``: the first differing keys, for the error line."""
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return ""
    a = _flat(_drop(old, RUNTIME_KEYS + EXTENSIBLE_KEYS))
    b = _flat(_drop(resolved, RUNTIME_KEYS + EXTENSIBLE_KEYS))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in keys[:3])
    return f" ({shown}{', ...' if len(keys) > 3 else ''})"


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out
