"""Mesh export of a trained NeRF: density grid, marching cubes, cleanup, colours or a baked texture, .obj/.glb files.

The exporter only needs two functions of world-space points and the scene box:
  density_fn(points (N, 3)) -> (N,) densities >= 0      albedo_fn(points (N, 3)) -> (N, 3) colours in [0, 1]
World coordinates are Z-up with the object's front facing +X; the written files are glTF-style Y-up, front +Z.

Example:
  mesh = extract_mesh(field.density, field.albedo, aabb=1.0, texture_size=1024)
  write_mesh(mesh, "outputs/chair/mesh")        # mesh.obj (+ mesh.mtl, mesh.png), mesh.glb
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import mcubes
import numpy as np
import psutil
import torch
import trimesh
import xatlas
from PIL import Image

from dd3d.cli import UserError
from dd3d.files import atomic_write
from dd3d.progress import tqdm

PointFn = Callable[[torch.Tensor], torch.Tensor]

SURFACE_OPACITY = 0.5  # the default surface is where a ray from outside has accumulated this opacity
MIN_RESOLUTION = 8
MIN_TEXTURE_SIZE = 16
SURFACES = ("opacity", "density")
# Host memory per grid sample: the float32 grid, the opacity scan's four float32 working arrays, and the marching
# cubes + cleanup working set (~40 B per sample: up to one triangle per 10 samples at ~400 B each, measured).
BYTES_PER_SAMPLE = 4 + 4 * 4 + 40
TEXTURE_PADDING = 4  # texels between UV charts, and how far baked colours are dilated into the gaps
# Our Z-up, front +X frame -> glTF's Y-up, front +Z frame: (x, y, z) -> (y, z, x), a proper rotation (det +1).
ZUP_TO_YUP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
FORMATS = ("obj", "glb")


def extract_mesh(
    density_fn: PointFn,
    albedo_fn: PointFn,
    aabb: float | torch.Tensor = 1.0,
    resolution: int | None = None,
    threshold: float | None = None,
    surface: str = "opacity",
    min_component_fraction: float = 0.05,
    face_budget: int | None = None,
    texture_size: int | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 2**18,
    progress: bool = True,
) -> trimesh.Trimesh:
    """The field's surface as a coloured triangle mesh in world coordinates, faces wound outward.

    aabb: the scene box, a radius r (box [-r, r]^3) or a (2, 3) tensor of min/max corners.
    resolution: grid samples per axis (default 256 on CUDA, 128 otherwise); refused if it would not fit in memory.
    surface: "opacity" (the boundary of what is hidden from outside: see `hidden_opacity`; closed, whatever the
      density does inside) or "density" (a density iso-surface at `default_threshold`: rays reach opacity 0.5).
    threshold: a density iso-level; given, it selects the density surface at that level.
    min_component_fraction: connected pieces with fewer faces than this fraction of the largest are dropped.
    face_budget: decimate (quadric, fast-simplification) to at most this many faces.
    texture_size: None gives per-vertex colours; N unwraps UVs with xatlas and bakes an N x N albedo texture.
    device: where the functions are evaluated (default: the aabb tensor's device, else CPU).
    """
    lo, hi = _box(aabb)
    device = torch.device(device) if device is not None else lo.device
    resolution = resolution or (256 if device.type == "cuda" else 128)
    _check_options(resolution, threshold, min_component_fraction, face_budget, texture_size)
    if surface not in SURFACES:
        raise UserError(f"surface must be opacity or density, not '{surface}'")
    check_memory(resolution)
    grid = density_grid(density_fn, lo, hi, resolution, device, chunk_size, progress)
    spacing = ((hi - lo) / (resolution - 1)).double().cpu()
    if threshold is None and surface == "opacity":
        hidden = hidden_opacity(grid, spacing)
        if not hidden.max() > SURFACE_OPACITY:
            raise _no_surface(grid, "no ray through the scene box reaches opacity 0.5, the field is almost transparent")
        grid, threshold = hidden, SURFACE_OPACITY
    if threshold is None:
        threshold = default_threshold(grid, spacing)
        if threshold is None:
            raise _no_surface(grid, "no ray through the scene box reaches opacity 0.5, the field is almost transparent")
    if not grid.max() > threshold:
        raise _no_surface(grid, f"no density in the scene box exceeds the threshold {threshold:.4g}")

    # PyMCubes winds every face so that its normal points toward lower values: outward, cavities included
    vertices, faces = mcubes.marching_cubes(grid.numpy(), float(threshold))
    del grid
    vertices = lo.double().cpu().numpy() + (vertices - 1.0) * spacing.numpy()  # the grid has one padding sample
    mesh = drop_small_components(trimesh.Trimesh(vertices, faces.astype(np.int64)), min_component_fraction)
    if face_budget is not None and len(mesh.faces) > face_budget:
        mesh = mesh.simplify_quadric_decimation(face_count=face_budget)
    if texture_size is not None:
        return bake_texture(mesh, albedo_fn, texture_size, device, chunk_size, progress)
    colours = _evaluate(albedo_fn, mesh.vertices, device, chunk_size).clip(0.0, 1.0)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.round(colours * 255).astype(np.uint8))
    return mesh


def _box(aabb) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(aabb, (int, float)):
        box = torch.tensor([[-1.0] * 3, [1.0] * 3]) * float(aabb)
    else:
        box = torch.as_tensor(aabb, dtype=torch.float32)
    if box.shape != (2, 3) or not bool((box[1] > box[0]).all()):
        raise UserError(f"scene box must be a positive radius or a (2, 3) min/max tensor, got {aabb}")
    return box[0].float(), box[1].float()


def _check_options(resolution, threshold, min_component_fraction, face_budget, texture_size) -> None:
    if resolution < MIN_RESOLUTION:
        raise UserError(f"mesh resolution {resolution} is too small; use at least {MIN_RESOLUTION}")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise UserError(f"density threshold must be a positive number, got {threshold}")
    if not 0 <= min_component_fraction <= 1:
        raise UserError(f"min_component_fraction must be between 0 and 1, got {min_component_fraction}")
    if face_budget is not None and face_budget < 4:
        raise UserError(f"face budget must be at least 4 faces, got {face_budget}")
    if texture_size is not None and texture_size < MIN_TEXTURE_SIZE:
        raise UserError(f"texture size {texture_size} is too small; use at least {MIN_TEXTURE_SIZE}")


def check_memory(resolution: int) -> None:
    """Refuse, before allocating anything, a grid whose extraction would not fit in the available host memory."""
    needed = (resolution + 2) ** 3 * BYTES_PER_SAMPLE
    available = psutil.virtual_memory().available
    if needed > available:
        fits = int((available / BYTES_PER_SAMPLE) ** (1 / 3)) - 2
        raise UserError(
            f"mesh resolution {resolution} needs about {needed / 2**30:.1f} GiB (density grid + marching cubes) but "
            f"only {available / 2**30:.1f} GiB of memory is available; use resolution={fits // 32 * 32} or less"
        )


def density_grid(
    density_fn: PointFn,
    lo: torch.Tensor,
    hi: torch.Tensor,
    resolution: int,
    device: torch.device,
    chunk_size: int = 2**18,
    progress: bool = True,
) -> torch.Tensor:
    """Densities at resolution^3 points spanning [lo, hi] (corners included), on the CPU as float32, with one sample
    of zero padding on every side so that marching cubes closes surfaces cut by the box. NaN counts as empty."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution, device=device) for i in range(3)]
    grid = torch.zeros((resolution + 2,) * 3)
    slabs = max(1, chunk_size // resolution**2)
    bar = tqdm(total=resolution**3, desc="density grid", unit="pt", unit_scale=True, disable=not progress)
    with torch.no_grad(), bar:
        for start in range(0, resolution, slabs):
            xs = axes[0][start : start + slabs]
            points = torch.stack(torch.meshgrid(xs, axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3)
            sigma = density_fn(points).reshape(len(xs), resolution, resolution)
            grid[1 + start : 1 + start + len(xs), 1:-1, 1:-1] = sigma.float().cpu()
            bar.update(points.shape[0])
    return torch.nan_to_num_(grid, nan=0.0, posinf=torch.finfo(torch.float32).max).clamp_(min=0.0)


def hidden_opacity(grid: torch.Tensor, spacing) -> torch.Tensor:
    """How hidden each sample is from outside the box: the least opacity that a ray coming in along any of the six
    axis directions has accumulated on reaching it (1 - exp(-optical depth), trapezoid rule; grid (X, Y, Z) of
    densities sampled every spacing[axis] world units, its border outside the object).

    Its 0.5 level is where axis rays from outside turn half opaque -- the depth a volume renderer shows -- and every
    sample beyond it on all six sides is inside. Unlike a density iso-level, it does not depend on how the density
    is spread inside the object (a field whose density peaks at its surface has a hollow iso-surface, in pieces) and
    gives one closed surface per object; cavities open along an axis (a cup's top) stay open."""
    hidden = torch.ones_like(grid)
    for axis in range(3):
        step = float(spacing[axis])
        for flip in (False, True):
            sigma = grid.movedim(axis, 0)
            sigma = sigma.flip(0) if flip else sigma
            depth = torch.cumsum(sigma, 0).sub_(sigma, alpha=0.5).sub_(sigma[:1], alpha=0.5).mul_(-step)
            opacity = depth.exp_().neg_().add_(1.0)
            opacity = opacity.flip(0) if flip else opacity
            torch.minimum(hidden, opacity.movedim(0, axis), out=hidden)
            del depth, opacity
    return hidden


def default_threshold(grid: torch.Tensor, spacing) -> float | None:
    """The density iso-level at which the mesh sits where rays turn opaque, or None if no ray ever does.

    Rule: cast a ray along every grid line in all six axis directions and find, on each, the point where the
    accumulated opacity 1 - exp(-integral of density) first reaches 0.5 -- the depth a volume renderer shows for
    that ray. Density is integrated with the same linear interpolation between samples that marching cubes uses, so
    the crossing point and its density are exact for that model. The threshold is the median of the densities at
    those crossings, each weighted by cos^8 of the angle between the ray and the density gradient there: rays that
    hit the surface head-on count, grazing rays (which turn opaque early in a soft shell) hardly do. A hard surface
    (density jumping from ~0 to sigma within a sample) gives a level between 0 and sigma, so the mesh lands on the
    jump; a soft field gives the level at which head-on rays reach opacity one half, whatever the field's scale.
    grid: (X, Y, Z) densities >= 0 sampled every spacing[axis] world units.
    """
    target = math.log(1.0 / (1.0 - SURFACE_OPACITY))  # optical depth at which the opacity reaches SURFACE_OPACITY
    densities, weights = [], []
    for axis in range(3):
        sigma = grid.movedim(axis, 0)  # rays run along dim 0
        step = float(spacing[axis])
        depth = torch.cumsum(sigma, 0)  # trapezoid optical depth from index 0: step * (C_k - s_k / 2 - s_0 / 2)
        depth.sub_(sigma, alpha=0.5).sub_(sigma[:1], alpha=0.5).mul_(step)
        n = sigma.shape[0]
        for entering_at_start in (True, False):  # depth is non-decreasing, so each test holds on a suffix / prefix
            if entering_at_start:  # crossing between the first k with depth_k >= target and k - 1
                count = (depth >= target).sum(0)
                row, col = torch.nonzero(count, as_tuple=True)
                inner = n - count[row, col]
                outer = inner - 1
                remaining = target - depth[outer, row, col]
            else:  # from the far end: between the last m with depth_last - depth_m >= target and m + 1
                count = (depth <= depth[-1:] - target).sum(0)
                row, col = torch.nonzero(count, as_tuple=True)
                inner = count[row, col] - 1
                outer = inner + 1
                remaining = target - (depth[-1, row, col] - depth[outer, row, col])
            a, b = sigma[outer, row, col].double(), sigma[inner, row, col].double()
            densities.append(_crossing(a, b, remaining.double() / step))
            across = [axis_ for axis_ in range(3) if axis_ != axis]
            g1 = sigma[inner, (row + 1).clamp(max=sigma.shape[1] - 1), col] - sigma[inner, (row - 1).clamp(min=0), col]
            g2 = sigma[inner, row, (col + 1).clamp(max=sigma.shape[2] - 1)] - sigma[inner, row, (col - 1).clamp(min=0)]
            g1 = g1.double() / (2 * float(spacing[across[0]]))
            g2 = g2.double() / (2 * float(spacing[across[1]]))
            along = (b - a) / step
            cosine = along.abs() / (along**2 + g1**2 + g2**2).sqrt().clamp(min=1e-30)
            weights.append(cosine**8 + 1e-6)  # the floor keeps a plain median where no gradient is defined
        del depth  # freed before the next axis allocates its own
    densities, weights = torch.cat(densities), torch.cat(weights)
    if len(densities) == 0:
        return None
    order = densities.argsort()
    cumulative = weights[order].cumsum(0)
    return float(densities[order][torch.searchsorted(cumulative, cumulative[-1] / 2)])


def _crossing(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Density where a ray entering a sample interval at density a (leaving at b, linear in between) has added
    q * step optical depth: solve a u + (b - a) u^2 / 2 = q for u in (0, 1], in a form stable for any a, b >= 0."""
    root = (a * a + 2.0 * (b - a) * q).clamp(min=0.0).sqrt()
    u = (2.0 * q / (a + root).clamp(min=1e-30)).clamp(0.0, 1.0)
    return a + (b - a) * u


def _no_surface(grid: torch.Tensor, reason: str) -> UserError:
    """The error for an empty mesh, with a threshold suggested from the grid's own densities."""
    top = float(grid.max())
    if top <= 0:
        return UserError("the density field is zero everywhere in the scene box: nothing to export (check the box)")
    suggestion, why = float(np.percentile(grid[grid > 0].numpy(), 99)), "the 99th percentile of the non-zero densities"
    if suggestion >= top:  # a flat field: the percentile is its maximum, which gives no surface
        suggestion, why = top / 2, "half the maximum density"
    return UserError(f"no surface to export: {reason} (max density {top:.4g}); try threshold={suggestion:.4g}, {why}")


def drop_small_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """Keep the connected pieces with at least `min_fraction` of the largest piece's faces (drops floaters)."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_fraction * sizes.max()
    if keep.all():
        return mesh
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def bake_texture(
    mesh: trimesh.Trimesh,
    albedo_fn: PointFn,
    size: int,
    device: torch.device,
    chunk_size: int = 2**18,
    progress: bool = True,
) -> trimesh.Trimesh:
    """A copy of `mesh` with xatlas UVs and a size x size albedo texture (PBR, metallic 0, roughness 1).

    Each UV triangle is rasterised at texel centres, the texel's surface point is the barycentric blend of the
    triangle's 3D corners, and albedo_fn is sampled there. Filled texels are then dilated TEXTURE_PADDING texels
    into empty neighbours so that filtering across chart seams does not pick up background; the rest is the mean.
    """
    atlas = xatlas.Atlas()
    atlas.add_mesh(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = TEXTURE_PADDING
    with tqdm(total=1, desc="unwrapping UVs", disable=not progress) as bar:
        atlas.generate(pack_options=pack)
        bar.update()
    mapping, faces, uv = atlas.get_mesh(0)
    faces = faces.astype(np.int64)
    positions = mesh.vertices[mapping]

    texel_ids, points = _rasterise(uv.astype(np.float64) * size - 0.5, faces, positions, size, progress)
    colours = np.zeros((size * size, 3))
    filled = np.zeros(size * size, dtype=bool)
    colours[texel_ids] = _evaluate(albedo_fn, points, device, chunk_size).clip(0.0, 1.0)
    filled[texel_ids] = True
    colours, filled = _dilate(colours.reshape(size, size, 3), filled.reshape(size, size), TEXTURE_PADDING)
    colours[~filled] = colours[filled].mean(0)
    # texel (x, y) counts y up from the bottom, as trimesh's (OBJ-style) UVs do; image rows count down
    image = Image.fromarray(np.round(colours[::-1] * 255).astype(np.uint8))
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0
    )
    return trimesh.Trimesh(
        positions,
        faces,
        vertex_normals=mesh.vertex_normals[mapping],
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
    )


def _rasterise(
    tri_xy: np.ndarray, faces: np.ndarray, positions: np.ndarray, size: int, progress: bool, batch: int = 2**22
) -> tuple[np.ndarray, np.ndarray]:
    """Flat texel indices (y * size + x) whose centres fall in a UV triangle, and their 3D surface points.
    tri_xy: per-vertex texel coordinates, texel (x, y) centred at (x, y)."""
    corners = tri_xy[faces]  # (F, 3, 2)
    lo = np.clip(np.ceil(corners.min(1)), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(corners.max(1)), 0, size - 1).astype(np.int64)
    width, height = (hi - lo + 1).clip(min=0).T
    counts = width * height
    ends = np.cumsum(counts)
    bounds = np.searchsorted(ends, np.arange(batch, ends[-1] + batch, batch), side="right")
    ids, points = [], []
    start = 0
    for stop in tqdm(np.unique(np.append(bounds, len(faces))), desc="baking texture", disable=not progress):
        tri = np.repeat(np.arange(start, stop), counts[start:stop])
        offset = np.arange(len(tri)) - np.repeat(ends[start:stop] - counts[start:stop], counts[start:stop])
        x = lo[tri, 0] + offset % width[tri]
        y = lo[tri, 1] + offset // width[tri]
        a, b, c = corners[tri, 0], corners[tri, 1], corners[tri, 2]
        e1, e2 = b - a, c - a
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        px, py = x - a[:, 0], y - a[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            w1 = (px * e2[:, 1] - py * e2[:, 0]) / det
            w2 = (e1[:, 0] * py - e1[:, 1] * px) / det
        w0 = 1.0 - w1 - w2
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)  # false where det == 0 (NaN weights)
        corner_xyz = positions[faces[tri[inside]]]
        weights = np.stack([w0[inside], w1[inside], w2[inside]], 1)[:, :, None]
        ids.append(y[inside] * size + x[inside])
        points.append((corner_xyz * weights).sum(1))
        start = stop
    return np.concatenate(ids), np.concatenate(points)


def _dilate(colours: np.ndarray, filled: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow filled texels `steps` times into empty 8-neighbours, each new texel the mean of its filled neighbours."""
    size_y, size_x = filled.shape
    for _ in range(steps):
        padded_c = np.pad(colours * filled[..., None], ((1, 1), (1, 1), (0, 0)))
        padded_f = np.pad(filled, 1).astype(np.float64)
        total = np.zeros_like(colours)
        count = np.zeros(filled.shape)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dx or dy:
                    total += padded_c[1 + dy : 1 + dy + size_y, 1 + dx : 1 + dx + size_x]
                    count += padded_f[1 + dy : 1 + dy + size_y, 1 + dx : 1 + dx + size_x]
        grow = ~filled & (count > 0)
        colours[grow] = total[grow] / count[grow, None]
        filled = filled | grow
    return colours, filled


def _evaluate(fn: PointFn, points: np.ndarray, device: torch.device, chunk_size: int) -> np.ndarray:
    """fn over (N, 3) numpy points in chunks, without gradients; non-finite outputs become 0."""
    out = []
    with torch.no_grad():
        for start in range(0, len(points), chunk_size):
            batch = torch.as_tensor(points[start : start + chunk_size], dtype=torch.float32, device=device)
            out.append(torch.nan_to_num(fn(batch).float(), nan=0.0, posinf=0.0, neginf=0.0).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def to_output_frame(mesh: trimesh.Trimesh, size: float | None = 1.0) -> trimesh.Trimesh:
    """A copy in the files' frame: rotated by ZUP_TO_YUP (Z-up, front +X -> Y-up, front +Z), its bounding box
    centred at the origin, and scaled so its largest dimension is `size` (metres); size=None keeps the scale."""
    out = mesh.copy()
    transform = np.eye(4)
    transform[:3, :3] = ZUP_TO_YUP
    transform[:3, 3] = -ZUP_TO_YUP @ mesh.bounds.mean(0)
    if size is not None:
        transform[:3] *= size / mesh.extents.max()
    out.apply_transform(transform)
    return out


def write_mesh(
    mesh: trimesh.Trimesh, path: str | Path, formats: tuple[str, ...] | None = None, size: float | None = 1.0
) -> list[Path]:
    """Write `mesh` (world frame, from extract_mesh) as .obj and/or binary .glb; returns every file written.

    path: a folder (files named mesh.*), a base name ("out/chair" -> out/chair.obj, out/chair.glb), or a file name
    whose suffix picks the format ("out/chair.glb"). formats: any of "obj", "glb" (default: both, or the suffix's).
    The files are Y-up, front +Z, centred, largest dimension `size` metres (see to_output_frame). Textured meshes
    write OBJ + MTL + PNG and a GLB with the PNG embedded; otherwise vertex colours (linearised in the GLB, as glTF
    defines COLOR_0 as linear). Every file is written atomically, and all are encoded before the first is written.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if path.is_dir():
        stem = path / "mesh"
    elif suffix in FORMATS:
        stem = path.with_suffix("")
        formats = formats or (suffix,)
    else:
        stem = path
    formats = tuple(formats or FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown mesh format '{unknown[0]}'; use one of {', '.join(FORMATS)}")

    out = to_output_frame(mesh, size)
    out.metadata = {"name": re.sub(r"[^\w.-]", "_", stem.name)}  # the object's name in Blender / viewers
    files: dict[Path, bytes] = {}
    if "obj" in formats:
        files.update(_encode_obj(out, stem))
    if "glb" in formats:
        files[stem.with_name(stem.name + ".glb")] = _encode_glb(out)
    for target, data in files.items():  # texture and .mtl before the .obj that refers to them
        atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
    return list(files)


def _encode_obj(mesh: trimesh.Trimesh, stem: Path) -> dict[Path, bytes]:
    name = mesh.metadata["name"]
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        mesh = mesh.copy()
        white = (255, 255, 255, 255)
        image = mesh.visual.material.baseColorTexture
        # matte: no specular, Ns 0 (Blender reads that as roughness 1)
        mesh.visual.material = trimesh.visual.material.SimpleMaterial(
            image=image, diffuse=white, ambient=white, specular=(0, 0, 0, 255), glossiness=0.0, name=name
        )
    text, extra = trimesh.exchange.obj.export_obj(
        mesh, include_normals=True, return_texture=True, mtl_name=f"{name}.mtl", header=None
    )
    files = {stem.with_name(file_name): data for file_name, data in extra.items()}
    files[stem.with_name(stem.name + ".obj")] = text.encode()
    return files


def _encode_glb(mesh: trimesh.Trimesh) -> bytes:
    if isinstance(mesh.visual, trimesh.visual.ColorVisuals):
        mesh = mesh.copy()
        colours = mesh.visual.vertex_colors.copy()
        colours[:, :3] = np.round(_srgb_to_linear(colours[:, :3] / 255.0) * 255)
        mesh.visual.vertex_colors = colours
    return trimesh.exchange.gltf.export_glb(mesh, include_normals=True, tree_postprocessor=_matte_materials)


def _matte_materials(tree: dict) -> None:
    """Give every primitive without a material a white PBR one with metallic 0, roughness 1 (glTF's default
    material is fully metallic, which turns vertex colours dark)."""
    materials = tree.setdefault("materials", [])
    for gltf_mesh in tree.get("meshes", []):
        for primitive in gltf_mesh["primitives"]:
            if "material" not in primitive:
                primitive["material"] = len(materials)
                pbr = {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0, "roughnessFactor": 1.0}
                materials.append({"pbrMetallicRoughness": pbr})


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
