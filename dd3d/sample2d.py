"""The 2D path: images from prompt embeddings through the diffusers Stable Diffusion pipeline."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image


def make_pipeline(backbone) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the backbone's own (frozen) components, with a DDIM sampler."""
    pipeline = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    steps: int,
    guidance: float,
    seed: int,
    resolution: int,
) -> list[Image.Image]:
    """One image per row of prompt_embeds (N, 77, d); negative_embeds (1, 77, d) is the unconditional branch."""
    dtype = pipeline.unet.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(
        prompt_embeds=prompt_embeds.to(pipeline.device, dtype),
        negative_prompt_embeds=negative_embeds.expand(len(prompt_embeds), -1, -1).to(pipeline.device, dtype),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        height=resolution,
        width=resolution,
    ).images


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size tiled into a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % cols) * width, (index // cols) * height))
    return grid
