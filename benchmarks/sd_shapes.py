"""Stable-Diffusion-2.1-base-shaped components with random weights (public configs), for GPU benchmarks.

size="toy": the same classes and block layout (4 UNet levels, cross-attention with linear projections, a 4-level
VAE, a CLIP text encoder) with small widths, so the benchmarks' code paths run in seconds on a CPU.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dd3d.backbone import Backbone
from dd3d.tiny.build import clip_tokenizer

SIZES = {
    # text width, layers, heads; UNet channels, heads per level, layers per block, latent size; VAE channels, layers
    "full": dict(
        text=(1024, 23, 16), unet=((320, 640, 1280, 1280), (5, 10, 20, 20), 2, 64), vae=((128, 256, 512, 512), 2)
    ),
    "toy": dict(text=(32, 2, 2), unet=((32, 32, 64, 64), (1, 1, 2, 2), 1, 8), vae=((32, 32, 32, 32), 1)),
}


def sd21_base_backbone(device, dtype, size: str = "full") -> Backbone:
    """OpenCLIP-H text encoder (23 layers, width 1024), the 865M-parameter UNet, the SD VAE; epsilon, 512 px
    (size="full"), or the same layout with small widths, 64 px (size="toy")."""
    shape = SIZES[size]
    width, layers, heads = shape["text"]
    channels, unet_heads, unet_layers, latent = shape["unet"]
    vae_channels, vae_layers = shape["vae"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=width // 2,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=latent,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=unet_heads,  # diffusers reads this as the number of heads
        cross_attention_dim=width,
        use_linear_projection=True,
        layers_per_block=unet_layers,
    )
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=vae_layers,
        sample_size=8 * latent,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    text_encoder.to(device, dtype)
    unet.to(device, dtype)
    vae.to(device)
    name = "sd21-base-shaped-random" + ("" if size == "full" else "-toy")
    return Backbone(clip_tokenizer(), text_encoder, unet, vae, scheduler, name, "random")
