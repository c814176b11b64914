"""Multiresolution hash-grid encoding (Instant-NGP), laid out and hashed exactly like tiny-cuda-nn's HashGrid.

Level l has scale s_l = base_resolution * per_level_scale**l - 1 (float32, as tcnn computes it) and
resolution ceil(s_l) + 1 vertices per axis. An input x in [0, 1]^3 sits at x * s_l + 0.5 on that level's lattice
(the +0.5 staggers the levels). A level whose vertices fit in its table is indexed densely (x + y R + z R^2); a
finer one hashes with the primes (1, 2654435761, 805459861), xor-ed in uint32 arithmetic. Either index is taken
modulo the level's table size, min(next multiple of 8 of R^3, 2**log2_hashmap_size). The parameters form one flat
vector, level after level, `n_features_per_level` values per entry -- the same vector tcnn's module holds, so a
state dict moves between the two backends. Outputs are the trilinearly interpolated features, level-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dd3d.cli import UserError

PRIMES = (1, 2654435761, 805459861)
CHUNK = 1 << 15  # points per pass of the torch path
KEEP_CORNERS = 1 << 21  # point-levels (points x levels) up to which the forward keeps its corners for the backward


@dataclass(frozen=True)
class GridLevel:
    scale: float  # lattice coordinate = x * scale + 0.5
    resolution: int  # vertices per axis
    size: int  # table entries
    offset: int  # first entry of this level in the flat table
    dense: bool  # indexed without hashing


def grid_levels(n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float) -> list[GridLevel]:
    """The per-level layout tiny-cuda-nn's GridEncoding computes for a 3D hash grid."""
    log2_scale = np.log2(np.float32(per_level_scale))
    levels, offset = [], 0
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        dense_size = -(-(resolution**3) // 8) * 8
        size = min(dense_size, 2**log2_hashmap_size)
        levels.append(GridLevel(float(scale), resolution, size, offset, resolution**3 <= size))
        offset += size
    return levels


def tcnn_available() -> bool:
    """Whether tinycudann imports and has a CUDA device to run on."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class HashGridEncoding(nn.Module):
    """Points in [0, 1]^3 (others are clamped), shape (..., 3) -> features (..., n_levels * n_features_per_level).

    `per_level_scale` defaults to (max_resolution / base_resolution) ** (1 / (n_levels - 1)); the defaults give
    threestudio's 1.4473. `backend`: "torch" (pure PyTorch, any device), "tcnn" (tinycudann, CUDA inputs only) or
    "auto" (tcnn when it imports and CUDA is available). With tcnn, CPU inputs still go through the torch path,
    which computes the same function of the same parameters.
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float | None = None,
        max_resolution: int = 4096,
        backend: str = "auto",
    ):
        super().__init__()
        if per_level_scale is None:
            per_level_scale = (max_resolution / base_resolution) ** (1.0 / max(n_levels - 1, 1))
        if per_level_scale < 1.0:
            raise UserError(f"per_level_scale must be >= 1, got {per_level_scale}")
        if backend not in ("auto", "torch", "tcnn"):
            raise UserError(f"encoding backend must be auto, torch or tcnn, got {backend!r}")
        self.n_levels, self.n_features_per_level = n_levels, n_features_per_level
        self.log2_hashmap_size, self.base_resolution = log2_hashmap_size, base_resolution
        self.per_level_scale = float(per_level_scale)
        self.levels = grid_levels(n_levels, log2_hashmap_size, base_resolution, self.per_level_scale)
        self.n_output_dims = n_levels * n_features_per_level
        n_entries = self.levels[-1].offset + self.levels[-1].size
        self.params = nn.Parameter(torch.empty(n_entries * n_features_per_level).uniform_(-1e-4, 1e-4))

        # Dense levels come first (resolution grows with the level), so they form a prefix of the level axis.
        # A hashed index keeps only the low log2_hashmap_size bits of each axis's product, which depend only on the
        # same bits of the prime: with the primes reduced modulo the table, the products need no uint32 wrap-around,
        # and where every index sum fits in int32 (the usual grids), the corner arithmetic runs in int32.
        self.n_dense = sum(level.dense for level in self.levels)
        strides = [(1, lv.resolution, lv.resolution**2) if lv.dense else [p % lv.size for p in PRIMES]
                   for lv in self.levels]
        largest = max(
            (lv.resolution + 1) * sum(stride) + lv.offset + lv.size for lv, stride in zip(self.levels, strides)
        )
        index_dtype = torch.int32 if largest < 2**31 else torch.int64
        buffers = {
            "scales": torch.tensor([lv.scale for lv in self.levels], dtype=torch.float32),
            "strides": torch.tensor(strides, dtype=index_dtype),
            "sizes": torch.tensor([lv.size for lv in self.levels], dtype=index_dtype)[:, None],
            "offsets": torch.tensor([lv.offset for lv in self.levels], dtype=index_dtype)[:, None],
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

        self.backend = "tcnn" if backend == "tcnn" or (backend == "auto" and tcnn_available()) else "torch"
        if self.backend == "tcnn":  # kept out of the module tree: its parameters are self.params
            object.__setattr__(self, "_tcnn", self._make_tcnn())

    def tcnn_config(self) -> dict:
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }

    def _make_tcnn(self):
        if not tcnn_available():
            raise UserError(
                "encoding backend 'tcnn' needs a CUDA GPU and tinycudann (built from NVlabs' tiny-cuda-nn, "
                "bindings/torch); or set field.encoding.backend=torch"
            )
        import tinycudann

        # fp32 parameters and gradients: tcnn's default (fp16 on recent GPUs) lets small SDS gradients underflow.
        module = tinycudann.Encoding(3, self.tcnn_config(), dtype=torch.float32)
        if module.params.numel() != self.params.numel():
            raise RuntimeError(f"tinycudann holds {module.params.numel()} parameters, expected {self.params.numel()}")
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, 3)
        if self.backend == "tcnn" and flat.is_cuda:
            self._tcnn.params = self.params  # tcnn's forward reads this attribute: one parameter, one layout
            out = self._tcnn(flat).float()
        else:
            out = _HashGridFunction.apply(flat.float(), self.params, self)
        return out.reshape(*x.shape[:-1], self.n_output_dims)

    def _corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (n, 3) -> table row of each level's 8 surrounding vertices (8, L, n), the corners ordered (x bit,
        y bit, z bit), and the fractional position within the level's cell (3, L, n). Corners and levels lead, so
        every elementwise pass runs along the points."""
        pos = x.clamp(0.0, 1.0).T[:, None, :] * self.scales[:, None] + 0.5  # (3, L, n)
        cell = pos.floor()
        lower = cell.to(self.strides.dtype) * self.strides.T[:, :, None]  # lattice coordinate times the axis stride
        tx, ty, tz = _outer_axes(torch.stack([lower, lower + self.strides.T[:, :, None]], dim=1))  # lower, upper
        d, sizes, offsets = self.n_dense, self.sizes, self.offsets
        index = torch.empty(2, 2, 2, self.n_levels, len(x), dtype=torch.int64, device=x.device)
        if d:  # x + y R + z R^2 lies below twice the table size: one subtraction is the modulo
            dense = tx[..., :d, :] + ty[..., :d, :] + tz[..., :d, :]
            torch.add(torch.where(dense >= sizes[:d], dense - sizes[:d], dense), offsets[:d], out=index[..., :d, :])
        if d < self.n_levels:  # hashed tables are 2**log2_hashmap_size: the modulo is a mask
            mask = sizes[d:] - 1
            hashed = (tx[..., d:, :] & mask) ^ (ty[..., d:, :] & mask) ^ (tz[..., d:, :] & mask)
            torch.add(hashed, offsets[d:], out=index[..., d:, :])
        return index.view(8, self.n_levels, len(x)), pos - cell

    def _gather(self, params: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(8, L, n) rows of the flat table -> their features (8, L, n, F)."""
        n_feat = self.n_features_per_level
        return params.view(-1, n_feat).index_select(0, index.view(-1)).view(*index.shape, n_feat)

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels}x{self.n_features_per_level}, table=2^{self.log2_hashmap_size}, "
            f"base={self.base_resolution}, scale={self.per_level_scale:.4f}, dense_levels={self.n_dense}, "
            f"params={self.params.numel()}, backend={self.backend}"
        )


def _outer_axes(per_axis: torch.Tensor):
    """(3, 2, ...) lower/upper values per axis -> three (2, 2, 2, ...) tensors that broadcast over the 8 corners."""
    return per_axis[0][:, None, None], per_axis[1][None, :, None], per_axis[2][None, None, :]


def _trilinear(frac: torch.Tensor) -> torch.Tensor:
    """Fractional positions (3, L, n) -> the weights of the 8 corners (8, L, n)."""
    wx, wy, wz = _outer_axes(torch.stack([1 - frac, frac], dim=1))
    return (wx * wy * wz).flatten(0, 2)


def _trilinear_derivatives(frac: torch.Tensor) -> torch.Tensor:
    """d weight / d frac: (3, 8, L, n)."""
    wx, wy, wz = _outer_axes(torch.stack([1 - frac, frac], dim=1))
    sign = torch.tensor([-1.0, 1.0], device=frac.device).view(2, 1, 1)
    dx, dy, dz = sign[:, None, None], sign[None, :, None], sign[None, None, :]
    return torch.stack([(dx * wy * wz).flatten(0, 2), (wx * dy * wz).flatten(0, 2), (wx * wy * dz).flatten(0, 2)])


class _HashGridFunction(torch.autograd.Function):
    """The torch path, CHUNK points at a time. The backward reuses the forward's corner rows, weights and fractions
    for up to KEEP_CORNERS point-levels (~110 bytes each); for more it recomputes them, so memory grows only with
    the inputs. First-order gradients only."""

    @staticmethod
    def forward(ctx, x, params, encoding):
        ctx.save_for_backward(x, params)
        ctx.encoding = encoding
        keep = any(ctx.needs_input_grad[:2]) and len(x) * encoding.n_levels <= KEEP_CORNERS
        ctx.corners, out = [] if keep else None, []
        for chunk in x.split(CHUNK):
            index, frac = encoding._corners(chunk)
            weights = _trilinear(frac)
            features = (weights[..., None] * encoding._gather(params, index)).sum(0)  # (L, n, F)
            out.append(features.transpose(0, 1).flatten(1))
            if keep:
                ctx.corners.append((index, weights, frac))
        return torch.cat(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, params = ctx.saved_tensors
        encoding = ctx.encoding
        n_levels, n_feat = encoding.n_levels, encoding.n_features_per_level
        grad_table = torch.zeros_like(params).view(-1, n_feat) if ctx.needs_input_grad[1] else None
        grad_x = []
        chunks = x.split(CHUNK)
        corners = ctx.corners
        if corners is None:
            corners = ((index, _trilinear(frac), frac) for index, frac in map(encoding._corners, chunks))
        for chunk, grad, (index, weights, frac) in zip(chunks, grad_out.split(CHUNK), corners):
            grad = grad.reshape(len(chunk), n_levels, n_feat).transpose(0, 1)  # (L, n, F)
            if grad_table is not None:
                grad_table.index_add_(0, index.view(-1), (weights[..., None] * grad).view(-1, n_feat))
            if ctx.needs_input_grad[0]:
                projected = (encoding._gather(params, index) * grad).sum(-1)  # (8, L, n)
                grad_frac = (_trilinear_derivatives(frac) * projected).sum(1)  # (3, L, n)
                inside = ((chunk >= 0) & (chunk <= 1)).float()  # inputs are clamped to [0, 1]
                grad_x.append((grad_frac * encoding.scales[:, None]).sum(1).T * inside)
        grad_params = None if grad_table is None else grad_table.view(-1)
        return (torch.cat(grad_x) if grad_x else None), grad_params, None
