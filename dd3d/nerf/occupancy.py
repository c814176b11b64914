"""An occupancy grid over the scene box: which cells the ray marcher may skip.

Every `update_every` steps each cell's density estimate is refreshed as the largest density the field shows at the
cell's 8 corners and at `jitter_samples` random points inside it, kept as an EMA of maxima
(density <- max(decay * density, estimate)). A cell is marked when its estimate exceeds `threshold`, and the mask
is dilated by one cell. The first `warmup_steps` steps count every cell as occupied.

What is guaranteed, right after an update and for the field it evaluated: no point whose density exceeds
`threshold` is skipped, provided each such point lies in a ball of radius half a cell diagonal (sqrt(3) h / 2)
on which the density also exceeds `threshold` -- true for any field that is smooth at the scale of a cell. Such
a ball holds a lattice vertex within sqrt(3) h of the point, i.e. a corner of a cell in its 3x3x3 neighbourhood;
that cell is marked, and the dilation covers the point's own cell. Thinner features are usually caught by the
jittered samples, without a guarantee. Between updates the field moves; the decay of 0.95 keeps a cell for about
`update_every * log(estimate / threshold) / 0.05` steps after it empties.

The threshold is on density (nerfacc's default, 0.01): space skipped along a chord of length L through density
below it loses at most 1 - exp(-0.01 L) opacity (< 3.5% across the whole [-1, 1]^3 box, far less in practice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class OccupancyGrid(nn.Module):
    def __init__(
        self,
        radius: float = 1.0,
        resolution: int = 64,
        threshold: float = 0.01,
        decay: float = 0.95,
        warmup_steps: int = 256,
        update_every: int = 16,
        jitter_samples: int = 1,
        chunk: int = 65536,
    ):
        super().__init__()
        self.radius, self.resolution, self.threshold, self.decay = float(radius), resolution, threshold, decay
        self.warmup_steps, self.update_every = warmup_steps, update_every
        self.jitter_samples, self.chunk = jitter_samples, chunk
        shape = (resolution,) * 3
        self.register_buffer("density", torch.zeros(shape))
        self.register_buffer("marked", torch.ones(shape, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def occupied(self) -> torch.Tensor:
        """(R, R, R) bool, indexed [x, y, z]; all True during warmup."""
        if int(self.step) < self.warmup_steps:
            return torch.ones_like(self.marked)
        return self.marked

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) -> bool (...): inside the box and in an occupied cell."""
        cells = ((points / self.radius + 1.0) * (0.5 * self.resolution)).floor().long().clamp(0, self.resolution - 1)
        inside = (points.abs() <= self.radius).all(dim=-1)
        return inside & self.occupied[cells[..., 0], cells[..., 1], cells[..., 2]]

    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Record the training step; every `update_every` steps re-estimate the cells from `density_fn`
        (points (N, 3) -> density (N,))."""
        self.step.fill_(step)
        if step % self.update_every == 0:
            self.refresh(density_fn)

    @torch.no_grad()
    def refresh(self, density_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Re-estimate every cell now (also usable outside training, e.g. after loading a field)."""
        res, device = self.resolution, self.density.device
        size = 2.0 * self.radius / res
        ticks = torch.arange(res + 1, device=device, dtype=torch.float32) * size - self.radius
        vertices = self._evaluate(density_fn, _lattice(ticks)).view(res + 1, res + 1, res + 1)
        estimate = F.max_pool3d(vertices[None, None], kernel_size=2, stride=1)[0, 0]
        centres = _lattice(ticks[:-1] + 0.5 * size)
        for _ in range(self.jitter_samples):
            jittered = centres + (torch.rand_like(centres) - 0.5) * size
            estimate = torch.maximum(estimate, self._evaluate(density_fn, jittered).view(res, res, res))
        self.density.copy_(torch.maximum(self.density * self.decay, estimate))
        above = (self.density > self.threshold).float()[None, None]
        self.marked.copy_(F.max_pool3d(above, kernel_size=3, stride=1, padding=1)[0, 0] > 0)

    def _evaluate(self, density_fn, points: torch.Tensor) -> torch.Tensor:
        return torch.cat([density_fn(chunk).reshape(-1).float() for chunk in points.split(self.chunk)])

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, threshold={self.threshold}, occupied={self.occupied.float().mean():.3f}"


def _lattice(ticks: torch.Tensor) -> torch.Tensor:
    """All (x, y, z) combinations of `ticks`, x slowest: (len^3, 3)."""
    return torch.stack(torch.meshgrid(ticks, ticks, ticks, indexing="ij"), dim=-1).reshape(-1, 3)
