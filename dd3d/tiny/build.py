"""Build a small, randomly initialised text-to-image model in the Stable Diffusion folder layout.

It uses the real CLIP vocabulary and the same diffusers/transformers classes as Stable Diffusion, so everything
that loads SD loads it. Tests and benchmarks use it untrained; the embedded default model starts from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_BPE = Path(__file__).resolve().parent / "clip-bpe"


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens) from the copy shipped in this package."""
    return CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), model_max_length=77)


def build_tiny_pipeline(
    prediction_type: str = "epsilon", width: int = 32, image_size: int = 16, seed: int = 0
) -> StableDiffusionPipeline:
    """A tiny SD-shaped pipeline: text width `width`, images `image_size` px, 4-channel latents at 1/2 size."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=width,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(folder: Path, **kwargs) -> Path:
    """Build a tiny pipeline (see build_tiny_pipeline) and save it as a diffusers folder with safetensors."""
    build_tiny_pipeline(**kwargs).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
