"""The procedural world the embedded default model is trained on: objects with a clear front, in named colours,
rendered by sphere tracing signed distance functions (pure PyTorch, batched) from stage 2's cameras.

Conventions are those of `dd3d.nerf.cameras`: world Z-up, every object's front faces +X, cameras at elevation e,
azimuth a (0 = in front, on +X), distance d looking at the origin, and the same view labels
("front" / "side" / "back" / "overhead"). Every object fits inside the unit ball (checked by the tests), so stage 2's
default scene box [-1, 1]^3 holds it.

Each scene has:
- a kind (KINDS), built from a few primitives: the body in the scene's colour, details (door, roof, wheels, face...)
  in fixed dark or light greys, so the captioned colour is the only chromatic colour in the picture;
- a colour (COLOURS), jittered a little per scene;
- a size: a uniform scale in SIZE_RANGE; captions call the lower third "small" and the upper third "large";
- a camera from `sample_cameras` with stage 2's default ranges, or (a share OVERHEAD_SHARE of the scenes) from the
  same function restricted to elevations above the overhead threshold, so that "overhead view" is seen too.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dd3d.nerf.cameras import CameraBatch, camera_rays, camera_to_world, sample_cameras, view_label, wrap_azimuth

KINDS = ("house", "car", "chair", "mug", "lamp", "snowman", "duck")
COLOURS = {
    "red": (0.86, 0.10, 0.09),
    "orange": (0.98, 0.50, 0.05),
    "yellow": (0.97, 0.86, 0.10),
    "green": (0.16, 0.66, 0.18),
    "cyan": (0.10, 0.78, 0.86),
    "blue": (0.12, 0.24, 0.90),
    "purple": (0.50, 0.16, 0.76),
    "pink": (0.98, 0.50, 0.72),
}
COLOUR_NAMES = tuple(COLOURS)
VIEWS = ("front", "side", "back", "overhead")
SIZE_RANGE = (0.75, 1.25)  # uniform scale; an object's bounding radius is KIND_RADIUS * scale, at most ~0.94
DARK, LIGHT = (0.14, 0.14, 0.16), (0.93, 0.93, 0.90)
BACKGROUND = (0.95, 0.95, 0.95)
KEY_LIGHT = (0.8, 0.3, 0.75)  # direction towards the key light: in front (+X), a little right (+Y), above
AMBIENT, KEY, FILL = 0.4, 0.55, 0.12
OVERHEAD_SHARE = 0.125
OVERHEAD_ELEVATION = (62.0, 90.0)
PRIMARY, DARK_ID, LIGHT_ID, SHADED_ID = 0, 1, 2, 3  # material ids; SHADED = the body colour, darker
SHADED_GAIN = 0.62

# --- signed distance primitives on points (N, 3); all distances are exact or lower bounds ----------------------


def _sub(p, c):
    return p - torch.tensor(c, dtype=p.dtype, device=p.device)


def sd_box(p, c, half, r=0.0):
    q = _sub(p, c).abs() - torch.tensor(half, dtype=p.dtype, device=p.device) + r
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0) - r


def sd_sphere(p, c, r):
    return _sub(p, c).norm(dim=-1) - r


def sd_ellipsoid(p, c, radii):
    radii = torch.tensor(radii, dtype=p.dtype, device=p.device)
    q = _sub(p, c)
    k0 = (q / radii).norm(dim=-1)
    k1 = (q / radii**2).norm(dim=-1).clamp(min=1e-6)
    return k0 * (k0 - 1) / k1 * 0.9  # the usual approximation, shrunk to stay a lower bound near the surface


def _split(q, axis):
    others = [i for i in range(3) if i != axis]
    return q[..., others].norm(dim=-1), q[..., axis]


def sd_cylinder(p, c, r, half_height, axis=2):
    radial, along = _split(_sub(p, c), axis)
    d = torch.stack([radial - r, along.abs() - half_height], dim=-1)
    return d.clamp(min=0).norm(dim=-1) + d.amax(dim=-1).clamp(max=0)


def sd_capsule(p, a, b, r):
    a_t = torch.tensor(a, dtype=p.dtype, device=p.device)
    ba = torch.tensor(b, dtype=p.dtype, device=p.device) - a_t
    pa = p - a_t
    h = ((pa @ ba) / (ba @ ba)).clamp(0, 1)
    return (pa - h[..., None] * ba).norm(dim=-1) - r


def sd_torus(p, c, major, minor, axis):
    radial, along = _split(_sub(p, c), axis)
    return torch.stack([radial - major, along], dim=-1).norm(dim=-1) - minor


def sd_roof(p, z0, height, half_x, half_y):
    """A gable roof: a triangular prism with its ridge along Y at z0 + height, eaves at x = +-half_x, z = z0."""
    x, y, z = p.unbind(-1)
    slope = ((x.abs() - half_x) * height + (z - z0) * half_x) / math.hypot(height, half_x)
    return torch.stack([slope, z0 - z, y.abs() - half_y], dim=-1).amax(dim=-1)


# --- the kinds: each returns [(distance, material id), ...] for points in object space (scale 1) -----------------


def _house(p):
    return [
        (sd_box(p, (0, 0, -0.17), (0.36, 0.44, 0.29)), PRIMARY),
        (sd_roof(p, 0.12, 0.36, 0.46, 0.5), SHADED_ID),
        (sd_box(p, (0.36, 0, -0.3), (0.025, 0.09, 0.16)), DARK_ID),  # door, front only
        (sd_box(p, (0.36, 0.26, -0.08), (0.025, 0.08, 0.07)), LIGHT_ID),
        (sd_box(p, (0.36, -0.26, -0.08), (0.025, 0.08, 0.07)), LIGHT_ID),
        (sd_box(p, (-0.2, 0.22, 0.4), (0.06, 0.06, 0.14)), DARK_ID),  # chimney at the back
    ]


def _car(p):
    return [
        (sd_box(p, (0, 0, -0.2), (0.52, 0.27, 0.12), 0.05), PRIMARY),
        (sd_box(p, (-0.1, 0, 0.0), (0.27, 0.24, 0.11), 0.04), PRIMARY),
        (sd_box(p, (0.165, 0, 0.0), (0.02, 0.2, 0.08)), LIGHT_ID),  # windscreen
        (sd_box(p, (-0.365, 0, 0.0), (0.02, 0.2, 0.08)), DARK_ID),  # rear window
        (sd_box(p, (0.52, 0.17, -0.17), (0.025, 0.06, 0.04)), LIGHT_ID),  # headlights
        (sd_box(p, (0.52, -0.17, -0.17), (0.025, 0.06, 0.04)), LIGHT_ID),
        (sd_cylinder(p, (0.32, 0.27, -0.32), 0.13, 0.05, axis=1), DARK_ID),
        (sd_cylinder(p, (0.32, -0.27, -0.32), 0.13, 0.05, axis=1), DARK_ID),
        (sd_cylinder(p, (-0.32, 0.27, -0.32), 0.13, 0.05, axis=1), DARK_ID),
        (sd_cylinder(p, (-0.32, -0.27, -0.32), 0.13, 0.05, axis=1), DARK_ID),
    ]


def _chair(p):
    legs = torch.stack(
        [sd_box(p, (x, y, -0.3), (0.035, 0.035, 0.2)) for x in (-0.24, 0.24) for y in (-0.24, 0.24)], dim=-1
    ).amin(dim=-1)
    return [
        (sd_box(p, (0, 0, -0.07), (0.3, 0.3, 0.05), 0.01), PRIMARY),  # seat
        (sd_box(p, (-0.26, 0, 0.28), (0.04, 0.3, 0.3), 0.01), PRIMARY),  # backrest at the back (-X)
        (legs, DARK_ID),
        (sd_box(p, (-0.22, 0, 0.32), (0.015, 0.2, 0.06)), DARK_ID),  # a slot across the backrest's front
    ]


def _mug(p):
    outer = sd_cylinder(p, (0, 0, -0.1), 0.31, 0.34)
    inner = sd_cylinder(p, (0, 0, 0.05), 0.26, 0.3)
    return [
        (torch.maximum(outer, -inner), PRIMARY),
        (sd_torus(p, (0, 0.33, -0.1), 0.16, 0.05, axis=0), PRIMARY),  # handle on the right (+Y) seen from the front
        (sd_box(p, (0.3, 0, -0.1), (0.025, 0.13, 0.13)), LIGHT_ID),  # label on the front
        (sd_cylinder(p, (0, 0, 0.12), 0.26, 0.01), DARK_ID),  # coffee
    ]


def _lamp(p):
    centre = torch.tensor((0.2, 0, 0.22), dtype=p.dtype, device=p.device)
    opening = torch.tensor((0.6, 0, -0.8), dtype=p.dtype, device=p.device)  # the shade opens forward and down
    shell = (p - centre).norm(dim=-1).sub(0.22).abs() - 0.025
    shade = torch.maximum(shell, (p - centre) @ opening - 0.02)
    return [
        (sd_cylinder(p, (-0.1, 0, -0.45), 0.3, 0.05), PRIMARY),  # base
        (shade, PRIMARY),
        (sd_capsule(p, (-0.1, 0, -0.4), (-0.15, 0, 0.3), 0.04), DARK_ID),
        (sd_capsule(p, (-0.15, 0, 0.3), (0.15, 0, 0.3), 0.04), DARK_ID),
        (sd_sphere(p, (0.24, 0, 0.17), 0.1), LIGHT_ID),  # bulb
    ]


def _snowman(p):
    return [
        (sd_sphere(p, (0, 0, -0.24), 0.28), PRIMARY),
        (sd_sphere(p, (0, 0, 0.11), 0.21), PRIMARY),
        (sd_sphere(p, (0, 0, 0.4), 0.16), PRIMARY),
        (sd_cylinder(p, (0, 0, 0.6), 0.11, 0.08), DARK_ID),  # hat
        (sd_cylinder(p, (0, 0, 0.53), 0.17, 0.015), DARK_ID),
        (sd_sphere(p, (0.14, 0.06, 0.45), 0.035), DARK_ID),  # eyes
        (sd_sphere(p, (0.14, -0.06, 0.45), 0.035), DARK_ID),
        (sd_capsule(p, (0.14, 0, 0.39), (0.3, 0, 0.37), 0.035), LIGHT_ID),  # nose
        (sd_sphere(p, (0.2, 0, 0.14), 0.04), DARK_ID),  # buttons
        (sd_sphere(p, (0.21, 0, 0.03), 0.04), DARK_ID),
    ]


def _duck(p):
    return [
        (sd_ellipsoid(p, (-0.06, 0, -0.2), (0.42, 0.29, 0.23)), PRIMARY),
        (sd_sphere(p, (0.24, 0, 0.14), 0.18), PRIMARY),
        (sd_ellipsoid(p, (-0.42, 0, -0.06), (0.14, 0.1, 0.1)), PRIMARY),  # tail
        (sd_ellipsoid(p, (0.45, 0, 0.1), (0.14, 0.09, 0.04)), DARK_ID),  # beak
        (sd_sphere(p, (0.36, 0.1, 0.2), 0.035), DARK_ID),
        (sd_sphere(p, (0.36, -0.1, 0.2), 0.035), DARK_ID),
    ]


SHAPES = {"house": _house, "car": _car, "chair": _chair, "mug": _mug, "lamp": _lamp, "snowman": _snowman,
          "duck": _duck}

# Featureless round shapes that are none of the kinds: one body colour, no details, each within radius 0.8 of the
# origin. They are what a failed stage-2 asset looks like, and teach the oracle the kind OTHER (never captioned).
# (Boxes and cylinders were tried too: a mug whose handle is hidden is a cylinder, and the oracle then read a sixth
# of the model's exact-caption mugs as "other".)
OTHER = "other"
BLOBS = {
    "ball": lambda p: [(sd_sphere(p, (0, 0, 0), 0.8), PRIMARY)],
    "egg": lambda p: [(sd_ellipsoid(p, (0, 0, 0), (0.55, 0.55, 0.8)), PRIMARY)],
    "lens": lambda p: [(sd_ellipsoid(p, (0, 0, 0), (0.8, 0.8, 0.45)), PRIMARY)],
    "pod": lambda p: [(sd_ellipsoid(p, (0, 0, 0), (0.8, 0.5, 0.5)), PRIMARY)],
    "lumps": lambda p: [(sd_sphere(p, (0.2, 0, -0.15), 0.5), PRIMARY),
                        (sd_sphere(p, (-0.3, 0.2, 0.25), 0.35), PRIMARY)],
    "cluster": lambda p: [(sd_sphere(p, (0, 0, -0.3), 0.45), PRIMARY), (sd_sphere(p, (0.15, 0.25, 0.2), 0.4), PRIMARY),
                          (sd_sphere(p, (-0.3, -0.2, 0.25), 0.3), PRIMARY)],
}
SHAPES.update(BLOBS)
SHAPE_NAMES = KINDS + tuple(BLOBS)  # what a scene's `kind` index points into


# Each kind's bounding-box centre (in its modelling space) and the factor that makes its bounding radius
# KIND_RADIUS at scale 1, measured on a grid (tests check the result lies in the unit ball at every size).
_MEASURED = {
    "house": ((0.000, 0.000, 0.044), 1.054),
    "car": ((0.012, 0.000, -0.169), 1.331),
    "chair": ((0.000, 0.000, 0.037), 1.165),
    "mug": ((0.013, 0.119, -0.100), 1.435),
    "lamp": ((0.000, 0.000, -0.012), 1.263),
    "snowman": ((0.025, 0.000, 0.081), 1.289),
    "duck": ((0.019, 0.000, -0.056), 1.328),
}  # centre, factor for radius 0.8
_MEASURED.update({blob: ((0.0, 0.0, 0.0), 1.0) for blob in BLOBS})  # built centred, within radius 0.8
KIND_RADIUS = 0.75
KIND_FRAMES = {kind: (centre, factor * KIND_RADIUS / 0.8) for kind, (centre, factor) in _MEASURED.items()}


def object_sdf(kind: str, points: torch.Tensor, scale: torch.Tensor | float = 1.0):
    """Signed distance (N,) and material id (N,) of object `kind` at `scale` for world points (N, 3): the kind's
    model, centred on the origin, with bounding radius KIND_RADIUS * scale."""
    centre, factor = KIND_FRAMES[kind]
    scale = torch.as_tensor(scale, dtype=points.dtype, device=points.device) * factor
    scale_col = scale[..., None] if scale.dim() else scale
    parts = SHAPES[kind](points / scale_col + torch.tensor(centre, dtype=points.dtype, device=points.device))
    distances = torch.stack([d for d, _ in parts], dim=-1)
    best, index = distances.min(dim=-1)
    materials = torch.tensor([m for _, m in parts], device=points.device)[index]
    return best * scale, materials


# --- scenes ------------------------------------------------------------------------------------------------------


@dataclass
class Scenes:
    """A batch of scenes: labels, per-scene colour and scale, and the camera of each."""

    kind: torch.Tensor  # (B,) index into SHAPE_NAMES (KINDS, then BLOBS)
    colour: torch.Tensor  # (B,) index into COLOUR_NAMES
    rgb: torch.Tensor  # (B, 3) the body colour, jittered
    scale: torch.Tensor  # (B,)
    cameras: CameraBatch

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def views(self) -> list[str]:
        return self.cameras.views

    @property
    def view(self) -> torch.Tensor:
        return torch.tensor([VIEWS.index(v) for v in self.views], dtype=torch.long)

    @property
    def size_words(self) -> list[str]:
        return [size_word(float(s)) for s in self.scale]

    def labels(self, index: int) -> dict:
        return {
            "kind": SHAPE_NAMES[int(self.kind[index])],
            "colour": COLOUR_NAMES[int(self.colour[index])],
            "view": self.views[index],
            "size": self.size_words[index],
            "scale": float(self.scale[index]),
            "elevation": float(self.cameras.elevation_deg[index]),
            "azimuth": float(self.cameras.azimuth_deg[index]),
            "distance": float(self.cameras.distance[index]),
            "fovy": float(self.cameras.fovy_deg[index]),
        }


def size_word(scale: float) -> str:
    low, high = SIZE_RANGE
    third = (high - low) / 3
    return "small" if scale < low + third else "large" if scale > high - third else ""


def _concat_cameras(parts: list[CameraBatch], order: torch.Tensor) -> CameraBatch:
    views = [v for part in parts for v in part.views]
    cat = {
        name: torch.cat([getattr(part, name) for part in parts])[order]
        for name in ("c2w", "fovy_deg", "elevation_deg", "azimuth_deg", "distance")
    }
    return CameraBatch(views=[views[i] for i in order.tolist()], **cat)


def sample_scenes(
    n: int,
    seed: int,
    kinds: list[str] | None = None,
    colours: list[str] | None = None,
    scale_range: tuple[float, float] = SIZE_RANGE,
    overhead_share: float = OVERHEAD_SHARE,
    camera: dict | None = None,
) -> Scenes:
    """n random scenes (uniform over the given kinds -- or BLOBS -- and colours, all kinds by default), deterministic
    per seed.

    Cameras come from `sample_cameras` with stage 2's defaults (or `camera`, its keyword arguments); a share
    `overhead_share` of them from the same function with elevation in OVERHEAD_ELEVATION."""
    kinds = list(kinds or KINDS)
    colours = list(colours or COLOUR_NAMES)
    generator = torch.Generator().manual_seed(seed)
    kind = torch.tensor([SHAPE_NAMES.index(k) for k in kinds])[torch.randint(len(kinds), (n,), generator=generator)]
    colour = torch.tensor([COLOUR_NAMES.index(c) for c in colours])[
        torch.randint(len(colours), (n,), generator=generator)
    ]
    base = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colour]
    gain = 0.92 + 0.1 * torch.rand(n, 1, generator=generator)
    rgb = (base * gain + 0.03 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    low, high = scale_range
    scale = low + (high - low) * torch.rand(n, generator=generator)
    overhead = int(round(n * overhead_share))
    kwargs = dict(camera or {})
    parts = [sample_cameras(n - overhead, generator=generator, **kwargs)]
    if overhead:
        parts.append(sample_cameras(overhead, generator=generator, **{**kwargs, "elevation_range": OVERHEAD_ELEVATION}))
    order = torch.randperm(n, generator=generator)
    return Scenes(kind, colour, rgb, scale, _concat_cameras(parts, order))


def scenes_from_labels(
    kind: list[str], colour: list[str], elevation, azimuth, distance=1.75, fovy=55.0, scale=1.0
) -> Scenes:
    """Scenes with the given labels and camera placements (scalars broadcast), without colour jitter."""
    n = len(kind)

    def column(value):
        return torch.as_tensor(value, dtype=torch.float32).expand(n).clone()

    elevation, azimuth, distance, fovy = column(elevation), wrap_azimuth(column(azimuth)), column(distance), column(fovy)
    views = [view_label(e, a) for e, a in zip(elevation.tolist(), azimuth.tolist())]
    cameras = CameraBatch(camera_to_world(elevation, azimuth, distance), fovy, elevation, azimuth, distance, views)
    colour_index = torch.tensor([COLOUR_NAMES.index(c) for c in colour])
    return Scenes(
        torch.tensor([SHAPE_NAMES.index(k) for k in kind]),
        colour_index,
        torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colour_index],
        column(scale),
        cameras,
    )


# --- captions ------------------------------------------------------------------------------------------------------

# (template, weight): {c} colour, {k} kind, {v} view, {s} size word. Templates with {s} fall back to the
# template without it when the scene's size is medium.
CAPTION_TEMPLATES = (
    ("a {c} {k}, {v} view", 10),
    ("a {c} {k}", 4),
    ("a photo of a {c} {k}", 2),
    ("a photo of a {c} {k}, {v} view", 3),
    ("a {s} {c} {k}", 1),
    ("a {s} {c} {k}, {v} view", 2),
    ("a rendering of a {c} {k}", 1),
    ("{c} {k}", 1),
    ("a {k}", 1),
    ("a {k}, {v} view", 1),
    ("a {c} object", 1),
)


def caption(kind: str, colour: str, view: str | None = None, size: str = "", template: str | None = None) -> str:
    """The canonical caption "a red house, side view" (no view part when view is None), or a given template."""
    if template is None:
        template = "a {c} {k}, {v} view" if view else "a {c} {k}"
    if "{s}" in template and not size:
        template = template.replace("{s} ", "")
    return template.format(c=colour, k=kind, v=view, s=size)


def random_captions(scenes: Scenes, rng: np.random.Generator) -> list[str]:
    """One caption per scene, with a template drawn by CAPTION_TEMPLATES' weights."""
    weights = np.array([w for _, w in CAPTION_TEMPLATES], dtype=np.float64)
    picks = rng.choice(len(CAPTION_TEMPLATES), size=len(scenes), p=weights / weights.sum())
    return [
        caption(KINDS[int(k)], COLOUR_NAMES[int(c)], v, s, CAPTION_TEMPLATES[i][0])
        for k, c, v, s, i in zip(scenes.kind, scenes.colour, scenes.views, scenes.size_words, picks)
    ]


def captions_for(kind: torch.Tensor, colour: torch.Tensor, view: torch.Tensor, scale: torch.Tensor,
                 rng: np.random.Generator) -> list[str]:
    """random_captions from stored label tensors (as kept in a rendered data set)."""
    weights = np.array([w for _, w in CAPTION_TEMPLATES], dtype=np.float64)
    picks = rng.choice(len(CAPTION_TEMPLATES), size=len(kind), p=weights / weights.sum())
    return [
        caption(KINDS[int(k)], COLOUR_NAMES[int(c)], VIEWS[int(v)], size_word(float(s)), CAPTION_TEMPLATES[i][0])
        for k, c, v, s, i in zip(kind, colour, view, scale, picks)
    ]


# --- rendering -----------------------------------------------------------------------------------------------------


def _trace(kind: str, origins, directions, scale, steps: int, t_start, t_end):
    """Sphere-trace rays (N, 3) against one kind; returns hit mask (N,) and distance along each ray (N,)."""
    t = t_start.clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    active = torch.nonzero(t_end > t_start).squeeze(1)
    for _ in range(steps):
        if active.numel() == 0:
            break
        ta = t[active]
        d, _ = object_sdf(kind, origins[active] + ta[:, None] * directions[active], scale[active])
        ta = ta + 0.95 * d
        t[active] = ta
        close = d < 1e-3 * ta.clamp(min=1.0)
        hit[active[close]] = True
        keep = ~close & (ta < t_end[active])
        active = active[keep]
    return hit, t


def _normals(kind, points, scale, eps=2e-3):
    offsets = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=points.dtype,
                           device=points.device) * eps
    grad = torch.zeros_like(points)
    for offset in offsets:
        d, _ = object_sdf(kind, points + offset, scale)
        grad += offset[None] * d[:, None]
    return F.normalize(grad, dim=-1)


@torch.no_grad()
def render(scenes: Scenes, resolution: int = 32, supersample: int = 2, steps: int = 64, chunk: int = 64,
           device="cpu", lit: bool = True):
    """Shaded images (B, 3, R, R) in [0, 1] on the plain background, object coverage (B, R, R) in [0, 1] and body
    coverage (B, R, R): the share of each pixel showing the body (the captioned colour). CPU tensors; the work is
    done on `device`. lit=False: the materials' own colours, unlit (what an albedo render of the object shows)."""
    count = len(scenes)
    images = torch.empty(count, 3, resolution, resolution)
    coverage = torch.empty(count, resolution, resolution)
    body = torch.empty(count, resolution, resolution)
    for start in range(0, count, chunk):
        index = torch.arange(start, min(start + chunk, count))
        image, cov, bod = _render_chunk(scenes, index, resolution * supersample, steps, torch.device(device), lit)
        images[index] = F.avg_pool2d(image, supersample).cpu()
        coverage[index] = F.avg_pool2d(cov[:, None], supersample)[:, 0].cpu()
        body[index] = F.avg_pool2d(bod[:, None], supersample)[:, 0].cpu()
    return images, coverage, body


def _render_chunk(scenes: Scenes, index: torch.Tensor, size: int, steps: int, device: torch.device, lit: bool):
    cams = CameraBatch(
        scenes.cameras.c2w[index], scenes.cameras.fovy_deg[index], scenes.cameras.elevation_deg[index],
        scenes.cameras.azimuth_deg[index], scenes.cameras.distance[index], [scenes.views[i] for i in index.tolist()],
    ).to(device)
    origins, directions = camera_rays(cams, size, size)  # (b, H, W, 3)
    b = len(index)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    owner = torch.arange(b, device=device).repeat_interleave(size * size)
    colour = torch.tensor(BACKGROUND, device=device).expand(len(origins), 3).clone()
    covered = torch.zeros(len(origins), device=device)
    is_body = torch.zeros(len(origins), device=device)
    rgb = scenes.rgb[index].to(device)
    # Ray segment inside the object's bounding ball (radius KIND_RADIUS * scale, a little margin).
    scale = scenes.scale[index].to(device)
    radius = (KIND_RADIUS * 1.02 * scale)[owner]
    along = -(origins * directions).sum(-1)
    closest = (origins + along[:, None] * directions).norm(dim=-1)
    half = (radius**2 - torch.minimum(closest, radius) ** 2).sqrt()
    t_start, t_end = (along - half).clamp(min=0), torch.where(closest < radius, along + half, along - half)
    # The key light is fixed in the world, in front of the object and above it: front views are brightly lit, back
    # views see the shaded side -- a cue to the view that survives blur. A weak fill light follows the camera.
    key = F.normalize(torch.tensor(KEY_LIGHT, device=device), dim=0)
    kinds = scenes.kind[index].to(device)
    for kind_index in kinds.unique().tolist():
        rays = torch.nonzero(kinds[owner] == kind_index).squeeze(1)
        kind = SHAPE_NAMES[kind_index]
        ray_scale = scale[owner[rays]]
        hit, t = _trace(kind, origins[rays], directions[rays], ray_scale, steps, t_start[rays], t_end[rays])
        rays, t, ray_scale = rays[hit], t[hit], ray_scale[hit]
        points = origins[rays] + t[:, None] * directions[rays]
        _, material = object_sdf(kind, points, ray_scale)
        normal = _normals(kind, points, ray_scale)
        light = key.expand(len(rays), 3)
        view_dir = -directions[rays]
        diffuse = (normal * light).sum(-1).clamp(min=0)
        fill = (normal * view_dir).sum(-1).clamp(min=0)
        halfway = F.normalize(light + view_dir, dim=-1)
        specular = (normal * halfway).sum(-1).clamp(min=0) ** 24
        palette = torch.stack(
            [rgb[owner[rays]], torch.tensor(DARK, device=device).expand(len(rays), 3),
             torch.tensor(LIGHT, device=device).expand(len(rays), 3), rgb[owner[rays]] * SHADED_GAIN], dim=1,
        )
        albedo = palette[torch.arange(len(rays)), material]
        shade = AMBIENT + KEY * diffuse + FILL * fill
        colour[rays] = (albedo * shade[:, None] + 0.18 * specular[:, None]).clamp(0, 1) if lit else albedo
        covered[rays] = 1.0
        is_body[rays] = ((material == PRIMARY) | (material == SHADED_ID)).float()
    image = colour.view(b, size, size, 3).permute(0, 3, 1, 2)
    return image, covered.view(b, size, size), is_body.view(b, size, size)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 (B, 3, H, W)."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def render_dataset(n: int, seed: int, resolution: int = 32, progress=None, chunk: int = 64, device="cpu",
                   lit: bool = True, **scene_kwargs) -> dict:
    """n rendered scenes as a dict of tensors: images uint8 (n, 3, R, R), kind, colour, view, scale and the camera
    placement of each (elevation, azimuth, distance, fovy). lit=False: the same scenes unlit (see `render`)."""
    scenes = sample_scenes(n, seed, **scene_kwargs)
    images = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        part = _slice(scenes, start, stop)
        images[start:stop] = to_uint8(render(part, resolution, chunk=chunk, device=device, lit=lit)[0])
        if progress is not None:
            progress(stop - start)
    return {
        "images": images,
        "kind": scenes.kind,
        "colour": scenes.colour,
        "view": scenes.view,
        "scale": scenes.scale,
        "elevation": scenes.cameras.elevation_deg,
        "azimuth": scenes.cameras.azimuth_deg,
        "distance": scenes.cameras.distance,
        "fovy": scenes.cameras.fovy_deg,
    }


def _slice(scenes: Scenes, start: int, stop: int) -> Scenes:
    cams = scenes.cameras
    return Scenes(
        scenes.kind[start:stop], scenes.colour[start:stop], scenes.rgb[start:stop], scenes.scale[start:stop],
        CameraBatch(cams.c2w[start:stop], cams.fovy_deg[start:stop], cams.elevation_deg[start:stop],
                    cams.azimuth_deg[start:stop], cams.distance[start:stop], cams.views[start:stop]),
    )


__all__ = [
    "BACKGROUND", "BLOBS", "CAPTION_TEMPLATES", "COLOURS", "COLOUR_NAMES", "KINDS", "OTHER", "SHAPE_NAMES",
    "SIZE_RANGE", "VIEWS", "Scenes",
    "caption", "captions_for", "object_sdf", "random_captions", "render", "render_dataset", "sample_scenes",
    "scenes_from_labels", "size_word", "to_uint8", "view_label",
]
