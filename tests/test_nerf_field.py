"""The NeRF field: the density blob, box clipping, normals, and gradients from a rendered image."""

import torch
import torch.nn.functional as F

from dd3d.nerf.cameras import camera_rays, sample_cameras
from dd3d.nerf.field import NeRFField
from dd3d.nerf.occupancy import OccupancyGrid
from dd3d.nerf.renderer import VolumeRenderer

SMALL_GRID = dict(n_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=64, backend="torch")


def test_blob_density_and_box():
    torch.manual_seed(0)
    field = NeRFField(encoding=SMALL_GRID)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.99], [1.01, 0.0, 0.0], [0.0, -3.0, 0.0]])
    density, albedo = field(points)
    assert density.shape == (5,) and albedo.shape == (5, 3)
    assert ((albedo >= 0) & (albedo <= 1)).all()
    # Near-zero features at initialisation: density ~ softplus(bias + 10 (1 - |x| / 0.5)).
    assert density[0] > 5 and 0.1 < density[1] < 2 and density[2] < 1e-3
    assert (density[3:] == 0).all()  # outside the box
    torch.testing.assert_close(field.density(points), density)


def test_normals_point_outward_from_the_blob():
    torch.manual_seed(0)
    field = NeRFField(encoding=SMALL_GRID)
    directions = F.normalize(torch.randn(200, 3), dim=-1)
    radii = torch.rand(200, 1) * 0.6 + 0.1
    normals = field.normals(directions * radii)
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(200))
    assert ((normals * directions).sum(-1) > 0.99).all()


def test_image_loss_reaches_encoding_and_mlp():
    torch.manual_seed(0)
    field = NeRFField(encoding=SMALL_GRID)
    renderer = VolumeRenderer(num_steps=64, background={"type": "mlp", "hidden_dim": 8}).train()
    grid = OccupancyGrid(resolution=16, warmup_steps=0)
    grid.update(0, field.density)
    cameras = sample_cameras(2, generator=torch.Generator().manual_seed(0))
    origins, directions = camera_rays(cameras, 8, 8)
    out = renderer(field, origins, directions, grid, shading="lambertian", light_positions=cameras.positions * 2)
    loss = (out["rgb"] - 0.3).square().mean() + 0.1 * out["loss_orient"] + 0.1 * out["loss_sparsity"]
    loss.backward()
    parameters = [("encoding", field.encoding.params)] + list(field.mlp.named_parameters())
    parameters += list(renderer.background.named_parameters())
    for name, parameter in parameters:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name

    # A few optimiser steps on the image loss make it fall.
    optimiser = torch.optim.Adam(list(field.parameters()) + list(renderer.parameters()), lr=1e-2)
    target = torch.zeros(2, 8, 8, 3)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = (renderer(field, origins, directions, grid)["rgb"] - target).square().mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
