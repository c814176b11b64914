"""Stage 2's regularisers on fields with known answers: sparsity, opacity entropy, orientation (closed forms), and
the CPU profile's weights against the SDS gradient they compete with."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dd3d.cli import CONFIG_DIR
from dd3d.nerf.renderer import VolumeRenderer


class Slab:
    """Constant density `sigma` in the whole box [-1, 1]^3, grey albedo, and normals -x / |x| along the x axis (those
    of a density growing with |x|: they point towards the plane x = 0)."""

    radius = 1.0

    def __init__(self, sigma: float):
        self.sigma = sigma

    def density(self, points):
        return torch.full_like(points[..., 0], self.sigma)

    def __call__(self, points):
        return self.density(points), torch.full_like(points, 0.5)

    def normals(self, points):
        return -F.normalize(points * torch.tensor([1.0, 0.0, 0.0]) + torch.tensor([1e-9, 0.0, 0.0]), dim=-1)


def axis_rays(n: int = 4):
    """n rays from x = 3 towards -X through the box (a chord of length 2 each)."""
    origins = torch.tensor([[3.0, 0.0, 0.0]]).repeat(n, 1)
    origins[:, 1] = torch.linspace(-0.5, 0.5, n)
    return origins, torch.tensor([[-1.0, 0.0, 0.0]]).repeat(n, 1)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_sparsity_and_opacity_entropy_closed_forms(sigma):
    origins, directions = axis_rays()
    out = VolumeRenderer(step_size=0.01, stratified=False).eval()(Slab(sigma), origins, directions, normals=False)
    opacity = 1 - math.exp(-2 * sigma)
    assert out["opacity"].flatten() == pytest.approx([opacity] * 4, abs=1e-4)
    assert out["loss_sparsity"].item() == pytest.approx(math.sqrt(opacity**2 + 0.01), abs=1e-4)
    entropy = -(opacity * math.log(opacity) + (1 - opacity) * math.log(1 - opacity))
    assert out["loss_opaque"].item() == pytest.approx(entropy, abs=1e-3)


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_orientation_penalty_closed_form(sigma):
    """On the near half (x > 0) the normals point along the ray (n = d = -X: n . d = 1, a surface seen from behind,
    penalised); on the far half against it (n . d = -1, not penalised): loss = the near half's weight, 1 - exp(-sigma)."""
    origins, directions = axis_rays()
    out = VolumeRenderer(step_size=0.005, stratified=False).eval()(Slab(sigma), origins, directions)
    assert out["loss_orient"].item() == pytest.approx(1 - math.exp(-sigma), abs=5e-3)


def test_profiles_weigh_the_orientation_penalty_against_sds():
    """The SDS loss sums over the latent elements (8x8x4 for the embedded model, 64x64x4 for Stable Diffusion), so
    a regulariser weight that matters in one profile is negligible in the other unless it is rescaled: the CPU
    weight times 64 must be of the order of the GPU one (threestudio's DreamFusion ramps its weight to 1000)."""
    gpu = OmegaConf.load(CONFIG_DIR / "gen3d.yaml").loss
    cpu = OmegaConf.merge(gpu, OmegaConf.load(CONFIG_DIR / "gen3d_cpu.yaml").get("loss", {}))
    assert gpu.orient >= 10 and cpu.orient >= 1
    assert 0.1 <= cpu.orient * 64 / gpu.orient <= 10
