"""Atomic file writes: a temp file in the same folder, then a rename, so no reader sees half a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then move the result onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix stays: writers key on it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Checkpoints:
    """Atomic `step-NNNNNN.pt` files in one folder; only the newest `keep` are kept."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), max(1, keep)

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.pt"))

    def save(self, step: int, state: dict) -> Path:
        path = self.folder / f"step-{step:06d}.pt"
        atomic_write(path, lambda tmp: torch.save({"step": step, **state}, tmp))
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def load_latest(self) -> dict | None:
        paths = self.paths()
        return torch.load(paths[-1], map_location="cpu", weights_only=True) if paths else None
