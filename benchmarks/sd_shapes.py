"""Stable-Diffusion-2.1-base-shaped components with random weights (public configs), for GPU benchmarks."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dd3d.backbone import Backbone
from dd3d.tiny.build import clip_tokenizer


def sd21_base_backbone(device, dtype) -> Backbone:
    """OpenCLIP-H text encoder (23 layers, width 1024), the 865M-parameter UNet, the SD VAE; epsilon, 512 px."""
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    text_encoder.to(device, dtype)
    unet.to(device, dtype)
    vae.to(device)
    return Backbone(clip_tokenizer(), text_encoder, unet, vae, scheduler, "sd21-base-shaped-random", "random")
