"""The occupancy grid never skips a sample whose density is above its threshold, for smooth fields."""

import math

import pytest
import torch
import torch.nn.functional as F

from dd3d.nerf.occupancy import OccupancyGrid


class Blobs:
    """A sum of isotropic Gaussian bumps: density = sum_k peak_k exp(-|x - c_k|^2 / (2 std_k^2))."""

    def __init__(self, centres, stds, peaks):
        self.centres, self.stds, self.peaks = torch.as_tensor(centres), torch.as_tensor(stds), torch.as_tensor(peaks)

    def density(self, points):
        squared = (points[..., None, :] - self.centres).square().sum(-1)
        return (self.peaks * torch.exp(-squared / (2 * self.stds.square()))).sum(-1)

    def level_radius(self, k, threshold):
        """Radius of bump k's own {density > threshold} ball."""
        return float(self.stds[k] * math.sqrt(2 * math.log(self.peaks[k] / threshold)))


def hard_points(blobs, threshold, generator, n=4000):
    """Points just inside each bump's threshold ball (where a sample is easiest to lose), plus uniform ones."""
    parts = [torch.rand(50000, 3, generator=generator) * 2 - 1]
    for k in range(len(blobs.peaks)):
        directions = F.normalize(torch.randn(n, 3, generator=generator), dim=-1)
        radii = blobs.level_radius(k, threshold) * (1 - 0.05 * torch.rand(n, 1, generator=generator))
        parts.append(blobs.centres[k] + directions * radii)
    points = torch.cat(parts)
    return points[(points.abs() <= 1).all(-1)]


@pytest.mark.parametrize("seed", range(4))
def test_never_skips_dense_samples(seed):
    generator = torch.Generator().manual_seed(seed)
    grid = OccupancyGrid(resolution=32, threshold=0.01, warmup_steps=0, update_every=1)
    cell = 2.0 / 32
    # Narrowest allowed: each threshold ball has radius >= half a cell diagonal.
    stds = torch.tensor([0.019, 0.03, 0.08])
    peaks = torch.tensor([1.0, 20.0, 3.0])
    centres = (torch.rand(3, 3, generator=generator) * 2 - 1) * 0.8
    blobs = Blobs(centres, stds, peaks)
    assert min(blobs.level_radius(k, 0.01) for k in range(3)) >= math.sqrt(3) * cell / 2
    grid.update(0, blobs.density)
    points = hard_points(blobs, 0.01, generator)
    dense = blobs.density(points) > grid.threshold
    assert dense.sum() > 10000
    assert grid.contains(points[dense]).all()
    assert grid.occupied.float().mean() < 0.15  # and it does skip most of the box

    # The field moves: the new bumps are covered at once, the old ones fade over later updates.
    moved = Blobs(-centres, stds, peaks)
    grid.update(1, moved.density)
    points = hard_points(moved, 0.01, generator)
    assert grid.contains(points[moved.density(points) > grid.threshold]).all()


def test_fades_after_the_field_empties():
    grid = OccupancyGrid(resolution=16, threshold=0.01, decay=0.5, warmup_steps=0, update_every=1)
    grid.update(0, Blobs([[0.0, 0.0, 0.0]], [0.2], [1.0]).density)  # the lattice holds the origin: estimate 1.0
    assert grid.occupied[8, 8, 8] and not grid.occupied[0, 0, 0]
    empty = Blobs([[0.0, 0.0, 0.0]], [0.2], [0.0])
    steps = 0
    while grid.occupied.any():
        steps += 1
        grid.update(steps, empty.density)
    assert steps == 7  # 0.5**6 > 0.01 > 0.5**7


def test_warmup_update_schedule_and_state():
    grid = OccupancyGrid(resolution=8, warmup_steps=32, update_every=16)
    calls = []

    def nothing(points):
        calls.append(len(points))
        return torch.zeros(len(points))

    grid.update(0, nothing)
    assert grid.occupied.all()  # warmup: everything counts as occupied
    grid.update(5, nothing)
    assert calls == [9**3, 8**3]  # one update, at step 0: the cell corners, then one jittered point per cell
    grid.update(32, nothing)
    assert not grid.occupied.any() and not grid.contains(torch.zeros(1, 3)).any()
    restored = OccupancyGrid(resolution=8, warmup_steps=32, update_every=16)
    restored.load_state_dict(grid.state_dict())
    assert int(restored.step) == 32 and not restored.occupied.any()
    assert not grid.contains(torch.tensor([[1.5, 0.0, 0.0]])).any()
