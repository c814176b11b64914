"""The procedural world: deterministic renders, captions that match what is drawn, stage 2's camera contract."""

import numpy as np
import pytest
import torch

from dd3d.nerf.cameras import view_label
from dd3d.tiny import world
from dd3d.tiny.world import (
    COLOUR_NAMES,
    COLOURS,
    KINDS,
    VIEWS,
    caption,
    random_captions,
    render,
    render_dataset,
    sample_scenes,
    scenes_from_labels,
)


def test_render_is_deterministic_per_seed():
    first = render_dataset(6, seed=3, resolution=16)
    again = render_dataset(6, seed=3, resolution=16)
    other = render_dataset(6, seed=4, resolution=16)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["images"], other["images"])
    assert first["images"].dtype == torch.uint8 and first["images"].shape == (6, 3, 16, 16)


def test_scenes_cover_the_world_and_views_follow_view_label():
    scenes = sample_scenes(800, seed=0)
    assert set(scenes.kind.tolist()) == set(range(len(KINDS)))
    assert set(scenes.colour.tolist()) == set(range(len(COLOUR_NAMES)))
    for e, a, v in zip(scenes.cameras.elevation_deg.tolist(), scenes.cameras.azimuth_deg.tolist(), scenes.views):
        assert v == view_label(e, a)
    counts = {v: scenes.views.count(v) for v in VIEWS}
    assert counts["overhead"] == round(800 * world.OVERHEAD_SHARE)
    assert min(counts.values()) > 50
    low, high = world.SIZE_RANGE
    assert low <= scenes.scale.min() and scenes.scale.max() <= high
    # Stage 2's default ranges for the non-overhead cameras.
    normal = scenes.cameras.elevation_deg <= 45
    assert normal.sum() == 800 - counts["overhead"]
    assert scenes.cameras.distance.min() >= 1.5 and scenes.cameras.distance.max() <= 2.0


@pytest.mark.parametrize("kind", world.SHAPE_NAMES)
def test_objects_fit_in_the_unit_ball(kind):
    """Every kind, and every featureless shape the oracle learns as "other"."""
    directions = torch.nn.functional.normalize(torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    distance, _ = world.object_sdf(kind, directions * 0.99, world.SIZE_RANGE[1])
    assert (distance > 0).all()
    if kind in world.BLOBS:
        return
    # ... and a kind reaches out to its stated bounding radius, centred on the origin.
    axis = torch.linspace(-1, 1, 41)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = grid[world.object_sdf(kind, grid, 1.0)[0] < 0]
    assert 0.9 * world.KIND_RADIUS <= inside.norm(dim=-1).max() <= world.KIND_RADIUS + 0.01
    box_centre = (inside.amin(0) + inside.amax(0)) / 2
    assert box_centre.abs().max() < 0.06


def _nearest_colour(mean_rgb: np.ndarray) -> str:
    """The palette colour whose direction in RGB is closest to the given (shaded) colour."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names])
    palette = palette / np.linalg.norm(palette, axis=1, keepdims=True)
    return names[int(np.argmax(palette @ (mean_rgb / np.linalg.norm(mean_rgb))))]


def test_body_pixels_have_the_captioned_colour():
    kinds = [KINDS[i % len(KINDS)] for i in range(2 * len(COLOUR_NAMES))]
    colours = list(COLOUR_NAMES) * 2
    scenes = scenes_from_labels(kinds, colours, elevation=20.0, azimuth=[0.0, 100.0] * len(COLOUR_NAMES))
    images, coverage, body = render(scenes, resolution=24)
    for index, colour in enumerate(colours):
        mask = body[index] > 0.99
        assert mask.sum() > 20, (kinds[index], "the body is visible")
        mean = images[index][:, mask].mean(dim=1).numpy()
        assert _nearest_colour(mean) == colour, (kinds[index], colour, mean)
        # The background around the object is the plain background colour.
        assert torch.allclose(images[index][:, coverage[index] == 0].mean(1), torch.tensor(world.BACKGROUND))


def test_the_front_faces_plus_x():
    """A ray from +X hits the house's door (dark); from -X the plain back wall (the body colour)."""
    scale = torch.ones(2)
    origins = torch.tensor([[2.0, 0.0, -0.25], [-2.0, 0.0, -0.25]])
    directions = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    hit, t = world._trace("house", origins, directions, scale, 128, torch.zeros(2), torch.full((2,), 4.0))
    assert hit.all()
    _, material = world.object_sdf("house", origins + t[:, None] * directions, scale)
    assert material.tolist() == [world.DARK_ID, world.PRIMARY]


def test_captions():
    assert caption("house", "red", "side") == "a red house, side view"
    assert caption("mug", "blue") == "a blue mug"
    assert caption("car", "green", "front", "", "a {s} {c} {k}, {v} view") == "a green car, front view"
    assert caption("car", "green", "front", "small", "a {s} {c} {k}") == "a small green car"
    scenes = sample_scenes(400, seed=1)
    texts = random_captions(scenes, np.random.default_rng(0))
    assert len(set(texts)) > 100
    for text, k, c, v in zip(texts, scenes.kind, scenes.colour, scenes.views):
        assert KINDS[int(k)] in text or "object" in text
        assert COLOUR_NAMES[int(c)] in text or "a " + KINDS[int(k)] in text
        if "view" in text:
            assert text.endswith(f"{v} view")
    assert any(text.startswith("a photo of") for text in texts)
    assert any(text.startswith(("a small", "a large")) for text in texts)
