"""The NeRF field: hash-grid features -> small MLP -> density and albedo, inside the scene box [-radius, radius]^3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dd3d.nerf.encoding import HashGridEncoding

AXES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


class NeRFField(nn.Module):
    """density = softplus(raw + blob), blob = density_blob_scale * (1 - |x| / density_blob_std) (threestudio's
    "blob_magic3d" bias, which starts training from a soft ball); albedo = sigmoid(rgb). Zero density outside the
    box. `encoding` holds HashGridEncoding keyword arguments. Normals are the negated, normalised density gradient
    by central finite differences with step `normal_eps` (world units): six density evaluations per point, no
    second-order autograd, and differentiable with respect to the parameters.
    """

    def __init__(
        self,
        radius: float = 1.0,
        encoding: dict | None = None,
        hidden_dim: int = 64,
        n_hidden_layers: int = 1,
        density_blob_scale: float = 10.0,
        density_blob_std: float = 0.5,
        normal_eps: float = 0.01,
    ):
        super().__init__()
        self.radius = float(radius)
        self.density_blob_scale, self.density_blob_std = density_blob_scale, density_blob_std
        self.normal_eps = normal_eps
        self.encoding = HashGridEncoding(**(encoding or {}))
        layers, width = [], self.encoding.n_output_dims
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 4))

    def _evaluate(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = ((points / self.radius + 1.0) * 0.5).clamp(0.0, 1.0)
        raw = self.mlp(self.encoding(unit))
        blob = self.density_blob_scale * (1.0 - points.norm(dim=-1) / self.density_blob_std)
        inside = (points.abs() <= self.radius).all(dim=-1)
        density = torch.where(inside, F.softplus(raw[..., 0] + blob), torch.zeros_like(blob))
        return density, raw[..., 1:]

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) in world coordinates -> density (...)."""
        return self._evaluate(points)[0]

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (..., 3) -> density (...), albedo (..., 3) in [0, 1]."""
        density, rgb = self._evaluate(points)
        return density, torch.sigmoid(rgb)

    def normals(self, points: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) -> unit normals (..., 3), -grad(density) / |grad(density)| (zero where the gradient is)."""
        return finite_difference_normals(self.density, points, self.normal_eps)


def finite_difference_normals(density_fn, points: torch.Tensor, eps: float) -> torch.Tensor:
    """Negated normalised central-difference gradient of `density_fn` at points (..., 3)."""
    offsets = torch.cat([AXES, -AXES]).to(points) * eps  # (6, 3)
    values = density_fn(points[..., None, :] + offsets)  # (..., 6)
    gradient = (values[..., :3] - values[..., 3:]) / (2.0 * eps)
    return -F.normalize(gradient, dim=-1)
