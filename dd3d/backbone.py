"""A frozen diffusers text-to-image model (Stable Diffusion layout) and the diffusion math stages 1 and 2 need."""

from __future__ import annotations

import hashlib
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from omegaconf import DictConfig
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from dd3d.cli import UserError

diffusers.utils.logging.disable_progress_bar()  # per-component loading bars; the steps have their own
transformers.utils.logging.disable_progress_bar()

DEFAULT_MODEL = Path(__file__).resolve().parent / "tiny" / "model"
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
}
MODEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MODEL_ID = "embedded-default"  # what files record as the model when the embedded default was used


def is_default_model(source: str | Path | None) -> bool:
    return source is None or str(source) in ("", DEFAULT_MODEL_ID)


def resolve_model_source(source: str | Path | None) -> str:
    """The embedded default when `source` is None, else a local folder (as an absolute path, so files that record
    it work from any working directory) or a hub id (as given), checked before loading."""
    if is_default_model(source):
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise UserError(
                f"the embedded default model is not installed at {DEFAULT_MODEL}; "
                "pass --model <hub id or local diffusers folder>"
            )
        return str(DEFAULT_MODEL)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "unet" / "config.json").is_file():
            raise UserError(f"{path} is not a diffusers text-to-image folder (no unet/config.json)")
        return str(path.resolve())
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise UserError(f"model '{source}' is neither an existing folder nor a hub id of the form owner/name")
    return str(source)


def text_encoder_fingerprint(text_encoder: CLIPTextModel) -> str:
    """sha256 of the text encoder's weights (as float32) and shapes: identifies it across dtypes and devices."""
    digest = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Backbone:
    """Tokenizer, text encoder, UNet, VAE and noise schedule of one frozen model."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, model_id: str, fingerprint: str):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.model_id = model_id
        self.fingerprint = fingerprint
        for module in (text_encoder, unet, vae):
            module.requires_grad_(False)
            module.eval()
        self.alphas_cumprod = scheduler.alphas_cumprod.to(unet.device, torch.float32)

    @classmethod
    def load(cls, source: str | Path | None = None, device="cpu", dtype=torch.float32, vae_dtype=torch.float32):
        """Load from a hub id, a local diffusers folder, or (source None) the embedded default model."""
        model_id = resolve_model_source(source)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=vae_dtype)
            scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
        except Exception as err:  # hub, file and config errors all mean "this model cannot be loaded"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load model '{source}': {reason}") from None
        fingerprint = text_encoder_fingerprint(text_encoder)  # of the stored weights, whatever dtype runs them
        text_encoder.to(device, dtype)
        unet.to(device)
        vae.to(device)
        recorded = DEFAULT_MODEL_ID if is_default_model(source) else model_id  # a local folder: its absolute path
        return cls(tokenizer, text_encoder, unet, vae, scheduler, recorded, fingerprint)

    # --- facts about the model -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The native image size: the UNet's latent size times the VAE's downsampling."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # --- images <-> latents ------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> scaled latents (the posterior mean)."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.clamp(-1, 1)

    # --- the noise schedule ------------------------------------------------------------------------------------
    def _schedule(self, t: torch.Tensor, like: torch.Tensor):
        alpha_bar = self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._schedule(t, latents)
        return alpha * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output: noise (epsilon), velocity (v_prediction) or the clean latent."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            alpha, sigma = self._schedule(t, latents)
            return alpha * noise - sigma * latents
        if self.prediction_type == "sample":
            return latents
        raise UserError(f"unsupported prediction type '{self.prediction_type}'")

    def eps_from_prediction(self, prediction: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the UNet's output to a noise estimate, whatever its prediction type."""
        if self.prediction_type == "epsilon":
            return prediction
        alpha, sigma = self._schedule(t, noisy)
        if self.prediction_type == "v_prediction":
            return sigma * noisy + alpha * prediction
        if self.prediction_type == "sample":
            return (noisy - alpha * prediction) / sigma
        raise UserError(f"unsupported prediction type '{self.prediction_type}'")

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(t.device)[t]
        return alpha_bar / (1 - alpha_bar)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (in its prediction type) for noisy latents at timesteps t."""
        dtype = self.unet.dtype
        return self.unet(noisy.to(dtype), t, encoder_hidden_states=text_embeddings.to(dtype)).sample

    # --- plain text ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Encoder hidden states (B, 77, d) for plain prompts, as a diffusers pipeline computes them."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state


# --- opening a model and sampling it through diffusers ------------------------------------------------------


def open_backbone(cfg: DictConfig):
    """The model named in the config, else the one recorded in the first distribution file, in cfg.dtype."""
    from dd3d.distribution import PromptDistribution  # the distribution records the model it was learned for

    model = cfg.model
    if model is None and cfg.dists and Path(cfg.dists[0]).suffix != ".pt":
        model = PromptDistribution.load(Path(cfg.dists[0])).model_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_dtype(cfg.dtype, device)
    return Backbone.load(model, device=device, dtype=dtype, vae_dtype=dtype)


def model_dtype(choice: str, device: str) -> torch.dtype:
    """The frozen model's weights: `auto` is fp16 on CUDA and fp32 on CPU; fp32, fp16 and bf16 work anywhere."""
    if choice == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    if choice not in MODEL_DTYPES:
        raise UserError(f"dtype must be auto, fp32, fp16 or bf16, not '{choice}'")
    return MODEL_DTYPES[choice]


def make_pipeline(backbone, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the backbone's own frozen components (PyTorch SDPA attention by default)."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not '{scheduler}'")
    pipeline = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=SCHEDULERS[scheduler].from_config(backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def guidance_window(interval, key: str = "guidance_interval") -> tuple[float, float]:
    """A guidance interval from a config as (low, high) fractions of the noise schedule; anything else refused."""
    try:
        values = tuple(float(v) for v in interval)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise UserError(f"{key} must be [low, high] with 0 <= low <= high <= 1, not {interval}")
    return values


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    steps: int,
    guidance: float,
    generators: list[torch.Generator],
    resolution: int,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> list[Image.Image]:
    """One image per row of prompt_embeds (N, 77, d), each with its own generator for latent (and sampler) noise;
    negative_embeds (1, 77, d) is the unconditional branch of classifier-free guidance. Guidance applies at the
    steps whose timestep t/T lies in guidance_interval; the others use the conditional prediction alone
    (Kynkaanniemi et al. 2024: guidance at the noisiest steps fixes layout and size, not detail)."""
    dtype = pipeline.unet.dtype
    cond = prompt_embeds.to(pipeline.device, dtype)
    uncond = negative_embeds.expand(len(cond), -1, -1).to(pipeline.device, dtype)
    options, scale = {}, guidance
    if tuple(guidance_interval) != (0.0, 1.0) and guidance > 1:  # (at a scale of 1 or less no step is guided)
        low, high = guidance_interval
        pipeline.scheduler.set_timesteps(steps)
        fractions = [float(t) / pipeline.scheduler.config.num_train_timesteps for t in pipeline.scheduler.timesteps]
        guided = [low <= f <= high for f in fractions]
        both = torch.cat([uncond, cond])

        def set_next_step(pipe, i, t, tensors):
            # The pipeline reads its scale at every step; at 1 it runs the conditional half of the batch alone.
            if i + 1 < len(guided):
                pipe._guidance_scale = guidance if guided[i + 1] else 1.0
                tensors["prompt_embeds"] = both if guided[i + 1] else cond
            return tensors

        scale = guidance if guided[0] else 1.0
        options = dict(callback_on_step_end=set_next_step, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    return pipeline(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=steps,
        guidance_scale=scale,
        generator=generators,
        height=resolution,
        width=resolution,
        **options,
    ).images
