"""The Python entry point: compose a config the way ``python train.py`` does and run it.

    import unlearn
    cfg = unlearn.compose(["model=digits", "formulation=lu", "train.dual_steps=4"])
    summary = unlearn.run(cfg, run_dir="outputs/runs/notebook")
    print(summary["status"], summary["multipliers"])

``train.py`` is a thin Hydra user of the same :func:`unlearn.train.train`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The composed config of ``python train.py <overrides>`` (Hydra's compose API, no run directory).
    An unknown group option raises :class:`~unlearn.config.ConfigError` naming the accepted ones."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .cli import check_group_overrides
    from .config import ConfigError, register_resolvers

    register_resolvers()
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    msg = check_group_overrides(list(overrides), root)
    if msg:
        raise ConfigError(msg.removeprefix("error: "))
    with initialize_config_dir(config_dir=str(root.resolve()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run(cfg: DictConfig | Sequence[str] = (), run_dir: str | Path | None = None, pipeline=None) -> dict:
    """One unlearning run (a composed config, or the overrides to compose); returns its summary
    (also written to ``run_dir/summary.json``). ``run_dir`` defaults to ``cfg.paths.run_dir``.

    ``pipeline``: a diffusers pipeline object of the model family (e.g. a ``StableDiffusionPipeline``
    for ``model=sd14`` or ``model=digits_sd``) whose components the run unlearns instead of loading
    ``model.path``; the pipeline itself is left unchanged, and ``pipeline.load_lora_weights(run_dir)``
    applies the result."""
    from .families.diffusers_family import using_pipeline
    from .train import train

    if not isinstance(cfg, DictConfig):
        cfg = compose(list(cfg))
    if pipeline is None:
        return train(cfg, run_dir=run_dir)
    with using_pipeline(pipeline):
        return train(cfg, run_dir=run_dir)


def build(cfg: DictConfig | Sequence[str] = (), show_progress: bool = False):
    """The run's parts without training: ``(setup, sampler, formulation, multipliers, generator)``."""
    from .train import build as _build

    if not isinstance(cfg, DictConfig):
        cfg = compose(list(cfg))
    return _build(cfg, show_progress=show_progress)
