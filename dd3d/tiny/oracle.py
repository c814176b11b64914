"""The oracle: a small CNN that tells which object kind, colour and view a picture of the procedural world shows.

Trained on the world's renders (`dd3d.tiny.train`), shipped beside the embedded default model as
`oracle.safetensors` + `oracle.json`; it turns "does the generated image show a red house from the side" into a
number. Images of any size are resized to the oracle's resolution.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from dd3d.files import atomic_write
from dd3d.tiny.world import COLOUR_NAMES, KINDS, OTHER, VIEWS

HEADS = {"kind": (*KINDS, OTHER), "colour": COLOUR_NAMES, "view": VIEWS}
WEIGHTS_NAME, CONFIG_NAME = "oracle.safetensors", "oracle.json"


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
    )


class Oracle(nn.Module):
    """Three heads (kind, colour, view) over a small convolutional trunk; inputs in [-1, 1]."""

    def __init__(self, resolution: int = 32, width: int = 16, labels: dict | None = None):
        super().__init__()
        self.resolution, self.width = resolution, width
        self.labels = {name: list(values) for name, values in (labels or HEADS).items()}
        self.trunk = nn.Sequential(
            _block(3, width, 8), nn.MaxPool2d(2),
            _block(width, 2 * width, 8), nn.MaxPool2d(2),
            _block(2 * width, 4 * width, 8), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * width * 16, 256), nn.SiLU(), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in self.labels.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for pixels (B, 3, H, W) in [-1, 1]."""
        return self.logits(self.features(pixels))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The penultimate features (B, 256) that every head reads, for pixels (B, 3, H, W) in [-1, 1]."""
        if pixels.shape[-1] != self.resolution or pixels.shape[-2] != self.resolution:
            pixels = F.interpolate(pixels, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.trunk(pixels)

    def logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images) -> dict[str, list[str]]:
        """Label names per head for PIL images or a uint8 / [0, 1] float tensor (B, 3, H, W)."""
        was_training = self.training
        self.eval()
        logits = self(as_pixels(images).to(oracle_device(self)))
        self.train(was_training)
        return {name: [self.labels[name][i] for i in out.argmax(-1).tolist()] for name, out in logits.items()}

    def save(self, folder: Path, metrics: dict | None = None) -> None:
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
        config = {"resolution": self.resolution, "width": self.width, "labels": self.labels, "metrics": metrics or {}}
        atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

    @classmethod
    def load(cls, folder: Path | None = None) -> "Oracle":
        """The oracle saved in `folder` (default: beside the embedded default model)."""
        if folder is None:
            from dd3d.backbone import DEFAULT_MODEL

            folder = DEFAULT_MODEL
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        oracle = cls(config["resolution"], config["width"], config["labels"])
        oracle.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        oracle.metrics = config.get("metrics", {})
        return oracle.eval()


def oracle_device(oracle: nn.Module) -> torch.device:
    return next(oracle.parameters()).device


def as_pixels(images) -> torch.Tensor:
    """PIL images, or a uint8 / [0, 1] float tensor (B, 3, H, W), -> float pixels in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float() * 2 - 1


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving jitter that makes the oracle robust to a generator's artefacts: shifts of a few pixels,
    blur, noise and a small brightness change (the hue is left alone: it is a label)."""
    count = pixels.shape[0]
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    pixels = torch.roll(F.pad(pixels, (2, 2, 2, 2), mode="replicate"), shifts=shift, dims=(2, 3))[..., 2:-2, 2:-2]
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(count, 1, 1, 1, generator=generator) * 0.7
    pixels = pixels * (1 - mix) + blurred * mix
    pixels = pixels * (0.9 + 0.2 * torch.rand(count, 1, 1, 1, generator=generator))
    noise = torch.randn(pixels.shape, generator=generator) * 0.06 * torch.rand(count, 1, 1, 1, generator=generator)
    return (pixels + noise).clamp(-1, 1)


def as_other(data: dict) -> dict:
    """A rendered data set of BLOBS scenes (`render_dataset(..., kinds=BLOBS)`) with its kind labelled OTHER: the
    oracle learns that a featureless shape is none of the kinds."""
    return {**data, "kind": torch.full_like(data["kind"], len(KINDS))}


def train_oracle(data: dict, steps: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, width: int = 16,
                 unlit_share: float = 0.0, progress=None, device="cpu") -> Oracle:
    """Train an oracle on a rendered data set (see `dd3d.tiny.world.render_dataset`). unlit_share: the share of each
    batch shown unlit instead (`data["unlit_images"]`, the same scenes): an asset's albedo frames show no shading."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    oracle = Oracle(resolution=data["images"].shape[-1], width=width).to(device)
    optimiser = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to zero
        optimiser, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    count = len(data["images"])
    oracle.train()
    for _ in range(steps):
        index = torch.randint(count, (batch_size,), generator=generator)
        images, lit = data["images"][index], torch.ones(batch_size, dtype=torch.bool)
        if unlit_share > 0:
            lit = torch.rand(batch_size, generator=generator) >= unlit_share
            images = torch.where(lit[:, None, None, None], images, data["unlit_images"][index])
        logits = oracle(augment(as_pixels(images), generator).to(device))
        # The view is learnt from lit images only: the world's fixed key light is a cue to it that unlit ones lack.
        rows = {name: lit.to(device) if name == "view" else slice(None) for name in HEADS}
        loss = sum(F.cross_entropy(logits[name][rows[name]], data[name][index].to(device)[rows[name]])
                   for name in HEADS)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress(loss.item())
    return oracle.eval()


@torch.no_grad()
def accuracy(oracle: Oracle, data: dict, batch_size: int = 256, images: str = "images") -> dict[str, float]:
    """Share of a rendered data set's images (`data[images]`) whose kind / colour / view the oracle gets right."""
    oracle.eval()
    correct = {name: 0 for name in HEADS}
    count = len(data["images"])
    for start in range(0, count, batch_size):
        logits = oracle(as_pixels(data[images][start : start + batch_size]).to(oracle_device(oracle)))
        for name in HEADS:
            correct[name] += int((logits[name].argmax(-1).cpu() == data[name][start : start + batch_size]).sum())
    return {name: correct[name] / count for name in HEADS}


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (B, 3, H, W) -> PIL images."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
