"""The hash-grid encoding against a slow, per-point reference written from tiny-cuda-nn's rules."""

import math

import numpy as np
import pytest
import torch

from dd3d.cli import UserError
from dd3d.nerf import encoding as encoding_module
from dd3d.nerf.encoding import HashGridEncoding, _HashGridFunction, tcnn_available

PRIMES = (1, 2654435761, 805459861)


def reference_layout(n_levels, log2_hashmap_size, base_resolution, per_level_scale):
    """(scale, resolution, size, offset) per level, step by step as tcnn's GridEncoding constructor does it."""
    rows, offset = [], 0
    for level in range(n_levels):
        scale = np.float32(
            np.exp2(np.float32(level) * np.log2(np.float32(per_level_scale))) * np.float32(base_resolution) - 1
        )
        resolution = math.ceil(scale) + 1
        size = min(int(math.ceil(resolution**3 / 8) * 8), 2**log2_hashmap_size)
        rows.append((scale, resolution, size, offset))
        offset += size
    return rows


def reference_encode(points, table, layout, n_feat):
    """Per point, per level, per corner: values (N, L*F), d value / d table as a list of (point, column, entry,
    weight), and d value / d point (N, L*F, 3)."""
    n, n_levels = len(points), len(layout)
    out = np.zeros((n, n_levels * n_feat))
    d_points = np.zeros((n, n_levels * n_feat, 3))
    contributions = []
    for i, x in enumerate(points):
        for level, (scale, resolution, size, offset) in enumerate(layout):
            pos = [np.float32(np.float32(x[a]) * scale + np.float32(0.5)) for a in range(3)]
            cell = [math.floor(p) for p in pos]
            frac = [float(p) - c for p, c in zip(pos, cell)]
            for corner in range(8):
                bits = [(corner >> a) & 1 for a in range(3)]
                coords = [cell[a] + bits[a] for a in range(3)]
                if resolution**3 <= size:
                    index = (coords[0] + coords[1] * resolution + coords[2] * resolution**2) % size
                else:
                    hashed = 0
                    for a in range(3):
                        hashed ^= (coords[a] * PRIMES[a]) & 0xFFFFFFFF
                    index = hashed % size
                factors = [frac[a] if bits[a] else 1 - frac[a] for a in range(3)]
                weight = factors[0] * factors[1] * factors[2]
                for f in range(n_feat):
                    column, entry = level * n_feat + f, (offset + index) * n_feat + f
                    out[i, column] += weight * table[entry]
                    contributions.append((i, column, entry, weight))
                    for a in range(3):
                        others = np.prod([factors[b] for b in range(3) if b != a])
                        sign = 1.0 if bits[a] else -1.0
                        d_points[i, column, a] += sign * others * float(scale) * table[entry]
    return out, contributions, d_points


SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=1.7)


def test_layout_follows_tcnn_rules():
    for config in (SMALL, dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16)):
        encoding = HashGridEncoding(**config, backend="torch")
        layout = reference_layout(
            config["n_levels"], config["log2_hashmap_size"], config["base_resolution"], encoding.per_level_scale
        )
        got = [(np.float32(lv.scale), lv.resolution, lv.size, lv.offset) for lv in encoding.levels]
        assert got == layout
        assert encoding.params.numel() == (layout[-1][3] + layout[-1][2]) * config["n_features_per_level"]
    default = HashGridEncoding(backend="torch")
    assert default.per_level_scale == pytest.approx(1.4472692374)  # threestudio's value: 16 -> 4096 in 16 levels
    assert [default.levels[0].resolution, default.levels[-1].resolution] == [16, 4096]
    assert default.n_dense == 5 and all(lv.size == 2**19 for lv in default.levels[5:])
    assert default.params.abs().max() <= 1e-4
    # Instant-NGP's NeRF grid (16 levels up to 2048, 2^19 entries) holds 12,196,240 parameters in tcnn.
    assert HashGridEncoding(max_resolution=2048, backend="torch").params.numel() == 12196240


def test_values_and_gradients_match_reference():
    torch.manual_seed(0)
    encoding = HashGridEncoding(**SMALL, backend="torch")
    layout = [(np.float32(lv.scale), lv.resolution, lv.size, lv.offset) for lv in encoding.levels]
    assert any(r**3 <= s for _, r, s, _ in layout) and any(r**3 > s for _, r, s, _ in layout)  # both kinds
    with torch.no_grad():
        encoding.params.normal_()  # O(1) values, so any wrong index shows
    points = torch.cat([torch.rand(40, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.999, 0.0, 0.5]])])
    points.requires_grad_(True)
    table = encoding.params.detach().double().numpy()
    expected, contributions, d_points = reference_encode(points.detach().numpy(), table, layout, 2)

    out = encoding(points)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5)

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    g = upstream.double().numpy()
    expected_table_grad = np.zeros_like(table)
    for i, column, entry, weight in contributions:
        expected_table_grad[entry] += weight * g[i, column]
    np.testing.assert_allclose(encoding.params.grad.numpy(), expected_table_grad, atol=1e-5)
    expected_point_grad = np.einsum("nc,nca->na", g, d_points)
    interior = slice(0, 40)  # inputs are clamped to [0, 1], so the corner points have one-sided gradients
    np.testing.assert_allclose(points.grad[interior].numpy(), expected_point_grad[interior], rtol=1e-4, atol=1e-3)


def test_backward_recomputing_the_corners_equals_the_one_that_keeps_them(monkeypatch):
    """Inputs too large to keep their corners for the backward get theirs recomputed: the same gradients."""
    torch.manual_seed(1)
    encoding = HashGridEncoding(**SMALL, backend="torch")
    with torch.no_grad():
        encoding.params.normal_()
    points, upstream = torch.rand(300, 3), torch.randn(300, encoding.n_output_dims)

    def gradients():
        encoding.params.grad = None
        x = points.clone().requires_grad_(True)
        (encoding(x) * upstream).sum().backward()
        return encoding.params.grad, x.grad

    kept = gradients()
    monkeypatch.setattr(encoding_module, "KEEP_CORNERS", 0)
    monkeypatch.setattr(encoding_module, "CHUNK", 128)  # several chunks
    for got, expected in zip(gradients(), kept):
        torch.testing.assert_close(got, expected)


def test_no_grad_and_batched_shapes_agree():
    encoding = HashGridEncoding(**SMALL, backend="torch")
    points = torch.rand(2, 5, 3)
    with torch.no_grad():
        plain = encoding(points)
    assert plain.shape == (2, 5, 12)
    torch.testing.assert_close(encoding(points.reshape(-1, 3)).reshape(2, 5, 12), plain)
    assert encoding(torch.zeros(0, 3)).shape == (0, 12)


def test_backend_choice():
    assert HashGridEncoding(**SMALL, backend="torch").backend == "torch"
    with pytest.raises(UserError, match="backend"):
        HashGridEncoding(**SMALL, backend="cuda")
    if not tcnn_available():
        assert HashGridEncoding(**SMALL).backend == "torch"
        with pytest.raises(UserError, match="tinycudann"):
            HashGridEncoding(**SMALL, backend="tcnn")


@pytest.mark.skipif(not tcnn_available(), reason="needs CUDA and tinycudann")
def test_tcnn_matches_torch_path():
    torch.manual_seed(0)
    encoding = HashGridEncoding(n_levels=8, log2_hashmap_size=14, base_resolution=8, backend="tcnn").cuda()
    with torch.no_grad():
        encoding.params.uniform_(-1, 1)
    points = torch.rand(4096, 3, device="cuda")
    fast = encoding(points)
    slow = _HashGridFunction.apply(points, encoding.params, encoding)  # the pure-PyTorch path, same parameters
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    fast.square().sum().backward()
    grad_fast = encoding.params.grad.clone()
    encoding.params.grad = None
    slow.square().sum().backward()
    torch.testing.assert_close(grad_fast, encoding.params.grad, atol=1e-3, rtol=1e-3)
    assert set(encoding.state_dict()) == {"params"}
