"""The camera contract: Z up, front = +X, azimuth counter-clockwise from the front, OpenGL camera-to-world."""

import pytest
import torch
import torch.nn.functional as F

from dd3d.nerf.cameras import camera_rays, orbit_cameras, sample_cameras, view_label
from dd3d.nerf.renderer import VolumeRenderer
from tests.test_nerf_renderer import Ball


def one_camera(elevation, azimuth, distance=2.0, fovy=40.0):
    return sample_cameras(1, (elevation, elevation), (azimuth, azimuth), (distance, distance), (fovy, fovy))


def test_positions_and_orientation():
    cameras = sample_cameras(64, elevation_range=(-90, 90), generator=torch.Generator().manual_seed(0))
    e, a, d = (torch.deg2rad(cameras.elevation_deg), torch.deg2rad(cameras.azimuth_deg), cameras.distance)
    expected = d[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)
    torch.testing.assert_close(cameras.positions, expected)
    rotation = cameras.c2w[:, :3, :3]
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(64))
    looking = -rotation[:, :, 2]  # OpenGL: the camera looks down its -Z axis ...
    torch.testing.assert_close(looking, -cameras.positions / d[:, None])  # ... at the origin
    assert (rotation[:, 2, 1] >= -1e-6).all()  # image up never points below the horizon
    assert rotation[:, 2, 0].abs().max() < 1e-6  # image right is horizontal: no roll
    torch.testing.assert_close(cameras.c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(64, 4))


def test_azimuth_zero_sees_the_front_and_azimuth_turns_counter_clockwise():
    ball = Ball(sigma=200.0)  # albedo (n + 1) / 2: the +X face is reddish, +Y greenish, +Z bluish
    renderer = VolumeRenderer(num_steps=256).eval()

    def render(elevation, azimuth):
        origins, directions = camera_rays(one_camera(elevation, azimuth), 15, 15)
        return renderer(ball, origins, directions)["rgb"][0]

    front = render(0.0, 0.0)
    assert front[7, 7].argmax() == 0 and front[7, 7, 0] > 0.95  # centre pixel sees the +X face
    # At azimuth 0 the +Y side is on the right of the image and +Z at the top.
    assert front[7, 9:12, 1].mean() > 0.6 > front[7, 3:6, 1].mean()
    assert front[3:6, 7, 2].mean() > 0.6 > front[9:12, 7, 2].mean()
    assert render(0.0, 90.0)[7, 7].argmax() == 1  # counter-clockwise seen from above: +Y after +X
    assert render(0.0, -180.0)[7, 7, 0] < 0.05  # the back: -X
    assert render(90.0, 0.0)[7, 7].argmax() == 2  # straight overhead: +Z


def test_view_labels():
    assert view_label(0, 0) == "front" and view_label(0, 45) == "front" and view_label(10, -45) == "front"
    assert view_label(0, 46) == "side" and view_label(0, -90) == "side" and view_label(0, 134.9) == "side"
    assert view_label(0, 135) == "back" and view_label(0, -180) == "back" and view_label(0, 180) == "back"
    assert view_label(60, 0) == "front" and view_label(61, 0) == "overhead" and view_label(89, 180) == "overhead"
    assert view_label(0, 360) == "front" and view_label(0, 225) == "back"  # wrapped to [-180, 180)
    assert view_label(0, 50, front_threshold=60) == "front"
    assert view_label(50, 0, overhead_threshold=45) == "overhead"
    assert view_label(0, 120, back_threshold=110) == "back"


def test_sample_cameras():
    cameras = sample_cameras(500, generator=torch.Generator().manual_seed(1))
    assert len(cameras) == 500 and cameras.c2w.shape == (500, 4, 4) and len(cameras.views) == 500
    for values, (low, high) in [
        (cameras.elevation_deg, (-10, 45)),
        (cameras.azimuth_deg, (-180, 180)),
        (cameras.distance, (1.5, 2.0)),
        (cameras.fovy_deg, (40, 70)),
    ]:
        assert values.shape == (500,) and values.min() >= low and values.max() < high
    assert cameras.views == [view_label(e, a) for e, a in zip(cameras.elevation_deg, cameras.azimuth_deg)]
    assert set(cameras.views) == {"front", "side", "back"}
    again = sample_cameras(500, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.c2w, cameras.c2w)
    wrapped = sample_cameras(200, azimuth_range=(90, 270), generator=torch.Generator().manual_seed(2))
    assert wrapped.azimuth_deg.min() >= -180 and wrapped.azimuth_deg.max() < 180
    assert (wrapped.azimuth_deg.abs() >= 90).all()
    lowered = sample_cameras(5, elevation_range=(50, 55), thresholds={"overhead_threshold": 45})
    assert lowered.views == ["overhead"] * 5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(elevation_range=(30, 10)),
        dict(elevation_range=(-100, 10)),
        dict(elevation_range=(0, 91)),
        dict(azimuth_range=(10, -10)),
        dict(distance_range=(1.0, 2.0)),
        dict(distance_range=(0.5, 0.8)),
        dict(fovy_range=(0, 60)),
        dict(fovy_range=(40, 180)),
        dict(fovy_range=(70, 40)),
    ],
)
def test_impossible_ranges_are_refused(kwargs):
    with pytest.raises(ValueError):
        sample_cameras(4, **kwargs)


def test_orbit_cameras():
    cameras = orbit_cameras(8, elevation=15.0, distance=2.5, fovy=45.0)
    torch.testing.assert_close(
        cameras.azimuth_deg, torch.tensor([0.0, 45.0, 90.0, 135.0, -180.0, -135.0, -90.0, -45.0])
    )
    assert cameras.views == ["front", "front", "side", "back", "back", "back", "side", "front"]
    assert (cameras.elevation_deg == 15).all() and (cameras.distance == 2.5).all() and (cameras.fovy_deg == 45).all()
    with pytest.raises(ValueError):
        orbit_cameras(4, elevation=10.0, distance=0.9, fovy=45.0)


def test_camera_rays():
    cameras = sample_cameras(3, generator=torch.Generator().manual_seed(3))
    origins, directions = camera_rays(cameras, 7, 9)
    assert origins.shape == directions.shape == (3, 7, 9, 3)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(3, 7, 9))
    torch.testing.assert_close(origins, cameras.positions[:, None, None].expand(3, 7, 9, 3))
    to_origin = -cameras.positions / cameras.distance[:, None]
    torch.testing.assert_close(directions[:, 3, 4], to_origin)  # the central ray points at the origin
    # The middle of the top row sits (1 - 1/H) of the way up the half field of view.
    tan_half = torch.tan(torch.deg2rad(cameras.fovy_deg) / 2)
    angle = torch.acos((directions[:, 0, 4] * to_origin).sum(-1))
    torch.testing.assert_close(angle, torch.atan((1 - 1 / 7) * tan_half))
    up = cameras.c2w[:, :3, 1]
    assert ((directions[:, 0, 4] - to_origin) * up).sum(-1).gt(0).all()  # row 0 is the top
    # Square pixels: the horizontal angle per pixel matches the vertical one.
    right = cameras.c2w[:, :3, 0]
    torch.testing.assert_close(
        torch.atan((directions[:, 3, 8] * right).sum(-1) / (directions[:, 3, 8] * to_origin).sum(-1)),
        torch.atan((1 - 1 / 9) * tan_half * 9 / 7),
    )
    even = camera_rays(cameras, 8, 8)[1]
    torch.testing.assert_close(F.normalize(even[:, 3:5, 3:5].mean(dim=(1, 2)), dim=-1), to_origin)
    moved = cameras.to("cpu")
    assert moved.views == cameras.views and torch.equal(moved.c2w, cameras.c2w)
