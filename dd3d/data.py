"""Reference image folder -> checked RGB images -> square training views (with flips and crops) in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dd3d.cli import UserError, warn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB: EXIF rotation applied, transparency over white, 16-bit rescaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        values = np.clip(values / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(values, mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_reference_images(folder: Path, min_side: int = 0) -> tuple[list[Image.Image], list[Path]]:
    """All readable images in `folder`, as RGB; unreadable ones are skipped with a warning naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images, used = [], []
    for path in files:
        try:
            with Image.open(path) as opened:
                opened.load()
                image = to_rgb(opened)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            warn(f"skipping unreadable image {path.name}: {err}")
            continue
        if min(image.size) < min_side:
            warn(f"{path.name} is only {image.size[0]}x{image.size[1]}; it is upscaled to {min_side} px")
        images.append(image)
        used.append(path)
    if not images:
        raise UserError(f"none of the {len(files)} image files in {folder} could be read")
    return images, used


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def training_views(
    images: list[Image.Image], resolution: int, flip: bool, crops: int, crop_scale: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square views of every image: the centre crop plus `crops` random crops (side >= crop_scale of the short
    side), each also mirrored when `flip`. Returns views (V, 3, R, R) in [-1, 1] and the image index of each view."""
    rng = np.random.default_rng(seed)
    views, owners = [], []
    for index, image in enumerate(images):
        width, height = image.size
        short = min(width, height)
        boxes = [((width - short) // 2, (height - short) // 2, short)]
        for _ in range(crops):
            side = int(round(short * rng.uniform(crop_scale, 1.0)))
            boxes.append((int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side))
        for left, top, side in boxes:
            view = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            variants = [view, view.transpose(Image.FLIP_LEFT_RIGHT)] if flip else [view]
            views += [_to_tensor(v) for v in variants]
            owners += [index] * len(variants)
    return torch.stack(views), torch.tensor(owners)
