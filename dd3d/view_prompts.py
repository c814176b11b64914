"""Stage 2's text conditioning: one Gaussian per view label, fitted once, sampled every iteration.

For a learned distribution the template is "prefix [ctx] suffix, <view> view"; for a plain prompt (DreamFusion) it
is "<prompt>, <view> view" with zero spread. The unconditional branch is always the empty prompt.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dd3d.distribution import VIEWS, Gaussian, Mixture, build_sampler

# The views each camera's view is steered away from with `view_negative` (Perp-Neg): the other azimuth sectors.
OTHER_VIEWS = {"front": ("back",), "side": ("front", "back"), "back": ("front",), "overhead": ()}


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

    def negatives(self, views: list[str], eps: torch.Tensor, uniforms: torch.Tensor,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For each camera, the same draw (eps, uniform) under the other azimuth sectors' view words (OTHER_VIEWS):
        embeddings (B, 2, 77, d) and their weights (B, 2); a camera with fewer than two is padded with zeros at
        weight 0 (`guided_eps` skips what has weight 0 throughout)."""
        rows, weights = [], []
        for i, view in enumerate(views):
            drawn = [self.draw([other], eps[i : i + 1], uniforms[i : i + 1])[0][0] for other in OTHER_VIEWS[view]]
            rows.append(torch.stack(drawn + [self.uncond.new_zeros(self.shape)] * (2 - len(drawn))))
            weights.append([weight] * len(drawn) + [0.0] * (2 - len(drawn)))
        return torch.stack(rows), torch.tensor(weights)
