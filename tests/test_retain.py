"""A retain folder is streamed from disk, without the forget images, and is KID's real reference."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "retain"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        arr = np.full((8, 8, 3), 20 * i, dtype=np.uint8) + rng.integers(0, 5, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / ("sub" if i % 3 == 0 else ".") / f"img{i:02d}.png")
    (d / "notes.txt").write_text("not an image")
    # forget images: one of the folder's own files, and a byte copy of another under a new name
    forget = [d / "img01.png", tmp_path / "copy_of_img04.png"]
    shutil.copy(d / "img04.png", forget[1])
    return d, forget


def test_retain_folder_streams_without_the_forget_images(folder):
    from unlearn.imageio import load_images
    from unlearn.retain import RetainFolder

    d, forget = folder
    r = RetainFolder(d, 8, lambda x: x * 2 - 1, forget)
    assert len(r) == 10 and {p.name for p in r.excluded} == {"img01.png", "img04.png"}
    assert not any(isinstance(v, torch.Tensor) for v in vars(r).values())  # only the file list is held
    banned = load_images([d / "img01.png", d / "img04.png"], 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([r(16, g) for _ in range(8)])
    assert seen.shape == (128, 3, 8, 8)
    assert not any(torch.equal(x, b) for x in seen for b in banned)
    assert len({tuple(x.flatten()[:4].tolist()) for x in seen}) == 10  # every retain image is drawn
    ref = r.reference(6, seed=3)
    assert ref.shape == (6, 3, 8, 8) and torch.equal(ref, r.reference(6, seed=3)) and 0 <= ref.min() <= ref.max() <= 1
    assert len(r.reference(100, seed=0)) == 10


def test_retain_folder_feeds_fu_and_kid_reference(folder):
    import unlearn

    d, forget = folder
    cfg = compose_cfg(["model=tiny_ddpm", "formulation=fu", f"model.retain_folder={d}", "formulation.retain=data",
                       "metrics.retain.source=data", "metrics.retain.num_candidates=5",
                       f"model.forget_images=[{forget[0]},{forget[1]}]"])
    setup, sampler, f, *_ = unlearn.build(cfg)
    assert setup.info["retain_folder"]["used"] == 10 and len(setup.info["retain_folder"]["excluded_forget_images"]) == 2
    assert f.retain_sampler is setup.retain_sampler and f.retain_pool is None  # FU draws from the folder
    ref = setup.reference_images()
    assert ref.shape == (5, 3, 8, 8)
    assert len(f.forget) == 2


def test_a_retain_folder_of_only_forget_images_is_one_line(tmp_path):
    import unlearn
    from unlearn.config import ConfigError

    d = tmp_path / "only"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(d / "a.png")
    cfg = compose_cfg(["model=tiny_ddpm", "formulation=fu", f"model.retain_folder={d}", "formulation.retain=data",
                       f"model.forget_images=[{d / 'a.png'}]"])
    with pytest.raises(ConfigError, match="model.retain_folder=.* holds only forget images"):
        unlearn.build(cfg)
