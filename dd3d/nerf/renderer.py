"""Volume rendering by ray marching, with DreamFusion's shading and regularisers.

Rays are clipped to the scene box and marched with a constant step (`step_size`, or the box diagonal divided by
`num_steps`), the start shifted by a random fraction of a step per ray when training with `stratified`. Samples
whose midpoint lies in an unoccupied cell are dropped before the field is evaluated, and the survivors are kept
packed (flat arrays with a ray index each), so empty space costs nothing. Then alpha_i = 1 - exp(-sigma_i delta_i),
T_i = exp(-sum_{j<i} sigma_j delta_j), w_i = T_i alpha_i. With CUDA rays and nerfacc importable, nerfacc's
OccGridEstimator (fed the same occupancy mask) does the sampling and nerfacc computes the weights; otherwise all
of it is plain PyTorch.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dd3d.cli import UserError

SHADINGS = ("albedo", "lambertian", "textureless")


@functools.cache
def nerfacc_available() -> bool:
    """Whether nerfacc imports with its CUDA extension (built or JIT-compiled on first use) and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        from nerfacc.cuda._backend import _C
    except Exception:  # a missing package, toolkit or failed build all mean: use the torch path
        return False
    return _C is not None


class Background(nn.Module):
    """What shows through the remaining transmittance: a solid colour, or a small MLP of the ray direction."""

    def __init__(self, type: str = "solid", color=(1.0, 1.0, 1.0), hidden_dim: int = 32, n_frequencies: int = 4):
        super().__init__()
        if type not in ("solid", "mlp"):
            raise UserError(f"background type must be solid or mlp, got {type!r}")
        self.type = type
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32).reshape(3))
        if type == "mlp":
            self.register_buffer("frequencies", 2.0 ** torch.arange(n_frequencies) * math.pi, persistent=False)
            self.mlp = nn.Sequential(
                nn.Linear(3 + 6 * n_frequencies, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 3)
            )

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions (N, 3) -> colours (N, 3) in [0, 1]."""
        if self.type == "solid":
            return self.color.expand(directions.shape[0], 3)
        angles = (directions[..., None] * self.frequencies).flatten(-2)
        return torch.sigmoid(self.mlp(torch.cat([directions, angles.sin(), angles.cos()], dim=-1)))


class VolumeRenderer(nn.Module):
    """Renders a field (anything with `radius`, `forward(points) -> (density, albedo)` and `normals(points)`).

    Shading (per call): "albedo"; "lambertian", albedo * (ambient + diffuse * max(0, n . l)) with l the unit
    vector to a point light; "textureless", the same with white albedo. Normals come from the field's density
    gradient and are evaluated only at samples whose weight exceeds `normal_weight_threshold` (others contribute
    less than that to any output). `background`: {type: solid, color: [r, g, b]} or {type: mlp, hidden_dim,
    n_frequencies}. `backend`: auto | torch | nerfacc. The stratified jitter applies in training mode only
    (renderer.train() / .eval()). Rays are processed `chunk` at a time; render evaluation images under
    torch.no_grad() to keep memory bounded.
    """

    def __init__(
        self,
        num_steps: int = 512,
        step_size: float | None = None,
        stratified: bool = True,
        background: dict | None = None,
        ambient: float = 0.1,
        diffuse: float = 0.9,
        normal_weight_threshold: float = 1e-4,
        chunk: int = 8192,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in ("auto", "torch", "nerfacc"):
            raise UserError(f"renderer backend must be auto, torch or nerfacc, got {backend!r}")
        if backend == "nerfacc" and not nerfacc_available():
            raise UserError("renderer backend 'nerfacc' needs a CUDA GPU and `pip install nerfacc==0.5.3`")
        self.num_steps, self.step_size, self.stratified = num_steps, step_size, stratified
        self.ambient, self.diffuse = ambient, diffuse
        self.normal_weight_threshold, self.chunk, self.backend = normal_weight_threshold, chunk, backend
        self.background = Background(**(background or {}))
        self._estimators = {}

    def forward(
        self,
        field,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        occupancy=None,
        shading: str = "albedo",
        light_positions: torch.Tensor | None = None,
        normals: bool = True,
    ) -> dict:
        """Rays (..., 3) -> dict with rgb (..., 3) (over the background), opacity (..., 1), depth (..., 1) (expected
        distance along the ray of what is seen, sum w t / opacity; 0 where empty), normal (..., 3) (sum w n, world
        space), the scalars loss_orient (DreamFusion: mean over rays of sum_i stopgrad(w_i) max(0, n_i . d)^2),
        loss_sparsity (mean sqrt(opacity^2 + 0.01)), loss_opaque (mean binary entropy of opacity), and the int
        num_samples. `light_positions`, needed unless shading is albedo: (3,), (B, 3) for rays (B, ..., 3), or
        one per ray. `normals=False` skips the normals (six density evaluations per sample) when shading is albedo:
        the normal map and loss_orient are then zero."""
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        if shading != "albedo" and light_positions is None:
            raise ValueError(f"{shading} shading needs light_positions")
        shape = rays_o.shape[:-1]
        origins = rays_o.reshape(-1, 3).float()
        directions = F.normalize(rays_d.reshape(-1, 3).float(), dim=-1)
        lights = None if light_positions is None else _per_ray(light_positions, rays_o)
        step = self.step_size or 2.0 * math.sqrt(3.0) * field.radius / self.num_steps
        light_chunks = itertools.repeat(None) if lights is None else lights.split(self.chunk)
        parts = [
            self._march(field, o, d, light, occupancy, shading, step, normals or shading != "albedo")
            for o, d, light in zip(origins.split(self.chunk), directions.split(self.chunk), light_chunks)
        ]
        out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        opacity = out["opacity"]
        rgb = out["rgb"] + (1.0 - opacity) * self.background(directions)
        clamped = opacity.clamp(1e-5, 1.0 - 1e-5)
        entropy = -(clamped * clamped.log() + (1.0 - clamped) * (1.0 - clamped).log())
        return {
            "rgb": rgb.reshape(*shape, 3),
            "opacity": opacity.reshape(*shape, 1),
            "depth": out["depth"].reshape(*shape, 1),
            "normal": out["normal"].reshape(*shape, 3),
            "loss_orient": out["orient"].mean(),
            "loss_sparsity": (opacity.square() + 0.01).sqrt().mean(),
            "loss_opaque": entropy.mean(),
            "num_samples": int(out["num_samples"].sum()),
        }

    def _march(self, field, origins, directions, lights, occupancy, shading: str, step: float, with_normals: bool):
        n_rays = origins.shape[0]
        use_nerfacc = self.backend != "torch" and origins.is_cuda and nerfacc_available()
        with torch.no_grad():
            sample = self._sample_nerfacc if use_nerfacc else self._sample_torch
            ray_idx, t_starts, t_ends = sample(origins, directions, occupancy, field.radius, step)
        t_mid = (t_starts + t_ends) * 0.5
        points = origins[ray_idx] + directions[ray_idx] * t_mid[:, None]
        density, albedo = field(points)
        if use_nerfacc and ray_idx.numel() > 0:
            import nerfacc

            weights = nerfacc.render_weight_from_density(
                t_starts, t_ends, density, ray_indices=ray_idx, n_rays=n_rays
            )[0]
        else:
            weights = packed_weights(t_starts, t_ends, density, ray_idx, n_rays)

        keep = weights.detach() > (self.normal_weight_threshold if with_normals else math.inf)
        normals = torch.zeros_like(points).index_put((keep,), field.normals(points[keep]))
        if shading == "albedo":
            colour = albedo
        else:
            to_light = F.normalize(lights[ray_idx] - points, dim=-1)
            shade = self.ambient + self.diffuse * (normals * to_light).sum(-1, keepdim=True).clamp(min=0.0)
            colour = albedo * shade if shading == "lambertian" else shade.expand(-1, 3)
        facing = (normals * directions[ray_idx]).sum(-1).clamp(min=0.0).square()

        def accumulate(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(n_rays, values.shape[-1]).index_add(0, ray_idx, values)

        opacity = accumulate(weights[:, None])
        return {
            "rgb": accumulate(weights[:, None] * colour),
            "opacity": opacity,
            "depth": accumulate(weights[:, None] * t_mid[:, None]) / opacity.clamp(min=1e-6),
            "normal": accumulate(weights[:, None] * normals),
            "orient": accumulate((weights.detach() * facing)[:, None])[:, 0],
            "num_samples": torch.tensor([ray_idx.numel()]),
        }

    def _sample_torch(self, origins, directions, occupancy, radius: float, step: float):
        t_near, t_far = ray_box_intersection(origins, directions, radius)
        if self.stratified and self.training:
            t_near = t_near + torch.rand_like(t_near) * step
        counts = ((t_far - t_near) / step).ceil().clamp(min=0).long()
        ray_idx = torch.repeat_interleave(torch.arange(origins.shape[0], device=origins.device), counts)
        first = counts.cumsum(0) - counts
        k = torch.arange(ray_idx.numel(), device=origins.device) - first[ray_idx]
        t_starts = t_near[ray_idx] + k * step
        t_ends = torch.minimum(t_starts + step, t_far[ray_idx])
        if occupancy is not None:
            mid = origins[ray_idx] + directions[ray_idx] * ((t_starts + t_ends) * 0.5)[:, None]
            keep = occupancy.contains(mid)
            ray_idx, t_starts, t_ends = ray_idx[keep], t_starts[keep], t_ends[keep]
        return ray_idx, t_starts, t_ends

    def _sample_nerfacc(self, origins, directions, occupancy, radius: float, step: float):
        resolution = 1 if occupancy is None else occupancy.resolution
        key = (resolution, radius, origins.device)
        if key not in self._estimators:
            import nerfacc

            aabb = [-radius] * 3 + [radius] * 3
            self._estimators[key] = nerfacc.OccGridEstimator(aabb, resolution=resolution).to(origins.device)
        estimator = self._estimators[key]
        if occupancy is None:
            estimator.binaries.fill_(True)
        else:  # both are indexed [x, y, z] over the same box
            estimator.binaries.copy_(occupancy.occupied[None])
        ray_idx, t_starts, t_ends = estimator.sampling(
            origins, directions, near_plane=0.0, render_step_size=step, stratified=self.stratified and self.training
        )
        return ray_idx.long(), t_starts, t_ends


def ray_box_intersection(origins: torch.Tensor, directions: torch.Tensor, radius: float):
    """Slab test against [-radius, radius]^3: (t_near, t_far) per ray, t_near >= 0; t_far <= t_near on a miss."""
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t_a, t_b = (-radius - origins) / safe, (radius - origins) / safe
    t_near = torch.minimum(t_a, t_b).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(t_a, t_b).amin(dim=-1)
    return t_near, t_far


def packed_weights(t_starts, t_ends, density, ray_idx, n_rays: int) -> torch.Tensor:
    """w_i = T_i (1 - exp(-sigma_i delta_i)) for packed samples sorted by ray, then by t within each ray."""
    tau = density * (t_ends - t_starts)
    exclusive = torch.cumsum(tau.double(), dim=0) - tau.double()  # float64: one running sum across all rays
    counts = torch.bincount(ray_idx, minlength=n_rays)
    first = counts.cumsum(0) - counts
    optical_depth = exclusive - exclusive[first[ray_idx]]
    return torch.exp(-optical_depth).to(tau.dtype) * (1.0 - torch.exp(-tau))


def _per_ray(light_positions, rays_o: torch.Tensor) -> torch.Tensor:
    lights = torch.as_tensor(light_positions, dtype=torch.float32, device=rays_o.device)
    while lights.dim() < rays_o.dim():
        lights = lights.unsqueeze(-2)
    return lights.expand(rays_o.shape).reshape(-1, 3)
