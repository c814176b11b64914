"""Stage 6 of the embedded model: the VAE encoder fitted again to its frozen decoder, on images outside the world's
palette.

Why: score distillation differentiates the encoder at renders the world never shows (a grey blob, speckle, any
colour). Trained on world renders only, the encoder mapped a magenta render to latents that the decoder shows as
light blue, and a grey blob to pink: SDS then drove "a blue mug" magenta while its latents read blue. Here the
encoder learns to find, for any image, the latents the decoder turns back into it; on world renders it is held to
its old latents (the UNet was trained on them), so text-to-image sampling and stage 1 are unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dd3d.tiny import world

BACKGROUND = 0.95  # the world's plain background


def free_colour_renders(count: int, seed: int, resolution: int, lit: bool) -> torch.Tensor:
    """World scenes with body colours drawn uniformly from the RGB cube, (count, 3, R, R) in [0, 1]."""
    scenes = world.sample_scenes(count, seed)
    colours = torch.rand(count, 3, generator=torch.Generator().manual_seed(seed))
    return world.render(dataclasses.replace(scenes, rgb=colours), resolution, lit=lit)[0]


def soft_blobs(count: int, generator: torch.Generator, size: int) -> torch.Tensor:
    """Two soft ellipses of random colour, size and edge on the background, with speckle: what an early NeRF shows."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = torch.full((count, 3, size, size), BACKGROUND)
    for _ in range(2):
        centre = torch.rand(count, 2, 1, 1, generator=generator) - 0.5
        radius = 0.15 + 0.6 * torch.rand(count, 2, 1, 1, generator=generator)
        distance = ((xs - centre[:, 0]) / radius[:, 0]) ** 2 + ((ys - centre[:, 1]) / radius[:, 1]) ** 2
        edge = 0.02 + 0.3 * torch.rand(count, 1, 1, generator=generator)
        alpha = torch.sigmoid((1 - distance) / edge) * torch.rand(count, 1, 1, generator=generator).clamp(min=0.3)
        colour = torch.rand(count, 3, 1, 1, generator=generator)
        images = images * (1 - alpha[:, None]) + colour * alpha[:, None]
    speckle = 0.15 * torch.rand(count, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return (images + speckle).clamp(0, 1)


def flat_fields(count: int, generator: torch.Generator, size: int) -> torch.Tensor:
    return torch.rand(count, 3, 1, 1, generator=generator).expand(count, 3, size, size).clone()


def image_set(count: int, seed: int, resolution: int) -> dict[str, torch.Tensor]:
    """World renders (the anchors), free-colour renders lit and unlit, soft blobs and flat fields, in [0, 1].
    Training draws the renders from such a set (rendered once) and makes fresh blobs and fields every step."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "world": world.render(world.sample_scenes(count, seed), resolution)[0],
        "lit": free_colour_renders(count, seed + 1, resolution, lit=True),
        "unlit": free_colour_renders(count, seed + 2, resolution, lit=False),
        "blobs": soft_blobs(count, generator, resolution),
        "flat": flat_fields(count, generator, resolution),
    }


def off_palette_batch(images: dict, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Free-colour renders (lit and unlit), soft blobs and flat fields, in [0, 1]."""
    def pick(family):
        return images[family][torch.randint(len(images[family]), (batch,), generator=generator)]

    size = images["lit"].shape[-1]
    return torch.cat([pick("lit"), pick("unlit"), soft_blobs(batch, generator, size),
                      flat_fields(max(1, batch // 2), generator, size)])


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's own loss (stage 3): L1 + MSE + 3 MSE of 4x4-pixel averages (colours come right)."""
    pooled = F.mse_loss(F.avg_pool2d(decoded, 4), F.avg_pool2d(pixels, 4))
    return F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels) + 3.0 * pooled


def encoder_step(vae, frozen_encoder, images: dict, batch: int, anchor_weight: float,
                 generator: torch.Generator) -> torch.Tensor:
    """One step's loss: reconstruction through the frozen decoder off the palette, plus the distance of world
    renders' latents to the frozen encoder's (in units of the latents' variance)."""
    off = off_palette_batch(images, batch, generator) * 2 - 1
    decoded = vae.decode(vae.encode(off).latent_dist.mean).sample
    anchors = images["world"][torch.randint(len(images["world"]), (batch,), generator=generator)] * 2 - 1
    with torch.no_grad():
        target = frozen_encoder(anchors)
    anchor = F.mse_loss(vae.encode(anchors).latent_dist.mean, target) / target.var()
    return reconstruction_loss(decoded, off) + anchor_weight * anchor


def encoder_parameters(vae) -> list[torch.nn.Parameter]:
    """The encoder's weights (with quant_conv); the decoder is frozen."""
    vae.requires_grad_(False)
    params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for param in params:
        param.requires_grad_(True)
    return params


@torch.no_grad()
def reconstruction_error(vae, pixels: torch.Tensor) -> float:
    """Mean squared error in [0, 1] units of decode(encode(x)) for images (B, 3, H, W) in [0, 1]."""
    decoded = vae.decode(vae.encode(pixels * 2 - 1).latent_dist.mean).sample.clamp(-1, 1)
    return float(((decoded + 1) / 2 - pixels).pow(2).mean())
