"""The embedded default model's card (README.md beside the pipeline), written from its metrics.json: data,
architecture, recipe, training time on the machine that trained it, and the measured quality."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from dd3d.backbone import DEFAULT_MODEL
from dd3d.files import atomic_write
from dd3d.tiny import world
from dd3d.tiny.world import KINDS


def rewrite_model_card(model_dir: Path = DEFAULT_MODEL) -> None:
    """Regenerate README.md from the folder's metrics.json (its optional "timing_note" says how times were taken)."""
    model_dir = Path(model_dir)
    write_model_card(model_dir / "README.md", json.loads((model_dir / "metrics.json").read_text()))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _unlit_and_other(metrics: dict) -> str:
    unlit, other = metrics.get("oracle_heldout_unlit_accuracy"), metrics.get("oracle_heldout_other_accuracy")
    text = ""
    if unlit:
        text += f"; on the same renders unlit: kind {unlit['kind']:.1%}, colour {unlit['colour']:.1%}"
    if other:
        text += f"; held-out featureless shapes read as \"other\": {other['kind']:.1%}"
    return text


def write_model_card(path: Path, metrics: dict) -> None:
    recipe, quality, timings = metrics["recipe"], metrics["quality"], metrics["timings_s"]
    arch = recipe["architecture"]
    params = metrics["parameters"]
    oracle_acc = metrics["oracle_heldout_accuracy"]
    hw = metrics["hardware"]
    total = sum(timings.values())
    per_kind = quality["plain"]["per_kind"]
    kind_rows = "\n".join(
        f"| {kind} | {per_kind[kind]['kind']:.0%} | {per_kind[kind]['colour']:.0%} | "
        f"{quality['view']['per_kind'][kind]['view']:.0%} |"
        for kind in KINDS
    )
    view_rows = " / ".join(f"{view} {acc:.0%}" for view, acc in quality["view"]["per_view"].items())
    text = f"""# dd3d embedded default model

A small text-to-image diffusion model in the Stable Diffusion folder layout, trained from scratch by
`scripts/train_tiny_backbone.py` on a procedural 3D world that dd3d renders itself (`dd3d/tiny/world.py`). It is
what dd3d uses when no `--model` is given: `Backbone.load(None)`, or
`StableDiffusionPipeline.from_pretrained("dd3d/tiny/model")`, offline. It exists so that the whole pipeline
(stage 1, the 2D path, stage 2) runs and can be *measured* on a laptop CPU; it is not a general image model.

## Data

{recipe['train_images']} renders at {recipe['resolution']}x{recipe['resolution']} px (2x2 supersampled), plus
{recipe['heldout_images']} held-out renders with another seed, made by sphere tracing signed distance functions
in pure PyTorch:

- kinds: {', '.join(world.KINDS)} -- each with a clear front (+X): door and windows, headlights and windscreen,
  backrest at the back, label and a handle on the right, lamp shade opening forward, face, beak;
- colours: {', '.join(world.COLOUR_NAMES)} -- the body colour (a little jitter per scene); details are in fixed
  dark or light greys, the house roof in a darker shade of the body colour;
- size: uniform scale in {list(world.SIZE_RANGE)} of a bounding radius {world.KIND_RADIUS} (all objects fit in
  the unit ball); captions say "small" / "large" for the lower / upper third;
- cameras: `dd3d.nerf.cameras.sample_cameras` with stage 2's default ranges (elevation -10..45 deg, all azimuths,
  distance 1.5..2, fovy 40..70 deg), and for {world.OVERHEAD_SHARE:.1%} of the scenes elevation
  {world.OVERHEAD_ELEVATION[0]:.0f}..{world.OVERHEAD_ELEVATION[1]:.0f} deg so that "overhead view" is seen; view
  labels from `view_label`;
- captions: "a red house, side view" most often, also "a red house", "a photo of a red house[, side view]",
  "a small red house[, side view]", "a rendering of a red house", "red house", "a house[, side view]",
  "a red object"; {recipe['caption_dropout']:.0%} empty captions for classifier-free guidance.

## Architecture

| component | class | size |
|---|---|---|
| tokenizer | CLIPTokenizer, the real CLIP BPE vocabulary (49,408 tokens) | |
| text encoder | CLIPTextModel, {arch['text_layers']} layers, width {arch['width']}, {arch['text_heads']} heads, MLP {arch['text_intermediate']} | {params['text_encoder'] / 1e6:.2f} M parameters (3.16 M of them the token table) |
| UNet | UNet2DConditionModel, channels {list(arch['unet_channels'])}, cross-attention at every level and in the middle, {arch['unet_heads']} heads | {params['unet'] / 1e6:.2f} M |
| VAE | AutoencoderKL, channels {list(arch['vae_channels'])}, 4 latent channels, downsampling 4: 8x8x4 latents | {params['vae'] / 1e6:.2f} M |
| scheduler | DDPMScheduler (scaled-linear betas 0.00085..0.012, 1000 steps, {recipe['prediction_type']}); use DDIM to sample | |

Folder: {metrics['folder_mb']:.1f} MB, float32 safetensors. The oracle (`oracle.safetensors`, `oracle.json`) and
`metrics.json` sit beside the pipeline's folders.

## Recipe

Fixed seed {recipe['seed']}; every random draw is a function of (seed, stage, step), and each stage resumes from
atomic checkpoints.

1. Oracle: a CNN (three conv stages of width {recipe.get('oracle_width', 16)}, heads for kind / colour / view),
   {recipe['oracle_steps']} AdamW steps of batch {recipe['oracle_batch']}, LR {recipe['oracle_lr']} (warm-up, cosine),
   shift / blur / noise / brightness jitter; {recipe.get('oracle_unlit_share', 0):.0%} of each batch shows the same
   scenes unlit (the materials' own colours; the view is learnt from lit images only), so that it also reads the
   albedo frames of a stage-2 asset; {recipe.get('oracle_other_images', 0)} more renders of featureless one-colour
   round shapes (balls, ellipsoids, clumps of spheres) teach it the kind "other", so that a blob is not read as a
   mug.
2. VAE: {recipe['vae_steps']} AdamW steps of batch {recipe['vae_batch']}, LR {recipe['vae_lr']} (warm-up
   {recipe['warmup_steps']}, cosine to 10%), loss L1 + MSE + {recipe['vae_colour_weight']} MSE of 4x4-pixel averages +
   {recipe['vae_kl_weight']} KL; latent scaling factor
   = 1 / std of the training latents; the posterior's log-variance starts at
   {recipe['vae_initial_logvar']} (small sampling noise from the first step).
3. Text encoder and UNet jointly on the cached latents: {recipe['unet_steps']} AdamW steps of batch
   {recipe['unet_batch']}, LR {recipe['unet_lr']} (text encoder {recipe['text_lr']}), warm-up
   {recipe['warmup_steps']}, cosine to 10%, then {recipe['unet_restart_cycles']} warm restarts of
   {recipe['unet_restart_steps']} steps each (cosine from {recipe['unet_restart_lr_factor']:.0%} to 10%), weight
   decay {recipe['weight_decay']}, grad clip
   {recipe['grad_clip']}, min-SNR-{recipe['min_snr_gamma']:g} weighting, EMA {recipe['ema_decay']} (the
   exported weights).{_unet_tail(metrics)}

Training time on {hw['machine']} CPU ({hw['processor']}, {hw['cpu_count']} cores, {hw['torch_threads']} torch
threads), torch {hw['torch']}: total **{_minutes(total)}** --
{', '.join(f'{name} {_minutes(seconds)}' for name, seconds in timings.items())}.
{metrics.get('timing_note', '')}
The script also trains on a GPU (`--device cuda`); that path was not timed (no GPU was lent to the sessions that
trained this model).

## Measured quality

The oracle reads, on {recipe['heldout_images']} held-out renders: kind
{oracle_acc['kind']:.1%}, colour {oracle_acc['colour']:.1%}, view {oracle_acc['view']:.1%} (views near the
45 / 135 deg borders are ambiguous by construction){_unlit_and_other(metrics)}.

Generated images ({quality['sampler'].upper()}, {quality['steps']} steps, guidance {quality['guidance']},
seeded), as read by the oracle:

| prompts | images | kind right | colour right | view right |
|---|---|---|---|---|
| "a &lt;colour&gt; &lt;kind&gt;" (all {len(world.KINDS)} x {len(world.COLOUR_NAMES)}) | {quality['plain']['images']} | **{quality['plain']['kind_accuracy']:.1%}** | **{quality['plain']['colour_accuracy']:.1%}** | |
| "a &lt;colour&gt; &lt;kind&gt;, &lt;view&gt; view" (x 4 views) | {quality['view']['images']} | {quality['view']['kind_accuracy']:.1%} | {quality['view']['colour_accuracy']:.1%} | **{quality['view']['view_accuracy']:.1%}** |

Bars: kind >= 80%, colour >= 80%, view >= 60%. Per view: {view_rows}.

| kind | kind right | colour right | view right |
|---|---|---|---|
{kind_rows}

## Limits

32 px images of a toy world: it knows these {len(world.KINDS)} kinds, {len(world.COLOUR_NAMES)} colours, sizes
and four views, and little else; other words in a prompt are mostly ignored. The token table holds the whole
CLIP vocabulary, but only the caption words were trained; the rest keep their random initial values.
"""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _unet_tail(metrics: dict) -> str:
    """The recipe's step 4, when the model had one: the UNet alone with the text encoder frozen."""
    recipe = metrics["recipe"]
    if not recipe.get("unet_tail_steps"):
        return ""
    losses = metrics.get("unet_tail_heldout_loss", {})
    measured = ""
    if losses:
        first, last = losses[min(losses, key=int)], losses[max(losses, key=int)]
        measured = (f" The denoising error on the held-out renders (4 fixed noisings each, timesteps stratified) "
                    f"went from {first:.5f} to {last:.5f} ({last / first - 1:+.1%}).")
    return f"""
4. Then the UNet alone, the text encoder frozen (so prompt distributions learned on the model before stay valid):
   {recipe['unet_tail_steps']} more AdamW steps from the exported weights with a fresh optimiser, warm-up
   {recipe['unet_tail_warmup']} to {recipe['unet_restart_lr_factor']:.0%} of the LR, cosine to 10%, the EMA continued
   (the exported weights).{measured}"""


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else "unknown"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown"


def hardware() -> dict:
    """The machine and torch build a run trains on, as metrics.json records them."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
