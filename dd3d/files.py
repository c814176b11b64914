"""Files dd3d writes: atomically (a temp file in the same folder, then a rename, so no reader sees half a file),
checkpoints, and image grids."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then move the result onto `path` in one step. The file gets the usual mode of a new
    file (0666 less the umask), whatever mode the writer gave the temporary file (safetensors: 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix stays: writers key on it
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    mask = os.umask(0o077)  # the only way to read it is to set it (briefly, to the strictest value)
    os.umask(mask)
    return mask


STEP_FILE = re.compile(r"step-(\d+)\.pt")


class Checkpoints:
    """Atomic `step-NNNNNN.pt` files in one folder; only the newest `keep` are kept."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), max(1, keep)

    def paths(self) -> list[Path]:
        """The checkpoint files, oldest step first (by step number: step-1000000 comes after step-999999)."""
        numbered = [(int(m.group(1)), p) for p in self.folder.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
        return [path for _, path in sorted(numbered)]

    def save(self, step: int, state: dict) -> Path:
        path = self.folder / f"step-{step:06d}.pt"
        atomic_write(path, lambda tmp: torch.save({"step": step, **state}, tmp))
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def load_latest(self) -> dict | None:
        paths = self.paths()
        return torch.load(paths[-1], map_location="cpu", weights_only=True) if paths else None


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size tiled into a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % cols) * width, (index // cols) * height))
    return grid
