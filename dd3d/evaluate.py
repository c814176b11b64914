"""Quality in numbers: 2D fidelity of samples to their references, and 3D assets against the known world.

2D on the embedded world: the oracle reads every image (kind, colour, view; size is read from the image, below);
per attribute the histograms of references and samples and their total-variation distance; precision, recall,
density and coverage (Naeem et al. 2020) and a Fréchet distance on the oracle's penultimate features; the oracle's
mean confidence, next to that of images the model makes from the exact captions of the same attribute mix (the
ceiling). 2D on any model (the paper's table): similarity (CLIP-I, DINO), FID, density and coverage on the features
of image encoders loaded through transformers.

3D on the embedded world: the asset's occupancy against the world's signed distance field (IoU at the best scale,
canonical and best quarter turn, haze, fill, IoU with every other kind, the best ball), the oracle on albedo and
world-lit frames from 8 azimuths in the middle of the view sectors (next to its reading of the world's own renders
of the true object from the same cameras: the ceiling of those counts), and the exported mesh.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dd3d.cli import UserError
from dd3d.tiny.world import (
    AMBIENT,
    BACKGROUND,
    COLOUR_NAMES,
    FILL,
    KEY,
    KEY_LIGHT,
    KINDS,
    OTHER,
    SIZE_RANGE,
    VIEWS,
    object_sdf,
    size_word,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SIZES = ("small", "medium", "large")
# The oracle may read an image as none of the kinds (OTHER: a featureless blob); such samples count against the kind.
ATTRIBUTES = {"kind": (*KINDS, OTHER), "colour": COLOUR_NAMES, "view": VIEWS, "size": SIZES}
GRID_RESOLUTION = 64  # voxels per axis for the 3D geometry
HAZE_MARGIN = 0.1  # occupied voxels farther than this (world units, 5% of the box) from the true surface are haze
FRAMES = 8  # turntable frames read by the oracle
FIT_SCALES = tuple(float(s) for s in np.linspace(*SIZE_RANGE, 11))  # the world's size range in steps of 0.05


# --- images and their labels ---------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, by name; a sample2d run's grid.png is not a sample."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")
    if not files:
        raise UserError(f"{folder} holds no images (.png, .jpg, .webp, .bmp)")
    return files


def load_images(folder: Path) -> list[Image.Image]:
    images = []
    for path in image_files(folder):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {path}: {err}") from None
    return images


def readme_labels(folder: Path) -> dict[str, list[str]] | None:
    """The world labels (kind, colour, view, scale) of a rendered reference set, from the table in its README
    (written by `scripts/train_tiny_backbone.py --reference-sets`), in image order; None when there is none."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    rows = {}
    for line in readme.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[1] in KINDS and cells[2] in COLOUR_NAMES and cells[4] in VIEWS:
            rows[cells[0]] = {"kind": cells[1], "colour": cells[2], "scale": cells[3], "view": cells[4]}
    files = [path.name for path in image_files(folder)]
    if not rows or any(name not in rows for name in files):
        return None
    return {key: [rows[name][key] for name in files] for key in ("kind", "colour", "view", "scale")}


# --- attributes and their distances --------------------------------------------------------------------------------


def foreground_share(images: list[Image.Image], resolution: int = 32) -> np.ndarray:
    """Share of each image's pixels that differ visibly from the world's plain background."""
    background = np.array(BACKGROUND, dtype=np.float32)
    shares = []
    for image in images:
        pixels = np.asarray(image.resize((resolution, resolution), Image.BILINEAR), dtype=np.float32) / 255.0
        shares.append(float((np.abs(pixels - background).max(-1) > 0.08).mean()))
    return np.array(shares)


_SIZE_EDGES: tuple[float, float] | None = None


def size_edges() -> tuple[float, float]:
    """The terciles of the foreground share over 192 world renders (seed 0, every kind, colour and camera)."""
    global _SIZE_EDGES
    if _SIZE_EDGES is None:
        from dd3d.tiny.oracle import pil_images
        from dd3d.tiny.world import render, sample_scenes, to_uint8

        shares = foreground_share(pil_images(to_uint8(render(sample_scenes(192, 0), 32)[0])))
        _SIZE_EDGES = tuple(float(q) for q in np.quantile(shares, [1 / 3, 2 / 3]))
    return _SIZE_EDGES


def apparent_sizes(images: list[Image.Image]) -> list[str]:
    """small / medium / large: the object's share of the frame against the world's terciles. Sizes are read from
    the image for references and samples alike: the world's cameras vary distance and field of view, so an absolute
    scale cannot be told from one picture, but sets of small or large objects shift this share."""
    low, high = size_edges()
    return ["small" if s < low else "large" if s > high else "medium" for s in foreground_share(images)]


def histogram(labels: list[str], names) -> dict[str, float]:
    counts = Counter(labels)
    return {name: counts[name] / max(1, len(labels)) for name in names}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Half the L1 distance between two histograms over the same names: 0 identical, 1 disjoint."""
    return 0.5 * sum(abs(p.get(name, 0.0) - q.get(name, 0.0)) for name in set(p) | set(q))


def entropy(p: dict[str, float]) -> float:
    return -sum(v * math.log(v) for v in p.values() if v > 0)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of fake features against real ones, with
    k-nearest-neighbour balls (k is capped below each set's size)."""
    real, fake = real.double(), fake.double()
    k_real, k_fake = min(k, len(real) - 1), min(k, len(fake) - 1)
    if k_real < 1 or k_fake < 1:
        raise UserError("precision/recall/density/coverage need at least 2 references and 2 samples")
    real_radius = torch.cdist(real, real).kthvalue(k_real + 1, dim=1).values  # +1: each point is its own nearest
    fake_radius = torch.cdist(fake, fake).kthvalue(k_fake + 1, dim=1).values
    cross = torch.cdist(real, fake)  # (R, F)
    inside = cross <= real_radius[:, None]
    return {
        "precision": float(inside.any(dim=0).double().mean()),
        "recall": float((cross <= fake_radius[None, :]).any(dim=1).double().mean()),
        "density": float(inside.double().sum() / (k_real * len(fake))),
        "coverage": float((cross.min(dim=1).values <= real_radius).double().mean()),
    }


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# --- the oracle's reading ------------------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the oracle sees in a set of images: labels per attribute, confidence (N,) and features (N, 256)."""

    labels: dict[str, list[str]]
    confidence: np.ndarray
    features: torch.Tensor


@torch.no_grad()
def read_images(oracle, images: list[Image.Image]) -> Reading:
    """The oracle's kind, colour and view of each image (and its apparent size); the confidence of an image is the
    mean over the three heads of the probability of the label read."""
    from dd3d.tiny.oracle import as_pixels, oracle_device

    oracle.eval()
    features = oracle.features(as_pixels(images).to(oracle_device(oracle)))
    logits = oracle.logits(features)
    labels = {name: [oracle.labels[name][i] for i in out.argmax(-1).tolist()] for name, out in logits.items()}
    top = torch.stack([out.softmax(-1).amax(-1) for out in logits.values()]).mean(0)
    labels["size"] = apparent_sizes(images)
    return Reading(labels, top.cpu().numpy(), features.cpu())


def compare_sets(references: dict[str, list[str]], reading: Reading) -> dict:
    """Histograms per attribute of two label sets, their total variation and entropies."""
    out = {"histograms": {}, "tv": {}, "entropy": {}}
    for name, values in ATTRIBUTES.items():
        ref, sample = histogram(references[name], values), histogram(reading.labels[name], values)
        out["histograms"][name] = {"references": ref, "samples": sample}
        out["tv"][name] = total_variation(ref, sample)
        out["entropy"][name] = {"references": entropy(ref), "samples": entropy(sample)}
    return out


def reference_reading(oracle, folder: Path, images: list[Image.Image]) -> tuple[dict[str, list[str]], Reading, str]:
    """The references' labels (the README's world labels for kind, colour and view when present, the oracle's
    otherwise; size always read from the image), the oracle's reading and which source the labels came from."""
    reading = read_images(oracle, images)
    labels = readme_labels(folder)
    if labels is None:
        return reading.labels, reading, "oracle"
    return {**labels, "size": reading.labels["size"]}, reading, "README"


def exact_captions(labels: dict[str, list[str]], count: int) -> list[str]:
    """The ceiling's prompts: the references' exact captions "a [small|large] <colour> <kind>, <view> view", in
    turn, so the attribute mix is the references'; the size word only where world scales are known."""
    from dd3d.tiny.world import caption

    n = len(labels["kind"])
    sizes = [size_word(float(s)) for s in labels["scale"]] if "scale" in labels else [""] * n
    return [caption(labels["kind"][i % n], labels["colour"][i % n], labels["view"][i % n], sizes[i % n],
                    "a {s} {c} {k}, {v} view") for i in range(count)]


def text_images(backbone, texts: list[str], seed: int = 0, steps: int = 20, batch_size: int = 16) -> list[Image.Image]:
    """One image per prompt text (DDIM; classifier-free guidance against the empty prompt, with the 2D path's
    default scale and interval, so that a ceiling is sampled the way samples are), seeded per image."""
    from omegaconf import OmegaConf

    from dd3d.backbone import generate, make_pipeline
    from dd3d.cli import CONFIG_DIR

    defaults = OmegaConf.load(CONFIG_DIR / "sample2d.yaml")
    generators = [torch.Generator().manual_seed(seed * 100003 + index) for index in range(len(texts))]
    pipeline, empty = make_pipeline(backbone), backbone.encode_text([""])
    images = []
    for start in range(0, len(texts), batch_size):
        embeddings = backbone.encode_text(texts[start : start + batch_size])
        images += generate(pipeline, embeddings, empty, steps, defaults.guidance,
                           generators[start : start + batch_size], backbone.resolution,
                           tuple(defaults.guidance_interval))
    return images


def evaluate_2d(oracle, refs: Path, samples: list[Image.Image], ceiling: list[Image.Image] | None = None,
                k: int = 5) -> dict:
    """Every oracle-based 2D number for `samples` against the reference folder (and the ceiling images, if any)."""
    ref_images = load_images(refs)
    ref_labels, ref_reading, source = reference_reading(oracle, refs, ref_images)
    reading = read_images(oracle, samples)
    result = {
        "references": {"folder": str(refs), "count": len(ref_images), "labels": source},
        "samples": {"count": len(samples), "labels": reading.labels},
        **compare_sets(ref_labels, reading),
        "oracle_features": {**prdc(ref_reading.features, reading.features, k),
                            "frechet": frechet_distance(ref_reading.features, reading.features), "k": k},
        "confidence": float(reading.confidence.mean()),
    }
    if ceiling:
        top = read_images(oracle, ceiling)
        result["ceiling"] = {
            "count": len(ceiling),
            "confidence": float(top.confidence.mean()),
            "tv": compare_sets(ref_labels, top)["tv"],
            "oracle_features": prdc(ref_reading.features, top.features, k),
        }
        result["confidence_ratio"] = result["confidence"] / max(1e-9, result["ceiling"]["confidence"])
    return result


# --- image encoders: the paper's metrics on any model --------------------------------------------------------------


class ImageEncoder:
    """An image encoder from a hub id or local folder through transformers (CLIP, DINO/DINOv2 or any vision model
    with a pooled output) and its image processor."""

    def __init__(self, source: str):
        from transformers import AutoImageProcessor, AutoModel

        self.source = source
        try:
            self.processor = AutoImageProcessor.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).eval()
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot load image encoder '{source}' ({str(err).splitlines()[0]}); pass a hub id that is in your "
                "Hugging Face cache or a local folder holding the model and its preprocessor_config.json"
            ) from None
        model_type = self.model.config.model_type
        self.name = "CLIP-I" if "clip" in model_type else "DINO" if "dino" in model_type else model_type

    @torch.no_grad()
    def embed(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
            else:
                out = self.model(pixel_values=pixels)
            chunks.append(_pooled(out).float())
        return torch.cat(chunks)


def _pooled(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out.last_hidden_state[:, 0]


def encoder_metrics(encoder: ImageEncoder, refs: list[Image.Image], samples: list[Image.Image], k: int = 5) -> dict:
    """The paper's numbers on one encoder: mean cosine of each sample to each reference, FID on the features,
    density and coverage."""
    real, fake = encoder.embed(refs), encoder.embed(samples)
    similarity = F.normalize(fake, dim=-1) @ F.normalize(real, dim=-1).T
    quality = prdc(real, fake, k)
    return {"encoder": encoder.source, "name": encoder.name, "similarity": float(similarity.mean()),
            "fid": frechet_distance(real, fake), "density": quality["density"], "coverage": quality["coverage"]}


# --- 3D: geometry against the world's object -----------------------------------------------------------------------


def lattice(radius: float, resolution: int = GRID_RESOLUTION) -> torch.Tensor:
    """The voxel centres' coordinates (R, R, R, 3) spanning [-radius, radius]^3, corners included, index (x, y, z)."""
    axis = torch.linspace(-radius, radius, resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def field_occupancy(density_fn, radius: float, resolution: int = GRID_RESOLUTION) -> torch.Tensor:
    """Occupied voxels of a density field: those hidden from outside -- rays coming in along each axis direction
    have turned at least half opaque before reaching them (`dd3d.export.hidden_opacity`), the same rule the mesh
    export puts its surface at. It measures what a viewer sees and what the exported mesh encloses, whatever the
    field's density scale and however the density is spread inside (a density iso-level reads a field whose density
    peaks at its surface as a hollow shell); an almost transparent field is empty."""
    from dd3d.export import SURFACE_OPACITY, density_grid, hidden_opacity

    lo, hi = torch.full((3,), -radius), torch.full((3,), radius)
    grid = density_grid(density_fn, lo, hi, resolution, torch.device("cpu"), progress=False)
    hidden = hidden_opacity(grid, [2 * radius / (resolution - 1)] * 3)
    return hidden[1:-1, 1:-1, 1:-1] >= SURFACE_OPACITY


def object_distance(kind: str, scale: float, radius: float, resolution: int) -> torch.Tensor:
    """The world's signed distance of `kind` at `scale` on the lattice (R, R, R) of `lattice(radius, resolution)`:
    scale * d1(p / scale), with the scale-1 distance d1 interpolated from one grid per kind."""
    if kind not in KINDS:
        raise UserError(f"the world has no kind '{kind}'; kinds: {', '.join(KINDS)}")
    extent = radius / SIZE_RANGE[0]  # p / scale stays inside [-extent, extent] for every scale in the range
    unit = _unit_distance(kind, extent, resolution + resolution // 3)
    where = lattice(radius, resolution) / (scale * extent)  # in [-1, 1], (x, y, z)
    sampled = F.grid_sample(unit[None, None], where.flip(-1)[None], align_corners=True, padding_mode="border")
    return scale * sampled[0, 0]


@functools.lru_cache(maxsize=16)  # one grid per kind (and box) serves every scale of every asset evaluated
def _unit_distance(kind: str, extent: float, resolution: int) -> torch.Tensor:
    points = lattice(extent, resolution)
    distance, _ = object_sdf(kind, points.reshape(-1, 3))
    return distance.reshape(points.shape[:-1])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum()) / float(union) if union else 0.0


def quarter_turn(occupied: torch.Tensor, turns: int) -> torch.Tensor:
    """The occupancy turned by turns * 90 degrees about the world's up axis (Z), counter-clockwise seen from above."""
    return torch.rot90(occupied, turns, dims=(0, 1))


def best_fit(occupied: torch.Tensor, kind: str, radius: float, turns=(0,), scales=FIT_SCALES) -> dict:
    """The scale in the world's size range (and quarter turn among `turns`) at which the occupancy best matches the
    true object: IoU, scale, turn in degrees, and the haze (occupied share farther than HAZE_MARGIN outside it)."""
    best = {"iou": -1.0}
    for scale in scales:
        distance, solid = true_object(kind, scale, radius, len(occupied))
        for turn in turns:
            turned = quarter_turn(occupied, turn)
            value = iou(turned, solid)
            if value > best["iou"]:
                haze = float((distance[turned] > HAZE_MARGIN).double().mean()) if turned.any() else 0.0
                best = {"iou": value, "scale": float(scale), "turn": 90 * turn, "haze": haze}
    return best


@functools.lru_cache(maxsize=96)  # canonical, turned and nearest-kind fits ask for the same 7 kinds x 11 scales
def true_object(kind: str, scale: float, radius: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's object at `scale` as the occupancy rule reads it: signed distances (hidden cavities at 0) and
    the solid (`seen_solid`). Read-only tensors, shared between calls."""
    distance = object_distance(kind, scale, radius, resolution)
    solid = seen_solid(distance, 2 * radius / (resolution - 1))
    return torch.where(solid, distance.clamp(max=0.0), distance), solid  # hidden cavities count as inside


def seen_solid(distance: torch.Tensor, voxel: float) -> torch.Tensor:
    """The true object (signed distances on the lattice, voxel apart) as the occupancy rule reads a field: opaque
    inside and up to half a voxel outside (so features thinner than a voxel, such as a mug's coffee, still block
    the view), then everything hidden from outside along every axis direction is inside -- a cavity closed off from
    view is filled -- so the true object and the asset are compared by what a viewer can see."""
    from dd3d.export import SURFACE_OPACITY, hidden_opacity

    dense = (1.0 - distance / (0.5 * voxel)).clamp(0.0, 1.0) * 1000.0
    hidden = hidden_opacity(F.pad(dense, (1,) * 6), [1.0] * 3)[1:-1, 1:-1, 1:-1]
    return hidden >= SURFACE_OPACITY


def best_ball(occupied: torch.Tensor, points: torch.Tensor) -> dict:
    """The ball about the origin of the radius that best matches the occupancy: the floor any blob reaches."""
    radius = points.norm(dim=-1)
    best = max((iou(occupied, radius <= r), float(r)) for r in np.linspace(0.05, 1.0, 39))
    return {"iou": best[0], "radius": best[1]}


def evaluate_geometry(density_fn, kind: str, radius: float = 1.0, resolution: int = GRID_RESOLUTION) -> dict:
    """Every geometry number of a density field against the world's `kind`."""
    return occupancy_geometry(field_occupancy(density_fn, radius, resolution), kind, radius)


def occupancy_geometry(occupied: torch.Tensor, kind: str, radius: float) -> dict:
    """Every geometry number of occupied voxels (`field_occupancy`) against the world's `kind`."""
    canonical = best_fit(occupied, kind, radius)
    turned = best_fit(occupied, kind, radius, turns=range(4))
    others = {other: best_fit(occupied, other, radius, turns=range(4))["iou"] for other in KINDS}
    ball = best_ball(occupied, lattice(radius, len(occupied)))
    return {
        "iou": canonical["iou"], "scale": canonical["scale"], "haze": canonical["haze"],
        "iou_best_turn": turned["iou"], "best_turn": turned["turn"],
        "fill": float(occupied.double().mean()),
        "iou_by_kind": others, "nearest_kind": max(others, key=others.get),
        "ball_iou": ball["iou"], "ball_radius": ball["radius"], "iou_over_ball": canonical["iou"] - ball["iou"],
    }


# --- 3D: appearance and mesh ---------------------------------------------------------------------------------------


def frame_cameras(cfg, count: int = FRAMES):
    """`count` cameras on the video orbit, each in the middle of a view sector (azimuths 180/count, 3 x 180/count,
    ...): a frame on a sector's edge (azimuth 45 between front and side) has no right view label."""
    from dd3d.nerf import orbit_cameras

    video = cfg.video
    return orbit_cameras(count, video.elevation, video.distance, video.fovy, start_azimuth=180.0 / count,
                         thresholds=dict(cfg.camera.view_thresholds))


@torch.no_grad()
def asset_frames(scene, cfg, count: int = FRAMES, size: int = 64) -> tuple[dict[str, list[Image.Image]], list[str]]:
    """Albedo and shaded frames of a gen3d scene (`frame_cameras`) and the view label of each camera. Shaded frames
    are lit the way the world lights the renders the oracle learned from: a distant key light in front of the object
    and above it (its direction fixed in the world, so back views see the shaded side), ambient plus fill around it."""
    from dd3d.gen3d import DISTANT_LIGHT, render_views

    cameras = frame_cameras(cfg, count).to(next(scene.parameters()).device)
    key = F.normalize(torch.tensor(KEY_LIGHT), dim=0) * DISTANT_LIGHT
    renderer = scene.renderer
    lighting = renderer.ambient, renderer.diffuse
    renderer.ambient, renderer.diffuse = AMBIENT + FILL / 2, KEY  # the fill light, seen ~60 degrees off on average
    try:
        frames = {
            "albedo": render_views(scene, cameras, size, "albedo"),
            "shaded": render_views(scene, cameras, size, "lambertian", key.to(cameras.positions).expand(count, 3)),
        }
    finally:
        renderer.ambient, renderer.diffuse = lighting
    return {name: [Image.fromarray(f) for f in images] for name, images in frames.items()}, list(cameras.views)


def truth_frames(cfg, kind: str, colour: str, count: int = FRAMES, size: int = 64) -> dict[str, list[Image.Image]]:
    """The world's own renders of the true object (scale 1) from `frame_cameras`: albedo (unlit materials) and
    shaded (the world's lighting) -- what a perfect asset would show the oracle, its ceiling on these frames."""
    from dd3d.tiny.oracle import pil_images
    from dd3d.tiny.world import render, scenes_from_labels, to_uint8

    cameras = frame_cameras(cfg, count)
    scenes = scenes_from_labels([kind] * count, [colour] * count, cameras.elevation_deg, cameras.azimuth_deg,
                                cameras.distance, cameras.fovy_deg)
    return {name: pil_images(to_uint8(render(scenes, size, lit=lit)[0])) for name, lit in (("albedo", False),
                                                                                          ("shaded", True))}


def evaluate_appearance(oracle, frames: dict[str, list[Image.Image]], views: list[str], kind: str,
                        colours: set[str]) -> dict:
    """Per shading: how many frames the oracle reads as the kind, as a reference colour, and as the camera's view."""
    return count_appearance(frame_readings(oracle, frames), views, kind, colours)


def frame_readings(oracle, frames: dict[str, list[Image.Image]]) -> dict[str, dict[str, list[str]]]:
    """The oracle's labels (kind, colour, view, ...) of each shading's frames."""
    return {shading: read_images(oracle, images).labels for shading, images in frames.items()}


def count_appearance(readings: dict[str, dict[str, list[str]]], views: list[str], kind: str,
                     colours: set[str]) -> dict:
    """The oracle's labels per shading -> the counts `evaluate_appearance` reports."""
    return {
        shading: {
            "frames": len(labels["kind"]),
            "kind": sum(k == kind for k in labels["kind"]),
            "colour": sum(c in colours for c in labels["colour"]),
            "view": sum(v == w for v, w in zip(labels["view"], views)),
            "labels": {name: labels[name] for name in ("kind", "colour", "view")},
        }
        for shading, labels in readings.items()
    }


def mesh_metrics(folder: Path) -> dict | None:
    """Faces, connected pieces and closedness of the asset's exported mesh (mesh.glb or mesh.obj), if any."""
    import trimesh

    path = next((folder / name for name in ("mesh.glb", "mesh.obj") if (folder / name).is_file()), None)
    if path is None:
        return None
    mesh = trimesh.load(path, force="mesh")
    pieces = trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(mesh.faces)))
    return {"file": path.name, "faces": int(len(mesh.faces)), "components": len(pieces),
            "watertight": bool(mesh.is_watertight)}


def asset_checkpoints(target: Path) -> list[Path]:
    """The newest checkpoint of each asset under a gen3d run folder (itself, or its sample-N folders)."""
    from dd3d.files import Checkpoints

    target = Path(target)
    if not target.is_dir():
        raise UserError(f"{target} is not a gen3d run folder")
    folders = sorted(target.glob("sample-*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) or [target]
    found = [paths[-1] for folder in folders if (paths := Checkpoints(folder / "checkpoints", 1).paths())]
    if not found:
        raise UserError(f"{target} holds no gen3d checkpoint (checkpoints/step-*.pt); has gen3d run there?")
    return found


def asset_kind(readings: dict[str, dict[str, list[str]]], kinds: set[str], occupied: torch.Tensor,
               radius: float) -> str:
    """Of `kinds`, the one the oracle's readings of an asset's frames name most often; when they name none of
    them, the one whose true shape the occupied voxels fit best (any quarter turn)."""
    read = Counter(k for labels in readings.values() for k in labels["kind"] if k in kinds)
    if read:
        return max(sorted(kinds), key=lambda k: read[k])
    return max(sorted(kinds), key=lambda k: best_fit(occupied, k, radius, turns=range(4))["iou"])


def evaluate_asset(oracle, checkpoint: Path, kinds: set[str], colours: set[str],
                   resolution: int = GRID_RESOLUTION) -> tuple[dict, dict]:
    """All 3D numbers of one asset, and its frames (for the report). Its true kind is the one of `kinds` (the
    references' kinds, or the one asked for) that the oracle reads most often on its frames -- any kind the
    references show is a right one, as any of their colours is -- or, when it reads none of them, the one whose
    true shape it fits best."""
    from dd3d.gen3d import load_scene

    scene, cfg = load_scene(checkpoint)
    folder = checkpoint.parent.parent
    frames, views = asset_frames(scene, cfg)
    readings = frame_readings(oracle, frames)
    with torch.no_grad():
        occupied = field_occupancy(lambda p: scene.field.density(p.to(next(scene.parameters()).device)),
                                   float(cfg.field.radius), resolution)
    kind = asset_kind(readings, kinds, occupied, float(cfg.field.radius))
    geometry = occupancy_geometry(occupied, kind, float(cfg.field.radius))
    appearance = count_appearance(readings, views, kind, colours)
    majority = Counter(appearance["albedo"]["labels"]["colour"]).most_common(1)[0][0]
    truth = evaluate_appearance(oracle, truth_frames(cfg, kind, majority), views, kind, colours)
    return {"folder": str(folder), "step": int(re.sub(r"\D", "", checkpoint.stem)), "kind": kind,
            "geometry": geometry, "appearance": appearance, "truth_appearance": truth, "colour": majority,
            "mesh": mesh_metrics(folder)}, frames


def asset_spread(assets: list[dict], ref_labels: dict[str, list[str]]) -> dict:
    """Several assets: their kinds and colours (the oracle's majority over albedo frames) and best-fit scales
    against the references' kinds, colours and scales (README scales when present)."""
    out = {}
    for name, values, names in (("kinds", [a["kind"] for a in assets], KINDS),
                                ("colours", [a["colour"] for a in assets], COLOUR_NAMES)):
        ours, theirs = histogram(values, names), histogram(ref_labels[name[:-1]], names)
        out[name] = {"assets": ours, "references": theirs, "tv": total_variation(theirs, ours)}
    out["scales"] = [a["geometry"]["scale"] for a in assets]
    if "scale" in ref_labels:
        out["reference_scales"] = [float(s) for s in ref_labels["scale"]]
        out["reference_sizes"] = histogram([size_word(float(s)) or "medium" for s in ref_labels["scale"]], SIZES)
    return out


def save_json(metrics: dict, path: Path) -> None:
    from dd3d.files import atomic_write

    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
