"""Image files in and PNG grids out (shared by the image families and the metric suite)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ACCEPTED = ("an image file of one frame (PNG, JPEG, WebP, BMP, ...): 8-bit RGB, RGBA, grey, palette or CMYK, or "
            "16-bit grey (alpha is composited onto white)")
MAX_UPSCALE = 4  # an image whose shorter side is below image_size / MAX_UPSCALE carries too little to resize


def open_image(path, key: str, decode: bool = True):
    """The image file at ``path``, read and checked (a PIL image); else one :class:`ConfigError` line
    naming ``key`` and what is accepted: readable, one frame, a mode whose range is defined (32-bit
    integer and float images are not). ``decode=False`` reads the header only (no pixel data)."""
    from PIL import Image

    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise ConfigError(f"{key}: {str(p)!r} is a folder; accepted: image files, listed one by one "
                          f"(e.g. [{p / 'a.png'}, {p / 'b.png'}])")
    if not p.is_file():
        raise ConfigError(f"{key}: {str(p)!r} does not exist; accepted: {ACCEPTED}")
    try:
        im = Image.open(p)
        if decode:
            im.load()  # the pixel data: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: {str(p)!r} is not a readable image ({reason}); accepted: {ACCEPTED}") from None
    if getattr(im, "n_frames", 1) > 1:
        raise ConfigError(f"{key}: {str(p)!r} has {im.n_frames} frames (an animation or a multi-page file); "
                          f"accepted: {ACCEPTED}")
    if im.mode in ("I", "F"):
        raise ConfigError(f"{key}: {str(p)!r} is a {'32-bit integer' if im.mode == 'I' else 'floating-point'} "
                          f"image (mode {im.mode}, no defined range); accepted: {ACCEPTED}")
    return im


def to_rgb(im):
    """8-bit RGB: 16-bit grey scaled (not clipped), alpha composited onto white, other modes converted."""
    from PIL import Image

    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_images(paths, size: int, key: str = "image") -> torch.Tensor:
    """Image files as a float tensor (N, 3, size, size) in [0, 1] (center crop, bicubic resize), each
    checked by :func:`open_image`; a shorter side below ``size / MAX_UPSCALE`` (at least 2 pixels) is
    a :class:`ConfigError` naming ``key``."""
    from PIL import Image

    smallest = max(2, size // MAX_UPSCALE)
    out = []
    for p in paths:
        im = open_image(p, key)
        s = min(im.size)
        if s < smallest:
            raise ConfigError(f"{key}: {str(p)!r} is {im.width}x{im.height} pixels; accepted: a shorter side of at "
                              f"least {smallest} (images are center-cropped and resized to the model's {size}x{size}; "
                              f"more than {MAX_UPSCALE}x upscaling leaves nothing to learn from)")
        try:
            im = to_rgb(im)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{key}: {str(p)!r} (mode {im.mode}) cannot be converted to RGB ({exc}); "
                              f"accepted: {ACCEPTED}") from None
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def image_files(folder) -> list[Path]:
    """The image files under ``folder`` (recursively, by suffix), sorted."""
    return sorted(p for p in Path(str(folder)).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def has_images(folder) -> bool:
    """Whether ``folder`` holds an image file (stops at the first)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in Path(str(folder)).expanduser().rglob("*"))


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
