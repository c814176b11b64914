"""The bundled reference sets (examples/refs/): renders of the procedural world drawn from known distributions, so a
distribution learned from one can be checked against it with the oracle."""

from __future__ import annotations

from pathlib import Path

import torch

from dd3d.files import atomic_write
from dd3d.tiny.oracle import pil_images
from dd3d.tiny.world import KINDS, render, sample_scenes

REFS_DIR = Path(__file__).resolve().parents[2] / "examples" / "refs"
REFERENCE_SETS = {
    "warm-houses": dict(
        count=16, seed=100, kinds=["house"], colours=["red", "orange", "yellow"], scale_range=(0.75, 1.25),
        overhead_share=0.0, camera=dict(),
        about="houses in warm colours at random sizes, from any side",
    ),
    "cool-mugs": dict(
        count=16, seed=101, kinds=["mug"], colours=["blue", "cyan", "purple"], scale_range=(0.75, 1.25),
        overhead_share=0.0, camera=dict(azimuth_range=(-90.0, 90.0)),
        about="mugs in cool colours, seen from the front half",
    ),
    "red-things": dict(
        count=14, seed=102, kinds=list(KINDS), colours=["red"], scale_range=(0.75, 1.25), overhead_share=0.0,
        camera=dict(elevation_range=(0.0, 30.0)),
        about="objects of any kind, all red",
    ),
    "small-warm-ducks": dict(
        count=12, seed=103, kinds=["duck"], colours=["yellow", "orange"], scale_range=(0.75, 0.9),
        overhead_share=0.0, camera=dict(),
        about="small ducks in yellow or orange, from any side",
    ),
}


def write_reference_set(folder: Path, name: str, resolution: int = 64, spec: dict | None = None) -> list[dict]:
    """Render the reference set `name` (its `spec`, by default the bundled REFERENCE_SETS[name]) into `folder`:
    numbered PNGs and a README with the world labels of each."""
    spec = spec or REFERENCE_SETS[name]
    scenes = sample_scenes(spec["count"], spec["seed"], kinds=spec["kinds"], colours=spec["colours"],
                           scale_range=spec["scale_range"], overhead_share=spec["overhead_share"],
                           camera=spec["camera"])
    images = pil_images((render(scenes, resolution)[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    rows = []
    for index, image in enumerate(images):
        labels = scenes.labels(index)
        file = f"{index:02d}-{labels['colour']}-{labels['kind']}-{labels['view']}.png"
        image.save(folder / file)
        rows.append({"file": file, **labels})
    camera = {"elevation_range": (-10.0, 45.0), "azimuth_range": (-180.0, 180.0), "distance_range": (1.5, 2.0),
              "fovy_range": (40.0, 70.0), **spec["camera"]}
    table = "\n".join(
        f"| {r['file']} | {r['kind']} | {r['colour']} | {r['scale']:.2f} | {r['view']} | {r['elevation']:.0f} | "
        f"{r['azimuth']:.0f} |" for r in rows
    )
    text = f"""# {name}

{len(rows)} renders ({resolution}x{resolution} px) of the embedded default model's procedural world
(`dd3d/tiny/world.py`): {spec['about']}. A reference set for stage 1 whose distribution is known, so a learned
distribution can be checked against it with the oracle.

Drawn with seed {spec['seed']} from:
- kind: uniform over {', '.join(spec['kinds'])}
- colour: uniform over {', '.join(spec['colours'])} (with the world's small per-scene jitter)
- size: scale uniform in {list(spec['scale_range'])}
- camera: `sample_cameras` with elevation {list(camera['elevation_range'])} deg, azimuth
  {list(camera['azimuth_range'])} deg, distance {list(camera['distance_range'])}, fovy
  {list(camera['fovy_range'])} deg

Re-create with `python scripts/train_tiny_backbone.py --reference-sets`.

| file | kind | colour | scale | view | elevation | azimuth |
|---|---|---|---|---|---|---|
{table}
"""
    atomic_write(folder / "README.md", lambda tmp: tmp.write_text(text))
    return rows
