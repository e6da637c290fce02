"""A retain folder streamed from disk (``model.retain_folder``): only the file list is held in memory.

CelebA-HQ's 30,000 images at 256x256 would take about 24 GB as float tensors; here each batch reads
and encodes just its own files. The forget images are never among them: a file of the folder that is
a forget image (the same path, or the same bytes under another name) is left out.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from .imageio import image_files, load_images, open_image

KEY = "model.retain_folder"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def excluded_files(files: list[Path], forget: list) -> set[Path]:
    """The files that are forget images: the same resolved path, or the same bytes (only files of a
    forget file's size are read, so a large folder costs one ``stat`` per file)."""
    forget = [Path(str(f)).expanduser().resolve() for f in forget]
    if not forget:
        return set()
    paths = set(forget)
    sizes = {f.stat().st_size for f in forget if f.is_file()}
    digests = {_digest(f) for f in forget if f.is_file()}
    out = set()
    for p in files:
        r = p.resolve()
        if r in paths or (p.stat().st_size in sizes and _digest(p) in digests):
            out.add(p)
    return out


def identify(path: Path) -> None:
    """The file's header names a readable image of one frame (no pixel data are read, so a folder of
    30,000 files takes seconds); else one :class:`ConfigError` line. A file whose pixel data turn out
    to be damaged stops the run with the same kind of line when a batch first draws it."""
    open_image(path, KEY, decode=False).close()


class RetainFolder:
    """The images of a folder minus the forget images, drawn at random and encoded per batch.

    ``encode``: images in [0, 1] -> model space (the family's ``from_images``)."""

    def __init__(self, folder, size: int, encode: Callable[[torch.Tensor], torch.Tensor], forget=()):
        all_files = image_files(folder)
        self.excluded = sorted(excluded_files(all_files, list(forget)))
        drop = set(self.excluded)
        self.files = [p for p in all_files if p not in drop]
        self.size, self.encode = int(size), encode
        for p in self.files:
            identify(p)


    def __len__(self) -> int:
        return len(self.files)

    def images(self, idx) -> torch.Tensor:
        """The files at ``idx`` as images (N, 3, size, size) in [0, 1]."""
        return load_images([self.files[int(i)] for i in idx], self.size, KEY)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` retain samples in model space, drawn uniformly with replacement."""
        idx = torch.randint(0, len(self.files), (int(n),), generator=generator)
        return self.encode(self.images(idx))

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """KID's real-data reference: ``n`` distinct images (all of them if fewer), chosen by ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self.files), generator=g)[:int(n)]
        return self.images(sorted(idx.tolist()))

    def info(self) -> dict:
        return {"folder_images": len(self.files) + len(self.excluded), "used": len(self.files),
                "excluded_forget_images": [str(p) for p in self.excluded]}
