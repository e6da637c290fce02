"""Image files in and PNG grids out (shared by the image families and the metric suite)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(paths, size: int) -> torch.Tensor:
    """Image files as a float tensor (N, 3, size, size) in [0, 1] (center crop, bicubic resize)."""
    from PIL import Image

    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def image_files(folder) -> list[Path]:
    return sorted(p for p in Path(str(folder)).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def save_grid(path: Path, rows: list[tuple[str, torch.Tensor]], title: str = "", cell: int = 96):
    """A PNG grid: one labelled row per (name, images (N, 3, H, W) in [0, 1]); each image is scaled
    to ``cell`` pixels (nearest neighbour below that size, so 8x8 digits stay crisp)."""
    from PIL import Image, ImageDraw

    ncol = max(len(x) for _, x in rows)
    label, pad = 14, 4
    top = label + pad if title else 0
    grid = Image.new("RGB", (ncol * (cell + pad) + pad, top + len(rows) * (cell + label + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 2), title, fill="black")
    for r, (name, imgs) in enumerate(rows):
        y = top + r * (cell + label + pad) + pad
        draw.text((pad, y), name, fill="black")
        for c, img in enumerate(imgs[:ncol]):
            arr = (img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            im = Image.fromarray(arr)
            im = im.resize((cell, cell), Image.NEAREST if im.width < cell else Image.BICUBIC)
            grid.paste(im, (pad + c * (cell + pad), y + label))
    grid.save(path)
