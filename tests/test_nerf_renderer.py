"""Volume rendering against closed forms, with analytic fields that have NeRFField's interface."""

import math

import pytest
import torch
import torch.nn.functional as F

from dd3d.cli import UserError
from dd3d.nerf.cameras import camera_rays, orbit_cameras
from dd3d.nerf.occupancy import OccupancyGrid
from dd3d.nerf.renderer import VolumeRenderer, nerfacc_available, packed_weights, ray_box_intersection


class Ball:
    """Constant density inside a ball at the origin, zero outside; albedo (n + 1) / 2 shows the outward
    direction n, so the +X side is reddish, +Y greenish, +Z bluish. Normals analytic (outward, or inward)."""

    radius = 1.0

    def __init__(self, sigma: float = 2.0, size: float = 0.5, inward: bool = False):
        self.sigma, self.size, self.inward = sigma, size, inward

    def density(self, points):
        inside = points.norm(dim=-1) < self.size
        return torch.where(inside, torch.full_like(points[..., 0], self.sigma), torch.zeros_like(points[..., 0]))

    def __call__(self, points):
        return self.density(points), (F.normalize(points, dim=-1) + 1) / 2

    def normals(self, points):
        outward = F.normalize(points, dim=-1)
        return -outward if self.inward else outward


def chord_through_ball(origins, directions, size):
    """Length of each ray's chord through the ball of radius `size` at the origin (0 when it misses)."""
    along = -(origins * directions).sum(-1)
    miss_distance_sq = (origins + along[..., None] * directions).square().sum(-1)
    return 2 * (size**2 - miss_distance_sq).clamp(min=0).sqrt()


def front_rays(height=24, width=24, distance=2.0, fovy=40.0):
    cameras = orbit_cameras(1, elevation=20.0, distance=distance, fovy=fovy)
    return (*camera_rays(cameras, height, width), cameras)


@pytest.mark.parametrize("train", [False, True])
def test_constant_density_ball_has_analytic_opacity(train):
    torch.manual_seed(0)
    origins, directions, _ = front_rays()
    ball = Ball(sigma=3.0)
    renderer = VolumeRenderer(num_steps=256).train(train)
    out = renderer(ball, origins, directions)
    expected = 1 - torch.exp(-ball.sigma * chord_through_ball(origins, directions, ball.size))
    step = 2 * math.sqrt(3) / 256
    # Midpoint sampling misplaces each of the two boundary crossings by at most one step.
    assert (out["opacity"][..., 0] - expected).abs().max() <= ball.sigma * step
    assert expected.max() > 0.9 and (expected == 0).any()  # the image holds both the ball and empty space


def test_occupancy_skipping_changes_nothing():
    origins, directions, _ = front_rays()
    ball = Ball(sigma=3.0)
    grid = OccupancyGrid(resolution=32, warmup_steps=0)
    grid.update(0, ball.density)
    renderer = VolumeRenderer(num_steps=256).eval()
    full = renderer(ball, origins, directions)
    skipped = renderer(ball, origins, directions, occupancy=grid)
    assert skipped["num_samples"] < 0.5 * full["num_samples"]
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(skipped[key], full[key], atol=1e-6, rtol=0)


def test_packed_weights_match_dense_formula():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 4])
    ray_idx = torch.repeat_interleave(torch.arange(len(counts)), counts)
    deltas = torch.rand(len(ray_idx)) * 0.2
    t_starts = torch.rand(len(ray_idx))
    density = torch.rand(len(ray_idx)) * 5
    weights = packed_weights(t_starts, t_starts + deltas, density, ray_idx, len(counts))
    start = 0
    for count in counts.tolist():
        tau = density[start : start + count] * deltas[start : start + count]
        transmittance = torch.exp(-(torch.cumsum(tau, 0) - tau))
        torch.testing.assert_close(weights[start : start + count], transmittance * (1 - torch.exp(-tau)))
        start += count


def test_depth_normals_and_orientation_of_an_opaque_ball():
    origins, directions, cameras = front_rays(height=9, width=9)
    renderer = VolumeRenderer(num_steps=512).eval()
    out = renderer(Ball(sigma=200.0), origins, directions)
    centre = (0, 4, 4)
    assert out["opacity"][centre].item() == pytest.approx(1.0, abs=1e-4)
    assert out["depth"][centre].item() == pytest.approx(2.0 - 0.5, abs=0.01)
    towards_camera = F.normalize(cameras.positions[0], dim=0)
    assert torch.dot(out["normal"][centre], towards_camera).item() == pytest.approx(1.0, abs=0.02)
    assert out["loss_orient"].item() < 1e-3  # outward normals of the visible surface face the camera
    flipped = renderer(Ball(sigma=200.0, inward=True), origins, directions)
    assert flipped["loss_orient"].item() > 0.1


def test_shading_modes():
    origins, directions, cameras = front_rays(height=9, width=9)
    renderer = VolumeRenderer(num_steps=512, ambient=0.1, diffuse=0.9).eval()
    ball, centre = Ball(sigma=200.0), (0, 4, 4)
    albedo = renderer(ball, origins, directions)["rgb"][centre]
    lit = cameras.positions[0] * 3  # a point light behind the camera
    textureless = renderer(ball, origins, directions, shading="textureless", light_positions=lit)["rgb"][centre]
    torch.testing.assert_close(textureless, torch.ones(3), atol=0.02, rtol=0)
    lambertian = renderer(ball, origins, directions, shading="lambertian", light_positions=lit[None])["rgb"][centre]
    torch.testing.assert_close(lambertian, albedo, atol=0.02, rtol=0)
    dark = renderer(ball, origins, directions, shading="lambertian", light_positions=-lit)["rgb"][centre]
    torch.testing.assert_close(dark, 0.1 * albedo, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="light_positions"):
        renderer(ball, origins, directions, shading="lambertian")
    with pytest.raises(ValueError, match="shading"):
        renderer(ball, origins, directions, shading="phong")


def test_background_and_chunking():
    origins, directions, _ = front_rays(height=8, width=8, distance=3.0, fovy=70.0)
    solid = VolumeRenderer(num_steps=128, background={"type": "solid", "color": [0.2, 0.4, 0.6]}).eval()
    out = solid(Ball(), origins, directions)
    empty = out["opacity"][..., 0] == 0
    assert empty.any()
    torch.testing.assert_close(out["rgb"][empty], torch.tensor([0.2, 0.4, 0.6]).expand(int(empty.sum()), 3))
    torch.testing.assert_close(VolumeRenderer(num_steps=128, chunk=7).eval()(Ball(), origins, directions)["opacity"],
                               out["opacity"])

    learned = VolumeRenderer(num_steps=128, background={"type": "mlp", "hidden_dim": 16})
    rgb = learned(Ball(), origins, directions)["rgb"]
    assert ((rgb >= 0) & (rgb <= 1)).all()
    rgb.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.background.parameters())
    with pytest.raises(UserError, match="background"):
        VolumeRenderer(background={"type": "skybox"})


def test_ray_box_intersection():
    origins = torch.tensor([[3.0, 0.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.5, 0.5]])
    directions = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t_near, t_far = ray_box_intersection(origins, directions, 1.0)
    torch.testing.assert_close(t_near[[0, 2]], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(t_far[[0, 2]], torch.tensor([4.0, 1.0]))
    assert t_far[1] <= t_near[1] and t_far[3] <= t_near[3]  # passes beside the box; points away from it


def test_backend_choice():
    with pytest.raises(UserError, match="backend"):
        VolumeRenderer(backend="optix")
    if not nerfacc_available():
        with pytest.raises(UserError, match="nerfacc"):
            VolumeRenderer(backend="nerfacc")


@pytest.mark.skipif(not nerfacc_available(), reason="needs CUDA and nerfacc")
def test_nerfacc_path_matches_torch_path():
    origins, directions, _ = front_rays(height=32, width=32)
    origins, directions = origins.cuda(), directions.cuda()
    ball = Ball(sigma=3.0)
    grid = OccupancyGrid(resolution=32, warmup_steps=0).cuda()
    grid.update(0, ball.density)
    fast = VolumeRenderer(num_steps=256, backend="nerfacc").cuda().eval()(ball, origins, directions, occupancy=grid)
    slow = VolumeRenderer(num_steps=256, backend="torch").cuda().eval()(ball, origins, directions, occupancy=grid)
    step = 2 * math.sqrt(3) / 256
    assert (fast["opacity"] - slow["opacity"]).abs().max() <= 2 * ball.sigma * step  # samples may be offset
    expected = 1 - torch.exp(-ball.sigma * chord_through_ball(origins, directions, ball.size))
    assert (fast["opacity"][..., 0] - expected).abs().max() <= 2 * ball.sigma * step
