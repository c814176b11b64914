"""Stage 1: learn a distribution over soft prompts from reference images (DreamDistribution).

Example:
  python scripts/train_distribution.py --images refs/ --model stabilityai/stable-diffusion-2-1-base --out outputs/x
  python scripts/train_distribution.py --out outputs/x resume=true      # continue after a kill
  accelerate launch scripts/train_distribution.py ...                   # several GPUs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from dd3d.backbone import Backbone, generate, guidance_window, make_pipeline
from dd3d.cli import (
    UserError,
    add_config_arguments,
    check_ranges,
    check_unchanged_on_resume,
    load_config,
    parse_arguments,
    prepare_run_dir,
)
from dd3d.data import load_reference_images, training_views
from dd3d.distribution import VIEWS, Gaussian, Mixture, PromptDistribution, view_suffix
from dd3d.files import Checkpoints, atomic_write, image_grid
from dd3d.progress import tqdm
from dd3d.prompts import SoftPromptEncoder

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN_KIND = "train_distribution"
RUN_FILES = ("config.yaml", "checkpoints", "samples", "train.log", "distribution.safetensors")  # what a run writes
NULLABLE = {"images": "", "model": "", "out": "", "resolution": 0}  # the types of keys whose default is null
CONFIG_RANGES = {
    "seed": (">=", 0),
    "steps": (">=", 1),
    "resolution": (">=", 8),
    "prompt.n_ctx": (">=", 1),
    "prompt.num_prompts": (">=", 1),
    "prompt.init_std": (">=", 0),
    "train.batch_size": (">=", 1),
    "train.num_samples": (">=", 1),
    "train.lr": (">", 0),
    "train.weight_decay": (">=", 0),
    "train.grad_clip": (">", 0),
    "train.min_snr_gamma": (">=", 0),
    "train.ortho_weight": (">=", 0),
    "train.objective": ("in", ("gaussian", "specialise", "per_reference")),
    "train.bandwidth": (">=", 0),
    "train.relax": (">=", 0, "<=", 1),
    "train.share_draws": (">=", 1),
    "train.share_min_t": (">=", 0, "<", 1),
    "augment.crops": (">=", 0),
    "augment.crop_scale": (">", 0, "<=", 1),
    "checkpoint_every": (">=", 1),
    "keep_checkpoints": (">=", 1),
    "log_every": (">=", 1),
    "sample.every": (">=", 0),
    "sample.n": (">=", 1),
    "sample.steps": (">=", 1),
    "sample.seed": (">=", 0),
}
# The shapes of the checkpointed parameters and Adam state.
FIXED_ON_RESUME = ("prompt.num_prompts", "prompt.n_ctx", "prompt.shared_base")


class PromptLearner(torch.nn.Module):
    """The trainable tensors: K contexts of n_ctx token embeddings, encoded by the frozen text encoder. With
    `shared_base` each context is a base shared by all K plus its own offset (both trained): the base learns from
    every reference what they have in common, the offsets what sets each prompt's references apart."""

    def __init__(self, encoder: SoftPromptEncoder, num_prompts: int, init_std: float, seed: int,
                 shared_base: bool = False, view_encoders: list[SoftPromptEncoder] | None = None):
        super().__init__()
        self.encoder = encoder  # not a Module: its frozen text encoder stays outside this module's parameters
        self.view_encoders = view_encoders  # train.view_words: the template with each of VIEWS appended
        width = encoder.text_encoder.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        self.ctx = torch.nn.Parameter(torch.randn(num_prompts, encoder.n_ctx, width, generator=generator) * init_std)
        self.base = torch.nn.Parameter(torch.zeros(1, encoder.n_ctx, width)) if shared_base else None

    @property
    def contexts(self) -> torch.Tensor:
        """The K contexts (K, n_ctx, d) that the distribution file stores."""
        return self.ctx if self.base is None else self.ctx + self.base

    def forward(self):
        """Encoder outputs (K, 77, d) and EOS features (K, d) of the K prompts."""
        return self.encoder(self.contexts)

    def with_view_words(self, picks: torch.Tensor) -> torch.Tensor:
        """The picked prompts (B, M) encoded with view words, draw m with VIEWS[m mod 4]: (B, M, 77, d)."""
        contexts, encoders = self.contexts, self.view_encoders
        return torch.stack([encoders[m % len(encoders)](contexts[picks[:, m]])[0] for m in range(picks.shape[1])],
                           dim=1)


def min_snr_weights(backbone: Backbone, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) expressed for the model's prediction type."""
    if gamma <= 0:
        return torch.ones_like(t, dtype=torch.float32)
    snr = backbone.snr(t)
    clipped = snr.clamp(max=gamma)
    if backbone.prediction_type == "epsilon":
        return clipped / snr
    if backbone.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def prompt_draws(hidden: torch.Tensor, prompt_eps: torch.Tensor, picks: torch.Tensor | None = None,
                 bandwidth: float = 0.5, picked: torch.Tensor | None = None) -> torch.Tensor:
    """The (B * M, 77, d) prompt embeddings of one step. The paper's: `mean + eps * std` of the Gaussian over the K
    prompts' encoder outputs hidden (K, 77, d). With picks (B, M), prompt indices: the picked prompts' own encodings
    (or `picked` (B, M, 77, d), their encodings under another template) plus `bandwidth * eps * std` (the draws of
    the prompt-mixture sampler)."""
    gaussian = Gaussian.from_hidden(hidden)
    eps = prompt_eps.to(hidden)
    if picks is None:
        return (gaussian.mean + eps * gaussian.std).flatten(0, 1)
    centres = hidden[picks.to(hidden.device)] if picked is None else picked
    return (centres + bandwidth * eps * gaussian.std).flatten(0, 1)


def denoising_loss(
    backbone: Backbone,
    hidden: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prompt_eps: torch.Tensor,
    min_snr_gamma: float,
    picks: torch.Tensor | None = None,
    bandwidth: float = 0.5,
    relax: float = 0.1,
    picked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean denoising loss of M prompt draws per latent.

    hidden (K, 77, d): the K prompts' encoder outputs; latents/noise (B, C, h, w) and t (B,) are shared by the
    M draws of each latent; prompt_eps (B, M, 77, d) are the standard-normal draws (see `prompt_draws`). The
    paper's objective averages the M losses. With picks (the `specialise` objective), each latent counts mostly its
    best-fitting draw -- (1 - relax) * min + relax * mean over M (relaxed winner-takes-all) -- so prompts specialise
    on the references they fit instead of all fitting their average. `picked`: see `prompt_draws`.
    """
    draws = prompt_eps.shape[1]
    embeddings = prompt_draws(hidden, prompt_eps, picks, bandwidth, picked)
    latents, noise, t = (x.repeat_interleave(draws, dim=0) for x in (latents, noise, t))
    noisy = backbone.add_noise(latents, noise, t)
    prediction = backbone.predict(noisy, t, embeddings).float()
    target = backbone.training_target(latents, noise, t).float()
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    per_sample = (per_sample * min_snr_weights(backbone, t, min_snr_gamma)).view(-1, draws)
    if picks is None:
        return per_sample.mean()
    return ((1 - relax) * per_sample.min(dim=1).values + relax * per_sample.mean(dim=1)).mean()


@torch.no_grad()
def prompt_shares(backbone: Backbone, hidden: torch.Tensor, latents: torch.Tensor, train_cfg, seed: int,
                  chunk: int = 64) -> torch.Tensor:
    """Each prompt's share of the reference views (K,): the fraction of views whose denoising loss, summed over
    train.share_draws noise/timestep draws shared by all prompts, is lowest under that prompt. Timesteps are drawn
    from the noisiest (1 - train.share_min_t) of the schedule, where an image's colour and layout are decided (near
    t = 0 every prompt denoises alike). Prompts that fit no reference get zero weight in the prompt-mixture sampler.
    Each UNet call denoises up to `chunk` (prompt, view) pairs: several prompts at once when the views are few."""
    generator = torch.Generator().manual_seed(seed)
    device, count = hidden.device, len(latents)
    first_t = int(train_cfg.share_min_t * backbone.num_train_timesteps)
    losses = torch.zeros(len(hidden), count)
    for _ in range(train_cfg.share_draws):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(first_t, backbone.num_train_timesteps, (count,), generator=generator)
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            clean, eps, steps = latents[part].to(device), noise[part].to(device), t[part].to(device)
            noisy = backbone.add_noise(clean, eps, steps)
            target = backbone.training_target(clean, eps, steps).float()
            weights = min_snr_weights(backbone, steps, train_cfg.min_snr_gamma)
            per_call = max(1, chunk // len(noisy))
            for first in range(0, len(hidden), per_call):
                rows = hidden[first:first + per_call]  # each view's copies side by side, as in training
                copies = len(rows)
                prediction = backbone.predict(noisy.repeat_interleave(copies, dim=0),
                                              steps.repeat_interleave(copies), rows.repeat(len(noisy), 1, 1)).float()
                error = F.mse_loss(prediction, target.repeat_interleave(copies, dim=0), reduction="none")
                error = error.mean(dim=(1, 2, 3))
                losses[first:first + copies, part] += (error.view(len(noisy), copies).T * weights).cpu()
    return torch.bincount(losses.argmin(dim=0), minlength=len(hidden)).float() / count


@torch.no_grad()
def prompt_views(backbone: Backbone, dist: PromptDistribution, latents: torch.Tensor, view_prompts: torch.Tensor,
                 train_cfg, seed: int, chunk: int = 64) -> tuple[str, ...]:
    """The view word (of VIEWS) each prompt explains its references with best (train.view_words): the denoising loss
    on the views that train it (view_prompts (V, K) > 0), summed over train.share_draws noise/timestep draws from the
    noisiest (1 - train.share_min_t) of the schedule, lowest under that word."""
    generator = torch.Generator().manual_seed(seed)
    first_t = int(train_cfg.share_min_t * backbone.num_train_timesteps)
    hidden = torch.stack([dist.encode(backbone, view=word) for word in VIEWS])  # (words, K, 77, d)
    view_index, prompt_index = (view_prompts > 0).nonzero(as_tuple=True)
    losses = torch.zeros(len(VIEWS), dist.num_prompts)
    for _ in range(train_cfg.share_draws):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(first_t, backbone.num_train_timesteps, (len(latents),), generator=generator)
        for start in range(0, len(view_index), chunk):
            views, prompts = view_index[start:start + chunk], prompt_index[start:start + chunk]
            clean, steps = latents[views].to(backbone.device), t[views].to(backbone.device)
            eps = noise[views].to(backbone.device)
            noisy = backbone.add_noise(clean, eps, steps)
            target = backbone.training_target(clean, eps, steps).float()
            weights = min_snr_weights(backbone, steps, train_cfg.min_snr_gamma)
            for word, rows in enumerate(hidden):
                prediction = backbone.predict(noisy, steps, rows[prompts.to(rows.device)]).float()
                error = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
                losses[word].index_add_(0, prompts, (error * weights).cpu())
    return tuple(VIEWS[i] for i in losses.argmin(dim=0).tolist())


def orthogonality_loss(features: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct prompts' EOS features (K, d): sum over i != j / K(K-1);
    zero for a single prompt."""
    count = features.shape[0]
    if count < 2:
        return features.sum() * 0.0
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.T
    off_diagonal = similarity - torch.diag(torch.diagonal(similarity))
    return off_diagonal.pow(2).sum() / (count * (count - 1))


def reference_prompts(owners: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """The `per_reference` objective's fixed split of the K prompts among the n reference images: (n, K), row i the
    probabilities with which a view of image i trains each prompt. With K >= n prompt k belongs to image k mod n (every
    image gets K // n or one more prompts, all used); with K < n image i shares prompt i mod K with the others that
    land there."""
    images = int(owners.max()) + 1
    image, prompt = torch.arange(images)[:, None], torch.arange(num_prompts)[None, :]
    members = (prompt % images == image) if num_prompts >= images else (image % num_prompts == prompt)
    members = members.float()
    return members / members.sum(dim=1, keepdim=True)


def training_losses(learner, backbone: Backbone, latents: torch.Tensor, train_cfg, generator: torch.Generator,
                    view_prompts: torch.Tensor | None = None):
    """One step's random draws (views, noise, t, prompt eps) from `generator`, and the total, denoising and
    orthogonality losses. view_prompts (V, K): under the `per_reference` objective, each view's probabilities of
    training each prompt (`reference_prompts` of its image; None: every view is an image of its own)."""
    batch, draws = train_cfg.batch_size, train_cfg.num_samples
    if len(latents) >= batch:
        chosen = torch.randperm(len(latents), generator=generator)[:batch]
    else:
        chosen = torch.randint(len(latents), (batch,), generator=generator)
    picked = latents[chosen]
    noise = torch.randn(picked.shape, generator=generator)
    t = torch.randint(0, backbone.num_train_timesteps, (batch,), generator=generator)
    hidden, eos = learner()
    prompt_eps = torch.randn((batch, draws, *hidden.shape[1:]), generator=generator)
    picks, relax = None, train_cfg.relax
    if train_cfg.objective == "specialise":
        picks = torch.randint(len(hidden), (batch, draws), generator=generator)
    elif train_cfg.objective == "per_reference":
        # Each view trains only its own image's prompts, all M draws counted (relax 1: the mean): no prompt is
        # pulled towards references of another colour or kind.
        if view_prompts is None:
            view_prompts = reference_prompts(torch.arange(len(latents)), len(hidden))
        picks, relax = torch.multinomial(view_prompts[chosen], draws, replacement=True, generator=generator), 1.0
    device, in_words = hidden.device, None
    plain = getattr(learner, "module", learner)  # under DistributedDataParallel
    if getattr(plain, "view_encoders", None) is not None:
        # train.view_words: the M draws name the view in turn, and the one that explains the reference best counts
        # most (relaxed winner-takes-all), so the view is said by the word instead of learned into the prompt.
        in_words, relax = plain.with_view_words(picks.to(device)), train_cfg.relax
    denoise = denoising_loss(
        backbone, hidden, picked.to(device), noise.to(device), t.to(device), prompt_eps, train_cfg.min_snr_gamma,
        picks, train_cfg.bandwidth, relax, in_words,
    )
    ortho = orthogonality_loss(eos)
    return denoise + train_cfg.ortho_weight * ortho, denoise, ortho


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream of one training step: a function of (seed, step, rank) only, so a resumed run draws
    exactly what an uninterrupted one would."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def resolve_precision(choice: str | bool) -> str:
    """accelerate's mixed-precision name for the config value (YAML reads a bare `no` as false)."""
    if choice is False:
        return "no"
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if choice not in PRECISION_DTYPES:
        raise UserError(f"train.mixed_precision must be auto, no, fp16 or bf16, not '{choice}'")
    return choice


def encode_views(backbone: Backbone, images, cfg: DictConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All training views of the reference images, encoded to latents once (the VAE is frozen), and the image index
    of each view."""
    augment = cfg.augment
    views, owners = training_views(images, resolution, augment.flip, augment.crops, augment.crop_scale, cfg.seed)
    with torch.no_grad():
        latents = [backbone.encode_images(chunk).float() for chunk in views.split(8)]
    return torch.cat(latents), owners


def check_resolution(backbone: Backbone, resolution: int) -> None:
    multiple = backbone.vae_scale_factor * 2 ** (len(backbone.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise UserError(f"resolution must be a multiple of {multiple} for this model, not {resolution}")


def write_sample_grid(backbone, learner, cfg, resolution: int, path: Path) -> None:
    """A grid of images from the current distribution, always from the same draws (sample.seed): the paper's
    Gaussian, or under the other objectives the prompt mixture (uniform weights until the shares are measured)."""
    with torch.no_grad():
        hidden, _ = learner()
    hidden, seed = hidden.float(), cfg.sample.seed
    if cfg.train.objective != "gaussian":
        sampler = Mixture.of_prompts(hidden, cfg.train.bandwidth)
    else:
        sampler = Gaussian.from_hidden(hidden)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((cfg.sample.n, *hidden.shape[1:]), generator=generator)
    embeddings, _ = sampler.apply(eps, torch.rand(cfg.sample.n, generator=generator))
    generators = [torch.Generator().manual_seed(seed + 1 + index) for index in range(cfg.sample.n)]
    empty = backbone.encode_text([""])
    images = generate(make_pipeline(backbone), embeddings, empty, cfg.sample.steps, cfg.sample.guidance, generators,
                      resolution, guidance_window(cfg.sample.guidance_interval))
    atomic_write(path, lambda tmp: image_grid(images).save(tmp, format="PNG"))


def train(cfg: DictConfig) -> Path:
    """Run (or resume) stage 1 as configured; returns the path of the distribution file."""
    out = Path(cfg.out)
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision)
    main = accelerator.is_main_process
    # Check the inputs before anything is written, so a bad folder or model leaves no half-made run behind.
    dtype = PRECISION_DTYPES[precision]
    backbone = Backbone.load(cfg.model, device=accelerator.device, dtype=dtype, vae_dtype=dtype)
    resolution = cfg.resolution or backbone.resolution
    check_resolution(backbone, resolution)
    images, _ = load_reference_images(Path(cfg.images), min_side=resolution)
    if main:
        prepare_run_dir(out, cfg.resume, cfg.overwrite, RUN_KIND, RUN_FILES)
        atomic_write(out / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    accelerator.wait_for_everyone()
    latents, owners = encode_views(backbone, images, cfg, resolution)
    view_prompts = reference_prompts(owners, cfg.prompt.num_prompts)[owners]  # for the per_reference objective

    prompt = cfg.prompt
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, prompt.n_ctx, prompt.prefix, prompt.suffix)
    view_encoders = None
    if cfg.train.view_words:
        view_encoders = [SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, prompt.n_ctx, prompt.prefix,
                                           view_suffix(prompt.suffix, word)) for word in VIEWS]
    learner = PromptLearner(encoder, prompt.num_prompts, prompt.init_std, cfg.seed, prompt.shared_base,
                            view_encoders).to(accelerator.device)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if cfg.resume and (state := checkpoints.load_latest()) is not None:
        with torch.no_grad():
            learner.ctx.copy_(state["ctx"])
            if learner.base is not None:
                learner.base.copy_(state["base"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and "scaler" in state:  # fp16: the loss scale continues too
            accelerator.scaler.load_state_dict(state["scaler"])
        start = state["step"]
    learner, optimizer = accelerator.prepare(learner, optimizer)
    plain_learner = accelerator.unwrap_model(learner)

    log = open(out / "train.log", "a") if main else None
    if log:
        log.write(
            f"# {time.strftime('%Y-%m-%d %H:%M:%S')} steps {start}->{cfg.steps} on {accelerator.device}, "
            f"precision {precision}, {len(latents)} views, model {backbone.model_id} ({backbone.prediction_type})\n"
        )
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not main, desc="learn")
    for step in progress:
        generator = step_generator(cfg.seed, step, accelerator.process_index)
        with accelerator.autocast():
            loss, denoise, ortho = training_losses(learner, backbone, latents, cfg.train, generator, view_prompts)
        # Every process stops together: one raising alone would leave the others waiting in the gradient all-reduce.
        if not accelerator.gather(torch.isfinite(loss.detach()).float().view(1)).all():
            raise UserError(
                f"the loss became non-finite ({loss.item()} on this process) at step {step + 1}; lower train.lr "
                "or use train.mixed_precision=no (the last checkpoint is kept)"
            )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(learner.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if log and (done % cfg.log_every == 0 or done == cfg.steps):
            log.write(f"step {done} loss {loss.item():.6f} denoise {denoise.item():.6f} ortho {ortho.item():.6f}\n")
            log.flush()
        if main and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            snapshot = {"ctx": plain_learner.ctx.detach().cpu(), "optimizer": optimizer.state_dict()}
            if plain_learner.base is not None:
                snapshot["base"] = plain_learner.base.detach().cpu()
            if accelerator.scaler is not None:
                snapshot["scaler"] = accelerator.scaler.state_dict()
            checkpoints.save(done, snapshot)
        if main and cfg.sample.every and (done % cfg.sample.every == 0 or done == cfg.steps):
            write_sample_grid(backbone, plain_learner, cfg, resolution, out / "samples" / f"step-{done:06d}.png")
    progress.close()

    path = out / "distribution.safetensors"
    if main:
        specialised = cfg.train.objective != "gaussian"
        dist = PromptDistribution(
            ctx=plain_learner.contexts.detach().float().cpu(),
            prefix=prompt.prefix,
            suffix=prompt.suffix,
            model_id=backbone.model_id,
            fingerprint=backbone.fingerprint,
            sampler="prompts" if specialised else "gaussian",
        )
        if specialised:
            with accelerator.autocast(), torch.no_grad():
                if cfg.train.view_words:
                    dist.views = prompt_views(backbone, dist, latents, view_prompts, cfg.train, cfg.seed)
                    log.write("prompt views " + " ".join(dist.views) + "\n")
                dist.weights = prompt_shares(backbone, dist.encode(backbone), latents, cfg.train, cfg.seed)
            log.write("prompt shares " + " ".join(f"{share:.3f}" for share in dist.weights.tolist()) + "\n")
        dist.save(path)
        log.write(f"wrote {path}\n")
        log.close()
    accelerator.wait_for_everyone()
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="train_distribution.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", help="folder of reference images")
    parser.add_argument("--model", help="hub id or local diffusers folder (default: the embedded model)")
    parser.add_argument("--out", help="run folder (default: outputs/<image folder name>)")
    add_config_arguments(parser)
    args = parse_arguments(parser, argv, "train_distribution.yaml")
    flags = {"images": args.images, "model": args.model, "out": args.out}
    cfg = load_config("train_distribution.yaml", args.config, args.overrides, nullable=NULLABLE, **flags)
    if cfg.out is None and cfg.images is not None:
        cfg.out = str(Path("outputs") / Path(cfg.images).resolve().name)
    if cfg.out is None:
        raise UserError("pass --images <folder of reference images> (and optionally --out <run folder>)")
    saved = Path(cfg.out) / "config.yaml"
    if cfg.resume and saved.is_file():
        # Resuming: the saved run's settings, with this command's overrides on top.
        cfg = load_config("train_distribution.yaml", args.config, args.overrides, saved, NULLABLE, **flags)
        check_unchanged_on_resume(saved, cfg, FIXED_ON_RESUME)
    if cfg.images is None:
        raise UserError("pass --images <folder of reference images>")
    check_ranges(cfg, CONFIG_RANGES)
    if cfg.train.view_words and cfg.train.objective != "per_reference":
        raise UserError("train.view_words needs train.objective=per_reference")
    guidance_window(cfg.sample.guidance_interval, "sample.guidance_interval")
    print(f"wrote {train(cfg)}")
