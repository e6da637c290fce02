"""Finding pretrained diffusers weights: a local folder (``model.path``) or the Hugging Face hub.

Without the weights the run stops before any work with one line naming the model and the three
ways to provide it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError

ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
         "*/diffusion_pytorch_model.bin", "*/pytorch_model.bin"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "vocab.json")


class MissingWeightsError(ConfigError):
    """Pretrained weights are neither local nor downloadable."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_layout(root: Path, layout: tuple[str, ...], key: str = "model.path") -> None:
    """``layout``: the sub-folders a diffusers folder of the family must have (each with a config file)."""
    missing = [d for d in layout if not any((root / d / f).exists() for f in CONFIG_FILES)]
    if missing:
        raise ConfigError(f"{key}={str(root)!r} is not a diffusers folder of this model: missing "
                          f"{', '.join(d + '/' for d in missing)} (expected {', '.join(d + '/' for d in layout)}"
                          f" as written by DiffusionPipeline.save_pretrained)")
    # a model's sub-folder (its config.json) holds its weights; tokenizer/ and scheduler/ hold none
    empty = [d for d in layout if (root / d / "config.json").exists()
             and not any(p.suffix in WEIGHT_SUFFIXES for p in (root / d).iterdir())]
    if empty:
        raise ConfigError(f"{key}={str(root)!r} holds no weights in {', '.join(d + '/' for d in empty)} (expected "
                          f"*.safetensors or *.bin files as written by DiffusionPipeline.save_pretrained)")


def locate_weights(name: str, hub_id: str | None, path: str | None, layout: tuple[str, ...], revision: str | None = None) -> Path:
    """The local folder holding the model's diffusers layout; downloads when allowed and reachable."""
    if path:
        root = Path(str(path)).expanduser()
        if not root.is_dir():
            hub = f" (or `hf download {hub_id}`)" if hub_id else ""
            raise MissingWeightsError(f"model.path={str(root)!r} {'is a file' if root.exists() else 'does not exist'}; "
                                      f"point it at a folder written by DiffusionPipeline.save_pretrained{hub}")
        check_layout(root, layout)
        return root
    if not hub_id:
        raise ConfigError(f"model {name}: set model.hub_id or model.path")
    from huggingface_hub import snapshot_download

    how = (f"connect to the internet, pre-download it with `hf download {hub_id}`, "
           f"or set model.path=/path/to/a/local/copy")
    try:
        root = Path(snapshot_download(hub_id, revision=revision, allow_patterns=ALLOW, local_files_only=True))
        check_layout(root, layout, key=f"the cached copy of {hub_id}")
        return root
    except ConfigError:
        raise
    except Exception:
        pass
    if _offline():
        raise MissingWeightsError(f"model {name} ({hub_id}) is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                                  f"set: {how}")
    try:
        root = Path(snapshot_download(hub_id, revision=revision, allow_patterns=ALLOW, etag_timeout=10))
    except Exception as exc:
        raise MissingWeightsError(f"model {name} ({hub_id}) is not in the Hugging Face cache and could not be "
                                  f"downloaded ({type(exc).__name__}): {how}") from None
    check_layout(root, layout, key=f"the downloaded copy of {hub_id}")
    return root
