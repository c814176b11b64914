"""Measuring a text-to-image model of the procedural world with the oracle: the quality bars of the embedded
default model (shares of generated images whose kind, colour and view the oracle reads as prompted)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from dd3d.tiny import oracle as oracle_lib
from dd3d.tiny.recipe import keyed_generator
from dd3d.tiny.world import COLOUR_NAMES, KINDS, VIEWS, caption


def quality_prompts(images_per_prompt: int, with_view: bool, cycle_views: bool = False) -> list[tuple[str, dict]]:
    """(prompt, expected labels) for "a <colour> <kind>" over all kinds and colours (images_per_prompt each), or
    "a <colour> <kind>, <view> view" over all kinds, colours and views (images_per_prompt // 4 each, at least one);
    with cycle_views, one view per kind and colour, taking the views in turn."""
    prompts = []
    for number, (kind, colour) in enumerate((k, c) for k in KINDS for c in COLOUR_NAMES):
        if not with_view:
            prompts += [(caption(kind, colour), {"kind": kind, "colour": colour})] * images_per_prompt
            continue
        views = [VIEWS[number % len(VIEWS)]] if cycle_views else VIEWS
        for view in views:
            labels = {"kind": kind, "colour": colour, "view": view}
            prompts += [(caption(kind, colour, view), labels)] * max(1, images_per_prompt // len(VIEWS))
    return prompts


@torch.no_grad()
def generate_images(pipeline: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float, seed: int,
                    batch_size: int = 64):
    """PIL images for prompts with a DDIM sampler; image i uses its own generator seeded by (seed, i)."""
    pipeline = StableDiffusionPipeline(
        **{**pipeline.components, "scheduler": DDIMScheduler.from_config(pipeline.scheduler.config)}
    )
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [keyed_generator(seed, 6, start + i) for i in range(len(chunk))]
        images += pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def measure_quality(pipeline: StableDiffusionPipeline, oracle: oracle_lib.Oracle, images_per_prompt: int,
                    steps: int, guidance: float, seed: int, cycle_views: bool = False) -> dict:
    """The quality bars: shares of generated images the oracle reads as the prompted kind / colour (prompts
    "a <colour> <kind>") and view (prompts "a <colour> <kind>, <view> view"), with per-kind and per-view details."""
    results = {"steps": steps, "guidance": guidance, "sampler": "ddim"}
    for name, with_view in (("plain", False), ("view", True)):
        pairs = quality_prompts(images_per_prompt, with_view, cycle_views)
        images = generate_images(pipeline, [p for p, _ in pairs], steps, guidance, seed + (1 if with_view else 0))
        predicted = oracle.classify(images)
        heads = ["kind", "colour", "view"] if with_view else ["kind", "colour"]
        hits = {h: [predicted[h][i] == labels[h] for i, (_, labels) in enumerate(pairs)] for h in heads}
        entry = {"images": len(pairs)}
        entry.update({f"{h}_accuracy": float(np.mean(hits[h])) for h in heads})
        entry["per_kind"] = {
            kind: {h: float(np.mean([x for x, (_, lab) in zip(hits[h], pairs) if lab["kind"] == kind])) for h in heads}
            for kind in KINDS
        }
        if with_view:
            entry["per_view"] = {
                view: float(np.mean([x for x, (_, lab) in zip(hits["view"], pairs) if lab["view"] == view]))
                for view in VIEWS
            }
        results[name] = entry
    return results
