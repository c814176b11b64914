"""Stage 2's text conditioning: one Gaussian per view label, fitted once, sampled every iteration.

For a learned distribution the template is "prefix [ctx] suffix, <view> view"; for a plain prompt (DreamFusion) it
is "<prompt>, <view> view" with zero spread. The unconditional branch is always the empty prompt.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dd3d.distribution import VIEWS, Gaussian, Mixture, build_sampler


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
