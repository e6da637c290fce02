"""Bad input to the image families: one line naming the key and what is accepted, raised before
anything is trained (the catalogue is docs/image-models.md, "Bad input").

Each case is ``(id, overrides, stage, fragments)``: ``stage`` is where it fails -- ``config``: in
:func:`unlearn.train.check_config`, before any weights are loaded; ``build``: once the model is
built (what needs its layers, tokenizer or image size), before training starts. ``{d}`` is the
folder of bad files made below. A few cases also run through the real ``train.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from test_cli import run_cli_batch
from unlearn.config import ConfigError

DDPM_FU = ["model=tiny_ddpm", "formulation=fu"]
SD_LU = ["model=tiny_sd", "formulation=lu"]
LONG = " ".join(["horse"] * 80)  # 82 tokens with the start and end tokens

CATALOGUE = [
    # forget images
    ("forget image not an image", DDPM_FU + ["model.forget_images=[{d}/x.png]"], "config",
     ["model.forget_images[0]: ", "is not a readable image", "accepted: an image file of one frame"]),
    ("forget image missing", DDPM_FU + ["model.forget_images=[{d}/missing.png]"], "config",
     ["model.forget_images[0]: ", "does not exist", "accepted:"]),
    ("forget image a folder", DDPM_FU + ["model.forget_images=[{d}/empty]"], "config",
     ["model.forget_images[0]: ", "is a folder", "accepted: image files"]),
    ("forget images a string", DDPM_FU + ["model.forget_images={d}/ok.png"], "config",
     ["model.forget_images must be a list of image files"]),
    ("forget images empty where needed", DDPM_FU + ["model.forget_images=[]", "model.forget_generated=0"], "build",
     ["model.forget_images is empty", "accepted: model.forget_images=[", "model.forget_generated > 0"]),
    ("forget image 1x1", DDPM_FU + ["model.forget_images=[{d}/one.png]"], "build",
     ["model.forget_images: ", "is 1x1 pixels", "accepted: a shorter side of at least 2", "resized to the model's 8x8"]),
    ("forget image animated", DDPM_FU + ["model.forget_images=[{d}/two.gif]"], "config",
     ["model.forget_images[0]: ", "has 2 frames", "accepted:"]),
    ("forget image float", DDPM_FU + ["model.forget_images=[{d}/float.tiff]"], "config",
     ["model.forget_images[0]: ", "floating-point image", "accepted:"]),
    ("forget image repeated", DDPM_FU + ["model.forget_images=[{d}/ok.png,{d}/ok.png]"], "config",
     ["model.forget_images lists", "twice"]),
    # prompts
    ("unlearn prompts empty", SD_LU + ["model.prompts.unlearn=[]"], "config",
     ["model.prompts.unlearn is empty", "accepted: a list of at least one prompt"]),
    ("retain prompts empty", SD_LU + ["model.prompts.retain=[]"], "config",
     ["model.prompts.retain is empty", "accepted:"]),
    ("prompt too long", SD_LU + [f"model.prompts.unlearn=['{LONG}']"], "build",
     ["model.prompts.unlearn[0] is 82 tokens long", "accepted: at most 77 tokens"]),
    ("prompt a number", SD_LU + ["model.prompts.unlearn=[1,2]"], "config",
     ["model.prompts.unlearn[0] must be a string (got 1", "accepted: a list of prompts"]),
    ("prompt a nested list", SD_LU + ["model.prompts.unlearn=[[a,b]]"], "config",
     ["model.prompts.unlearn[0] must be a string (got ['a', 'b']"]),
    ("prompts a string", SD_LU + ["model.prompts.retain=cowboy"], "config",
     ["model.prompts.retain must be a list of prompts (got 'cowboy')"]),
    ("unlearn prompt repeated", SD_LU + ["model.prompts.unlearn=[horse,horse]"], "config",
     ["model.prompts.unlearn lists 'horse' twice"]),
    # weights folder
    ("model.path missing", SD_LU + ["model.path={d}/nowhere"], "config",
     ["model.path=", "does not exist", "accepted: a folder written by DiffusionPipeline.save_pretrained"]),
    ("model.path not diffusers", SD_LU + ["model.path={d}/empty"], "config",
     ["model.path=", "is not a diffusers folder", "missing unet/"]),
    ("model.path without weights", DDPM_FU + ["model.path={d}/no_weights"], "config",
     ["model.path=", "holds no weights in unet/", "as written by DiffusionPipeline.save_pretrained"]),
    ("model.path corrupt weights", DDPM_FU + ["model.path={d}/corrupt"], "build",
     ["model.path=", "cannot be loaded (OSError", "accepted: a folder written by DiffusionPipeline.save_pretrained"]),
    # LoRA
    ("lora regex matches nothing", SD_LU + ["model.lora.target_modules=nomatch"], "build",
     ["model.lora.target_modules='nomatch' matches no layer", "e.g. down_blocks.", "to_q"]),
    ("lora regex invalid", SD_LU + ["model.lora.target_modules='('"], "config",
     ["model.lora.target_modules='(' is not a valid regular expression", "accepted:"]),
    ("lora rank zero", SD_LU + ["model.lora.rank=0"], "config", ["model.lora.rank must be an integer >= 1"]),
    # learning rates
    ("primal lr negative", SD_LU + ["formulation.primal_lr=-1"], "config",
     ["formulation.primal_lr must be a learning rate > 0 (got -1)"]),
    ("primal lr zero", DDPM_FU + ["formulation.primal_lr=0"], "config", ["formulation.primal_lr must be"]),
    ("primal lr not a number", SD_LU + ["formulation.primal_lr=abc"], "config",
     ["formulation.primal_lr must be a learning rate > 0 (got 'abc')"]),
    ("dual lr negative", SD_LU + ["formulation.dual_lr=-1"], "config",
     ["method.dual_lr must be > 0", "set by formulation.dual_lr", "got -1"]),
    ("dual lr not a number", DDPM_FU + ["formulation.dual_lr=fast"], "config",
     ["method.dual_lr must be a number", "got 'fast'"]),
    # thresholds on the trivial side
    ("lu factor >= 1", SD_LU + ["formulation.threshold_factor=1.5"], "config",
     ["formulation.threshold_factor must be < 1 for formulation=lu", "met by the pretrained model"]),
    ("ru factor <= 1", ["model=tiny_sd", "formulation=ru", "formulation.threshold_factor=0.9"], "config",
     ["formulation.threshold_factor must be > 1 for formulation=ru"]),
    ("fu factor <= 1", DDPM_FU + ["formulation.threshold_factor=1.0"], "config",
     ["formulation.threshold_factor must be > 1 for formulation=fu"]),
    # retain folder
    ("retain folder missing", DDPM_FU + ["model.retain_folder={d}/nowhere"], "config",
     ["model.retain_folder=", "is not a folder", "accepted: a folder of images"]),
    ("retain folder empty", DDPM_FU + ["model.retain_folder={d}/empty"], "config",
     ["model.retain_folder=", "holds no images", "accepted:"]),
    ("retain folder without images", DDPM_FU + ["model.retain_folder={d}/texts"], "config",
     ["model.retain_folder=", "holds no images"]),
    ("retain folder broken image", DDPM_FU + ["model.retain_folder={d}/broken"], "build",
     ["model.retain_folder: ", "is not a readable image"]),
    # training data and classes
    ("forget index out of range", ["model=digits", "formulation=fu", "model.forget_indices=[1000]"], "config",
     ["model.forget_indices must list training images in 0..999 (got [1000])"]),
    ("forget index negative", ["model=digits", "formulation=fu", "model.forget_indices=[3,-1]"], "config",
     ["model.forget_indices must list training images in 0..999 (got [-1])"]),
    ("forget index without data", ["model=tiny_classcond", "formulation=fu", "model.forget_indices=[0]"], "config",
     ["model.forget_indices needs a model with its own training data", "accepted: model.forget_images"]),
    ("unlearn class unknown", ["model=tiny_classcond", "formulation=lu", "model.classes.unlearn=[9]"], "config",
     ["model.classes.unlearn must list class labels in 0..3 (got [9])"]),
    ("unlearn class not a list", ["model=tiny_classcond", "formulation=lu", "model.classes.unlearn=1"], "config",
     ["model.classes.unlearn must be a list of class labels in 0..3 (got 1)"]),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("bad_files")
    (d / "x.png").write_text("not an image")
    Image.new("RGB", (20, 30), "red").save(d / "ok.png")
    Image.new("RGB", (1, 1)).save(d / "one.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(d / "two.gif", save_all=True, append_images=frames[1:])
    Image.new("F", (16, 16)).save(d / "float.tiff")
    (d / "empty").mkdir()
    (d / "texts").mkdir()
    (d / "texts" / "notes.txt").write_text("no images here")
    (d / "broken").mkdir()
    (d / "broken" / "a.png").write_text("not an image either")
    for folder in ("no_weights", "corrupt"):  # the pixel DDPM's layout: configs without weights / corrupt ones
        for sub, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
            (d / folder / sub).mkdir(parents=True)
            (d / folder / sub / name).write_text("{}")
    (d / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_text("not weights")
    return d


def _cfg(overrides, d: Path):
    return compose_cfg([o.replace("{d}", str(d)) for o in overrides] + ["num_threads=1"])


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_naming_the_key(case, bad_files):
    from unlearn.train import build, check_config

    _, overrides, stage, fragments = case
    cfg = _cfg(overrides, bad_files)
    with pytest.raises(ConfigError) as err:
        if stage == "build":
            check_config(cfg)  # passes: the failure needs the built model
        build(cfg, show_progress=False) if stage == "build" else check_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_image_modes_and_sizes_are_converted_not_rejected(tmp_path):
    """Any size is center-cropped and resized; grey, palette and 16-bit images become RGB (16-bit scaled,
    not clipped); alpha is composited onto white."""
    from PIL import Image

    from unlearn.imageio import load_images

    Image.new("RGBA", (40, 24), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    Image.new("L", (9, 9), 128).save(tmp_path / "grey.png")
    Image.new("RGB", (30, 20), (0, 0, 255)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    x = load_images([tmp_path / f for f in ("clear.png", "grey.png", "palette.png", "deep.png")], 8)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(3, 8, 8))  # transparent: white
    assert torch.allclose(x[1], torch.full((3, 8, 8), 128 / 255))
    assert torch.allclose(x[2], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 8, 8))
    assert torch.allclose(x[3], torch.full((3, 8, 8), round(40000 / 257) / 255))  # not clipped to white


def test_many_prompts_are_accepted(bad_files):
    """No limit on the number of prompts: each unlearn prompt is one constraint."""
    from unlearn.train import check_config

    check_config(_cfg(SD_LU + [f"model.prompts.unlearn=[{','.join(f'concept {i}' for i in range(200))}]"], bad_files))


RUN_FILES = {"config.yaml": "seed: 0\n", "summary.json": json.dumps({"status": "completed"}),
             "run_info.json": json.dumps({"format": "unlearn-run", "format_version": 1}),
             "metrics.jsonl": "{}\n", "model.pt": "weights"}


def _files(folder: Path) -> dict:
    """The run's files (Hydra's own ``.hydra/`` and ``<job>.log`` record every invocation)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix != ".log"}


def _results(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RUN_FILES.items():
        (folder / name).write_text(text)
    return _files(folder)


@pytest.mark.slow  # about 11 s (three CLI runs); tests/test_cli.py keeps a CLI exit-code-2 check in the default suite
def test_train_py_exits_2_with_one_line_and_keeps_earlier_results(bad_files, tmp_path):
    """Through the real entry point: a bad forget file aimed at a directory holding a finished run
    (its files stay as they were), a LoRA regex that matches nothing (found once the model is built),
    and a sweep whose job directory holds results (the failed job's summary does not replace them)."""
    d, done, sweep = str(bad_files), tmp_path / "done", tmp_path / "sweep"
    before, job_before = _results(done), _results(sweep / "0")
    cases = [(DDPM_FU + [f"model.forget_images=[{d}/x.png]", f"hydra.run.dir={done}"], tmp_path),
             (SD_LU + ["model.lora.target_modules=nomatch", f"hydra.run.dir={tmp_path / 'fresh'}"], tmp_path),
             (["-m"] + SD_LU + ["formulation.threshold_factor=1.5", f"hydra.sweep.dir={sweep}"], tmp_path)]
    results = run_cli_batch([(a + ["logger=none", "progress=false"], c) for a, c in cases], tmp_path, timeout=300)
    for (args, _), r, key in zip(cases, results, ["model.forget_images[0]", "model.lora.target_modules", None]):
        lines = [ln for ln in r["stderr"].strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"]
        if key:
            assert r["code"] == 2 and lines[0].startswith(f"error: {key}"), r
    assert results[2]["code"] == 0 and results[2]["stderr"].startswith("error (job 0): formulation.threshold_factor")
    assert _files(done) == before and _files(sweep / "0") == job_before
