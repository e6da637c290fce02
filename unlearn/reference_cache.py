"""The pretrained model's side of a run's final evaluation, kept in the cache for the next run.

Every run ends by sampling and evaluating the pretrained model beside the unlearned one (same seeds):
its samples, its family metrics, the metric suite's numbers and pictures, and the suite's retain set.
None of it depends on the method or on the thresholds, so the runs of a sweep repeat it. With
``train.cache_pretrained_eval`` the first run stores it under ``paths.cache_dir`` and the others read
it back, bit for bit what they would have computed.

The key covers the resolved config except the keys that cannot reach the pretrained side
(:data:`NOT_PRETRAINED`: the method, the thresholds, the number of dual steps, what
:data:`unlearn.checkpoint.RUNTIME_KEYS` lists), the size and time of every file the config names
(a local model folder, forget images, a retain folder), the source of this package and the
versions of the numerical libraries, the setup's weight folder, which metric weights loaded (with
their records) and the device with its thread count. A model named only by a hub id, or given as a
pipeline object to :func:`unlearn.run`, is not cached: its weights are outside the key.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import RUNTIME_KEYS, _drop
from .utils import atomic_torch_save, config_hash

log = logging.getLogger(__name__)

NOT_PRETRAINED = RUNTIME_KEYS + ("method", "experiment", "formulation.threshold_factor", "formulation.thresholds",
                                 "formulation.dual_steps", "formulation.robust", "train.dual_steps",
                                 "train.satisfied_tol", "train.oracle_multipliers", "train.cache_pretrained_eval")
VERSION = 1
PATH_KEYS = ("path", "folder", "images", "file")
_CODE: str | None = None


def _code_hash() -> str:
    global _CODE
    if _CODE is None:
        h = hashlib.sha256()
        root = Path(__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        _CODE = h.hexdigest()[:16]
    return _CODE


def _files(node, out: list, name: str = ""):
    """``(path, size, mtime_ns)`` of every file under each existing path the config names (a value
    with a path separator, or under a key such as ``path``, ``*_folder`` or ``*_images``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _files(v, out, str(k))
    elif isinstance(node, list):
        for v in node:
            _files(v, out, name)
    elif isinstance(node, str) and node and ("/" in node or os.sep in node or name.endswith(PATH_KEYS)) \
            and os.path.exists(node):
        p = Path(node)
        for f in sorted([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]):
            s = f.stat()
            out.append((str(f), s.st_size, s.st_mtime_ns))


def cache_key(cfg: DictConfig, setup_info: dict | None = None, evaluator=None, device: dict | None = None) -> str | None:
    """The key of the pretrained side of ``cfg``'s run, or None where it is not cached (switched off,
    a model given by a hub id, or a pipeline object handed to :func:`unlearn.run`). ``setup_info``: the
    setup's stable info (its weight folder's files enter the key); ``evaluator``: which metric weights
    loaded, with their records; ``device``: the device, its name and the torch threads."""
    from .families.diffusers_family import _PIPELINE

    if not bool(cfg.train.cache_pretrained_eval) or OmegaConf.select(cfg, "model.hub_id") or _PIPELINE.get() is not None:
        return None
    import diffusers
    import numpy
    import peft
    import transformers

    resolved = _drop(OmegaConf.to_container(cfg, resolve=True), NOT_PRETRAINED)
    files: list = []
    _files(resolved, files)
    _files(setup_info or {}, files)
    metric_weights = None
    if evaluator is not None:
        suite = evaluator.suite
        metric_weights = {"loaded": sorted(suite._loaded), "records": suite._records}
    return config_hash({"version": VERSION, "config": resolved, "files": sorted(set(files)), "code": _code_hash(),
                        "libraries": [torch.__version__, diffusers.__version__, peft.__version__,
                                      transformers.__version__, numpy.__version__],
                        "metric_weights": metric_weights, "device": device})


def _path(cfg: DictConfig, key: str) -> Path:
    return Path(str(cfg.paths.cache_dir)) / "pretrained_eval" / f"{cfg.model.name}_{key}.pt"


def load(cfg: DictConfig, key: str | None) -> dict | None:
    """The stored pretrained side, or None (no key, nothing stored, or a file that does not read)."""
    if key is None or not _path(cfg, key).exists():
        return None
    try:
        return torch.load(_path(cfg, key), map_location="cpu", weights_only=True)
    except Exception as e:  # a broken cache file is recomputed, never trusted
        log.warning("pretrained evaluation cache %s unreadable (%s): recomputing", _path(cfg, key), e)
        return None


def store(cfg: DictConfig, key: str | None, side: dict) -> None:
    if key is not None:
        atomic_torch_save(side, _path(cfg, key))


def eval_pictures(run_dir: Path, prefix: str) -> dict[str, bytes]:
    """The metric suite's PNG grids of one evaluation (``run_dir/eval/<prefix>*.png``)."""
    folder = Path(run_dir) / "eval"
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{prefix}*.png"))} if folder.exists() else {}


def write_pictures(run_dir: Path, pictures: dict[str, bytes]) -> None:
    folder = Path(run_dir) / "eval"
    if pictures:
        folder.mkdir(parents=True, exist_ok=True)
    for name, data in pictures.items():
        (folder / name).write_bytes(data)
