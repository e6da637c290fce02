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


def save_grid(path: Path, rows: list[tuple[str, torch.Tensor]], title: str = ""):
    """A PNG grid: one labelled row per (name, images (N, 3, H, W) in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(x) for _, x in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol + 1.5, 1.7 * len(rows) + 0.5), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        axes[r][0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
