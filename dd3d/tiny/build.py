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


# The architecture of the embedded default model (dd3d/tiny/model), trained by dd3d.tiny.train: 32 px images,
# 8x8x4 latents (VAE downsampling 4), a 3-layer text encoder of width 64, cross-attention at every UNet level.
EMBEDDED_ARCHITECTURE = dict(
    width=64,
    image_size=32,
    text_layers=3,
    text_heads=4,
    text_intermediate=256,
    unet_channels=(32, 64, 64),
    unet_attention=(True, True, True),
    unet_heads=2,
    unet_groups=8,
    vae_channels=(16, 32, 64),
    vae_groups=8,
    vae_mid_attention=False,
)


def build_tiny_pipeline(
    prediction_type: str = "epsilon",
    width: int = 32,
    image_size: int = 16,
    seed: int = 0,
    *,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    unet_channels: tuple[int, ...] = (32, 64),
    unet_attention: tuple[bool, ...] = (True, False),
    unet_heads: int = 8,
    unet_groups: int = 8,
    layers_per_block: int = 1,
    vae_channels: tuple[int, ...] = (16, 32),
    vae_groups: int = 8,
    vae_mid_attention: bool = True,
) -> StableDiffusionPipeline:
    """A tiny SD-shaped pipeline: text width `width`, images `image_size` px, 4-channel latents downsampled
    2 ** (len(vae_channels) - 1) times; `unet_attention` says which UNet levels cross-attend to the text.
    The defaults are the untrained 16 px test model; EMBEDDED_ARCHITECTURE is the embedded default model's."""
    if len(unet_attention) != len(unet_channels):
        raise ValueError("unet_attention needs one flag per UNet level")
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=text_intermediate or 2 * width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=width,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet_attention)),
        cross_attention_dim=width,
        attention_head_dim=unet_heads,  # diffusers reads this as the number of heads
        norm_num_groups=unet_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=vae_groups,
        sample_size=image_size,
        mid_block_add_attention=vae_mid_attention,
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
