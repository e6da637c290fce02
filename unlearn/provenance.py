"""What a run was made with (``run_info.json``): seed, package versions, git commit, device, host,
start times and wall-clock timings. Kept out of ``summary.json`` so that summaries of the same
command and seed are identical."""
from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGES = ("torch", "diffusers", "peft", "hydra-core", "omegaconf", "cooper-optim", "numpy")
REPO = Path(__file__).resolve().parent.parent


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the imported one
    return out


def git_state(repo: Path = REPO) -> dict:
    """``{"commit", "dirty"}`` of the checkout the code runs from; ``None``s outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(model: torch.nn.Module | None) -> dict:
    dev = None
    if model is not None:
        p = next(iter(model.parameters()), None)
        dev = str(p.device) if p is not None else None
    out = {"device": dev or "cpu", "torch_threads": torch.get_num_threads()}
    if dev and dev.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    else:
        out["device_name"] = platform.processor() or platform.machine()
    return out


def session(resumed_from: int | None) -> dict:
    """One entry of ``run_info.json["sessions"]``: who ran this part of the run, when."""
    return {"host": socket.gethostname(), "argv": " ".join(sys.argv), "started": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from}


VOLATILE_SUFFIXES = ("_time_s", "_cache_hit")


def split_volatile(info: dict) -> tuple[dict, dict]:
    """A setup's info split into what is a function of the config (summary.json) and what is not
    (timings, cache hits: run_info.json)."""
    stable = {k: v for k, v in info.items() if not k.endswith(VOLATILE_SUFFIXES)}
    volatile = {k: v for k, v in info.items() if k.endswith(VOLATILE_SUFFIXES)}
    return stable, volatile
