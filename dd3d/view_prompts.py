"""Stage 2's text conditioning: one Gaussian per view label, fitted once, sampled every iteration.

For a learned distribution the template is "prefix [ctx] suffix, <view> view"; for a plain prompt (DreamFusion) it
is "<prompt>, <view> view" with zero spread. The unconditional branch is always the empty prompt.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dd3d.distribution import VIEWS, Gaussian, Mixture, build_sampler
from dd3d.nerf.cameras import wrap_azimuth

# Perp-Neg's negatives: the azimuth sectors' view words, each with the centre of its sector (side: either flank).
SECTOR_CENTRES = {"front": (0.0,), "side": (90.0, -90.0), "back": (180.0,)}


def negative_weights(azimuths: torch.Tensor, views: list[str], weight: float) -> torch.Tensor:
    """(B, 3) weights of the SECTOR_CENTRES views as negatives for cameras at these azimuths (degrees): 0 up to 45
    degrees from a view's centre (the camera's own view), rising linearly to `weight` at 90 degrees and beyond, as
    Perp-Neg's 3D recipe weighs a negative by how far the camera is from it (a camera near a sector's edge is barely
    pushed from the view next to it); overhead cameras get none."""
    columns = []
    for centres in SECTOR_CENTRES.values():
        offset = torch.stack([wrap_azimuth(azimuths.float() - centre).abs() for centre in centres]).amin(0)
        columns.append(weight * ((offset - 45.0) / 45.0).clamp(0.0, 1.0))
    weights = torch.stack(columns, dim=1)
    return weights * torch.tensor([view != "overhead" for view in views], dtype=weights.dtype)[:, None]


class ViewPrompts:
    """Draws (cond, uncond) text embeddings for a batch of cameras from their view labels."""

    def __init__(self, samplers: dict[str, Gaussian | Mixture], uncond: torch.Tensor):
        self.samplers = samplers
        self.uncond = uncond  # (1, 77, d)
        first = next(iter(samplers.values()))
        self.shape = (first.components[0] if isinstance(first, Mixture) else first).mean.shape

    @classmethod
    def from_distributions(cls, cfg: DictConfig, backbone) -> "ViewPrompts":
        """cfg holds sample2d's keys: dists, weights, mix, std_scale, prefix, suffix, class_index."""
        samplers = {view: build_sampler(cfg, backbone, view) for view in VIEWS}
        return cls(samplers, backbone.encode_text([""]).float())

    @classmethod
    def from_text(cls, prompt: str, backbone) -> "ViewPrompts":
        embeddings = backbone.encode_text([f"{prompt}, {view} view" for view in VIEWS]).float()
        samplers = {view: Gaussian(row, torch.zeros_like(row)) for view, row in zip(VIEWS, embeddings)}
        return cls(samplers, backbone.encode_text([""]).float())

    def draw(self, views: list[str], eps: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond (B, 77, d) from each camera's view Gaussian with the given standard-normal eps (B, 77, d) and
        mixture uniforms (B,), and the matching uncond (B, 77, d)."""
        cond = torch.stack(
            [self.samplers[view].apply(e[None], u[None])[0][0] for view, e, u in zip(views, eps, uniforms)]
        )
        return cond, self.uncond.expand(len(views), -1, -1)

    def negatives(self, views: list[str], azimuths: torch.Tensor, eps: torch.Tensor, uniforms: torch.Tensor,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For each camera, the same draw (eps, uniform) under the front, side and back view words: embeddings
        (B, 3, 77, d) and their weights as negatives (B, 3) (`negative_weights`; `guided_eps` skips a negative that
        has weight 0 for every camera)."""
        embeddings = torch.stack([self.draw([view] * len(views), eps, uniforms)[0] for view in SECTOR_CENTRES], dim=1)
        return embeddings, negative_weights(azimuths, views, weight)
