"""Cameras around the object, shared by stage 2 and the procedural world.

World is Z-up and the object's front faces +X. A camera at elevation e (degrees above the XY plane), azimuth a
(degrees in [-180, 180), 0 = on the +X axis looking at the front, increasing counter-clockwise seen from above)
and distance d sits at d (cos e cos a, cos e sin a, sin e) and looks at the origin with +Z up. Camera-to-world
matrices use the OpenGL convention: the camera looks down its -Z axis, +Y is up in the image, +X is right; so at
azimuth 0 the world's +Y side appears on the right of the image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class CameraBatch:
    c2w: torch.Tensor  # (B, 4, 4)
    fovy_deg: torch.Tensor  # (B,)
    elevation_deg: torch.Tensor  # (B,)
    azimuth_deg: torch.Tensor  # (B,)
    distance: torch.Tensor  # (B,)
    views: list[str]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: slice) -> "CameraBatch":
        return CameraBatch(
            self.c2w[index], self.fovy_deg[index], self.elevation_deg[index], self.azimuth_deg[index],
            self.distance[index], self.views[index],
        )

    @property
    def positions(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device) -> "CameraBatch":
        return replace(
            self,
            c2w=self.c2w.to(device),
            fovy_deg=self.fovy_deg.to(device),
            elevation_deg=self.elevation_deg.to(device),
            azimuth_deg=self.azimuth_deg.to(device),
            distance=self.distance.to(device),
        )


def wrap_azimuth(azimuth):
    """Degrees -> the same direction in [-180, 180)."""
    return (azimuth + 180.0) % 360.0 - 180.0


def view_label(
    elevation: float,
    azimuth: float,
    overhead_threshold: float = 60.0,
    front_threshold: float = 45.0,
    back_threshold: float = 135.0,
) -> str:
    """"overhead" if elevation > overhead_threshold, else "front" if |azimuth| <= front_threshold, "back" if
    |azimuth| >= back_threshold, else "side" (threestudio's defaults; azimuth is wrapped to [-180, 180) first)."""
    if float(elevation) > overhead_threshold:
        return "overhead"
    magnitude = abs(wrap_azimuth(float(azimuth)))
    if magnitude <= front_threshold:
        return "front"
    if magnitude >= back_threshold:
        return "back"
    return "side"


def camera_to_world(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """(B,) spherical placements -> (B, 4, 4) OpenGL camera-to-world matrices looking at the origin, +Z up.
    The right vector (-sin a, cos a, 0) is defined at every elevation, so straight overhead is no special case."""
    e, a = torch.deg2rad(elevation_deg.float()), torch.deg2rad(azimuth_deg.float())
    backward = torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)  # camera +Z
    right = torch.stack([-a.sin(), a.cos(), torch.zeros_like(a)], dim=-1)  # camera +X
    up = torch.linalg.cross(backward, right)  # camera +Y
    c2w = torch.eye(4).repeat(len(e), 1, 1)
    c2w[:, :3, :3] = torch.stack([right, up, backward], dim=-1)
    c2w[:, :3, 3] = backward * distance.float()[:, None]
    return c2w


def _validate(elevation_range, distance_range, fovy_range, azimuth_range=(0.0, 0.0), scene_radius: float = 1.0):
    ranges = {"elevation": elevation_range, "azimuth": azimuth_range, "distance": distance_range, "fovy": fovy_range}
    for name, (low, high) in ranges.items():
        if low > high:
            raise ValueError(f"{name} range ({low}, {high}): the minimum is above the maximum")
    if elevation_range[0] < -90.0 or elevation_range[1] > 90.0:
        raise ValueError(f"elevation must lie within [-90, 90] degrees, got {tuple(elevation_range)}")
    if distance_range[0] <= scene_radius:
        raise ValueError(f"camera distance must exceed the scene radius {scene_radius}, got {tuple(distance_range)}")
    if fovy_range[0] <= 0.0 or fovy_range[1] >= 180.0:
        raise ValueError(f"fovy must lie within (0, 180) degrees, got {tuple(fovy_range)}")


def _batch(elevation, azimuth, distance, fovy, thresholds: dict | None) -> CameraBatch:
    azimuth = wrap_azimuth(azimuth)
    views = [view_label(e, a, **(thresholds or {})) for e, a in zip(elevation.tolist(), azimuth.tolist())]
    return CameraBatch(camera_to_world(elevation, azimuth, distance), fovy, elevation, azimuth, distance, views)


def sample_cameras(
    n: int,
    elevation_range=(-10.0, 45.0),
    azimuth_range=(-180.0, 180.0),
    distance_range=(1.5, 2.0),
    fovy_range=(40.0, 70.0),
    generator: torch.Generator | None = None,
    scene_radius: float = 1.0,
    thresholds: dict | None = None,
) -> CameraBatch:
    """n cameras, each quantity uniform in its range (azimuth then wrapped to [-180, 180)); `thresholds` are
    view_label's keyword arguments. Raises ValueError on impossible ranges."""
    _validate(elevation_range, distance_range, fovy_range, azimuth_range, scene_radius)

    def uniform(bounds):
        return float(bounds[0]) + torch.rand(n, generator=generator) * (float(bounds[1]) - float(bounds[0]))

    elevation, azimuth, distance, fovy = map(uniform, (elevation_range, azimuth_range, distance_range, fovy_range))
    return _batch(elevation, azimuth, distance, fovy, thresholds)


def orbit_cameras(
    n: int, elevation: float, distance: float, fovy: float, scene_radius: float = 1.0, thresholds: dict | None = None,
    start_azimuth: float = 0.0,
) -> CameraBatch:
    """n cameras on a turntable at a fixed elevation, azimuths start, start + 360/n, ... (0: the front)."""
    _validate((elevation, elevation), (distance, distance), (fovy, fovy), scene_radius=scene_radius)
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = torch.full((n,), 1.0)
    return _batch(full * elevation, azimuth, full * distance, full * fovy, thresholds)


def camera_rays(cameras: CameraBatch, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions (B, H, W, 3) through the pixel centres; row 0 is the top of the
    image. fovy spans the image height; square pixels."""
    device = cameras.c2w.device
    tan_half = torch.tan(torch.deg2rad(cameras.fovy_deg.float()) / 2)[:, None, None]  # (B, 1, 1)
    ys = 1.0 - (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    camera_dirs = torch.stack(
        [
            grid_x * tan_half * (width / height),
            grid_y * tan_half,
            -torch.ones_like(grid_x).expand(len(cameras), height, width),
        ],
        dim=-1,
    )  # (B, H, W, 3)
    rotation = cameras.c2w[:, None, None, :3, :3]
    directions = torch.nn.functional.normalize((rotation @ camera_dirs[..., None])[..., 0], dim=-1)
    origins = cameras.positions[:, None, None, :].expand_as(directions)
    return origins, directions
