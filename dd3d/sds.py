"""Score distillation sampling (DreamFusion), or interval score matching (LucidDreamer): the frozen diffusion
model's guidance as a gradient on images.

Correct for epsilon and v-prediction models: the UNet output is converted to a noise estimate first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dd3d.backbone import Backbone, guidance_window
from dd3d.cli import UserError


def guided_eps(backbone: Backbone, noisy, t, cond, uncond, guidance_scale: float | torch.Tensor, negatives=None,
               shared=None) -> torch.Tensor:
    """The classifier-free-guided noise estimate at `noisy` (no grad). `shared`: (embeddings (B, 77, d), w) of a
    second prompt whose guidance direction is blended in, (1 - w) (cond's) + w (its), as composable diffusion adds
    conditions (Liu et al. 2022); w may be a tuple of weights, for one estimate per weight stacked (n, B, ...) from
    the same UNet evaluation. `negatives`: (embeddings (B, J, 77, d),
    weights (B, J)) of prompts to steer away from, Perp-Neg style (Armandpour et al. 2023): each one's guidance
    direction less its part along the positive direction, times its weight, is taken off the positive direction, so
    what the prompts share (the object) is kept and only what sets them apart (the view) is pushed apart."""
    if negatives is None:
        conds = [cond]
    else:
        embeddings, weights = negatives
        used = weights.ne(0).any(dim=0)  # a negative at weight 0 for every camera changes nothing: not evaluated
        embeddings, weights = embeddings[:, used], weights[:, used]
        conds = [cond, *embeddings.unbind(1)]
    if shared is not None:
        conds.append(shared[0])
    count = len(conds) + 1
    batch = torch.cat([noisy] * count), torch.cat([t] * count)
    out = backbone.predict(*batch, torch.cat([*conds, uncond])).float()
    eps_all = backbone.eps_from_prediction(out, *batch).chunk(count)
    eps_uncond, own = eps_all[-1], eps_all[0] - eps_all[-1]
    stacked = shared is not None and isinstance(shared[1], tuple)
    blends = shared[1] if stacked else [0.0 if shared is None else shared[1]]
    estimates = []
    for blend in blends:
        positive = own if blend == 0 else (1 - blend) * own + blend * (eps_all[-2] - eps_uncond)
        if negatives is not None:
            flat = positive.flatten(1)
            for eps_negative, weight in zip(eps_all[1 : 1 + weights.shape[1]], weights.to(positive).unbind(1)):
                away = (eps_negative - eps_uncond).flatten(1)
                along = (away * flat).sum(1, keepdim=True) / flat.square().sum(1, keepdim=True).clamp(min=1e-12)
                positive = positive - (weight[:, None] * (away - along * flat)).view_as(positive)
        estimates.append(eps_uncond + guidance_scale * positive)
    return torch.stack(estimates) if stacked else estimates[0]


def score_weight(backbone: Backbone, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) of each timestep in `t`."""
    if weighting == "sds":
        return 1 - backbone.alphas_cumprod.to(t.device)[t]  # DreamFusion's w(t) = sigma_t^2
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    raise UserError(f"guidance.weighting must be sds or uniform, not '{weighting}'")


def sds_gradient(
    backbone: Backbone,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    weighting: str = "sds",
    negatives=None,
    shared=None,
) -> torch.Tensor:
    """w(t) (eps_hat - eps): eps_hat is the classifier-free-guided noise estimate at noisy latents (no grad;
    `negatives`, `shared`: see `guided_eps`)."""
    with torch.no_grad():
        eps_hat = guided_eps(backbone, backbone.add_noise(latents, noise, t), t, cond, uncond, guidance_scale,
                             negatives, shared)
    return score_weight(backbone, t, weighting).view(-1, 1, 1, 1) * (eps_hat - noise)


def ddim_move(backbone: Backbone, noisy, eps, t_from, t_to) -> torch.Tensor:
    """One deterministic DDIM move of `noisy` at t_from to t_to along the noise estimate `eps` (up for inversion)."""
    alpha_from = backbone.alphas_cumprod.to(noisy.device)[t_from].view(-1, 1, 1, 1)
    alpha_to = backbone.alphas_cumprod.to(noisy.device)[t_to].view(-1, 1, 1, 1)
    clean = (noisy - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * eps


def interval_score_gradient(
    backbone: Backbone,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    weighting: str = "sds",
    interval: int = 50,
    inversion_stride: int = 200,
    negatives=None,
    shared=None,
) -> torch.Tensor:
    """Interval score matching (LucidDreamer, Liang et al. 2023): w(t) (eps_hat(x_t, t) - eps(x_s, s)), s = t -
    interval, where x_s is the latents inverted by deterministic DDIM with the unconditional estimate (strides of
    at most inversion_stride) and x_t one more such move from x_s. The random noise of SDS is replaced by the noise
    the model itself reads into the render, so the target is a sharp image, not the blurred mean of its noisy
    versions. `negatives`, `shared`: see `guided_eps`."""
    with torch.no_grad():
        s = (t - interval).clamp(min=0)
        moves = -(-int(s.max()) // inversion_stride)  # none when every t is within the interval of 0
        noisy, at = latents, torch.zeros_like(s)
        for k in range(1, moves + 1):
            to = torch.div(s * k, moves, rounding_mode="floor")
            eps = backbone.eps_from_prediction(backbone.predict(noisy, at, uncond), noisy, at).float()
            noisy, at = ddim_move(backbone, noisy, eps, at, to), to
        eps_s = backbone.eps_from_prediction(backbone.predict(noisy, s, uncond), noisy, s).float()
        noisy_t = ddim_move(backbone, noisy, eps_s, s, t)
        eps_hat = guided_eps(backbone, noisy_t, t, cond, uncond, guidance_scale, negatives, shared)
    return score_weight(backbone, t, weighting).view(-1, 1, 1, 1) * (eps_hat - eps_s)


def sds_loss(latents: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. latents is exactly `gradient` (summed over pixels, averaged over batch)."""
    target = (latents - gradient).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]


def check_timestep_range(
    min_step_percent: float, max_step_percent: float, max_step_percent_end: float | None = None
) -> None:
    """Timesteps are drawn from [T * min, T * max] (max annealed to max_step_percent_end); T * 1.0 is one past the
    schedule's last timestep, so the percents must satisfy 0 <= min < max < 1 and min <= end < 1."""
    end = max_step_percent_end
    if not (0 <= min_step_percent < max_step_percent < 1 and (end is None or min_step_percent <= end < 1)):
        raise UserError(
            "guidance timesteps must satisfy 0 <= min_step_percent < max_step_percent < 1 and min_step_percent <= "
            f"max_step_percent_end < 1, not {min_step_percent}, {max_step_percent}, {end}"
        )


class ScoreDistillation:
    """SDS guidance for rendered images: timestep range with annealing, weighting, gradient clipping."""

    def __init__(
        self,
        backbone: Backbone,
        guidance_scale: float = 100.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        max_step_percent_end: float | None = None,
        anneal_steps: int = 0,
        weighting: str = "sds",
        grad_clip: float | None = None,
        score: str = "sds",
        interval: int = 50,
        inversion_stride: int = 200,
        recon_weight: float = 0.0,
        recon_weight_end: float | None = None,
        recon_chroma_weight: float = 0.0,
        recon_chroma_weight_end: float | None = None,
        shared_luminance: bool = False,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ):
        check_timestep_range(min_step_percent, max_step_percent, max_step_percent_end)
        self.guidance_interval = guidance_window(guidance_interval, "guidance.guidance_interval")
        if score not in ("sds", "interval"):
            raise UserError(f"guidance.score must be sds or interval, not '{score}'")
        self.backbone = backbone
        self.guidance_scale = guidance_scale
        self.min_step_percent, self.max_step_percent = min_step_percent, max_step_percent
        self.max_step_percent_end = max_step_percent_end
        self.anneal_steps = anneal_steps
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.score, self.interval, self.inversion_stride = score, interval, inversion_stride
        self.recon_weight, self.recon_weight_end = recon_weight, recon_weight_end
        self.recon_chroma_weight, self.recon_chroma_weight_end = recon_chroma_weight, recon_chroma_weight_end
        self.shared_luminance = shared_luminance

    def annealed(self, start: float, end: float | None, iteration: int) -> float:
        """`start` moved linearly to `end` over anneal_steps iterations (`start` throughout when end is None)."""
        if end is None or self.anneal_steps <= 0:
            return start
        return start + (end - start) * min(iteration / self.anneal_steps, 1.0)

    def step_range(self, iteration: int) -> tuple[int, int]:
        """[min, max] timestep; the max falls linearly to max_step_percent_end over anneal_steps iterations."""
        top = self.annealed(self.max_step_percent, self.max_step_percent_end, iteration)
        steps = self.backbone.num_train_timesteps
        low = int(steps * self.min_step_percent)
        return low, min(steps - 1, max(low + 1, int(steps * top)))

    def encode(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered images (B, H, W, 3) in [0, 1] -> (pixels at the model's native size in [-1, 1], their latents),
        both with grad."""
        pixels = self.resize(rgb) * 2 - 1
        return pixels, self.backbone.encode_images(pixels).float()

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C, size, size) at the model's native size."""
        size = self.backbone.resolution
        return F.interpolate(images.permute(0, 3, 1, 2), (size, size), mode="bilinear", align_corners=False)

    def reconstruction_loss(
        self,
        pixels: torch.Tensor,
        latents: torch.Tensor,
        weight: float,
        chroma_weight: float = 0.0,
        opacity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """weight/2 |x - D(E(x))|^2 + chroma_weight/2 |its chroma part|^2 (summed over pixels in [0, 1], averaged
        over the batch; the chroma part is the residual less its mean over the colour channels), D(E(x)) held fixed:
        it pulls a render towards what the UNet is shown of it, where the VAE reads it differently (a small VAE
        reads colours it never saw as others, and SDS then cannot correct them). The chroma part corrects colour
        only, leaving the shading and edges that carry the shape to SDS; with the render's opacity (B, H, W, 1) it
        is weighted by it, so the reconstruction's blurred edges do not paint the object's colour onto the
        background."""
        with torch.no_grad():
            reconstruction = self.backbone.decode_latents(latents.detach()).float()
        residual = pixels - reconstruction
        chroma = residual - residual.mean(dim=1, keepdim=True)
        if opacity is not None:
            chroma = chroma * self.resize(opacity.detach()).sqrt()
        total = weight * residual.square().sum() + chroma_weight * chroma.square().sum()
        return 0.125 * total / pixels.shape[0]

    def scale_at(self, t: torch.Tensor) -> torch.Tensor:
        """The guidance scale of each timestep in `t`, (B, 1, 1, 1): guidance_scale where t/T lies in the guidance
        interval, 1 (the prompt alone) elsewhere, as the 2D path's guidance interval."""
        low, high = self.guidance_interval
        fraction = t.float() / self.backbone.num_train_timesteps
        inside = (fraction >= low) & (fraction <= high)
        return torch.where(inside, self.guidance_scale, 1.0).view(-1, 1, 1, 1)

    def score_gradient(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor | None, negatives=None, shared=None) -> torch.Tensor:
        """The configured score's gradient on the latents at timesteps t, NaNs zeroed and clipped: SDS (with
        `noise`) or interval score matching (deterministic, `noise` None); `negatives`, `shared`: see
        `guided_eps`."""
        if self.score == "interval":
            gradient = interval_score_gradient(
                self.backbone, latents, cond, uncond, t, self.scale_at(t), self.weighting, self.interval,
                self.inversion_stride, negatives, shared,
            )
        else:
            gradient = sds_gradient(self.backbone, latents, cond, uncond, t, noise, self.scale_at(t),
                                    self.weighting, negatives, shared)
        gradient = torch.nan_to_num(gradient)
        return gradient if self.grad_clip is None else gradient.clamp(-self.grad_clip, self.grad_clip)

    def __call__(
        self,
        rgb: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        iteration: int,
        generator: torch.Generator,
        opacity: torch.Tensor | None = None,
        negatives=None,
        shared=None,
    ) -> tuple[torch.Tensor, dict]:
        """The SDS loss for a batch of renders; `cond`/`uncond` are (B, 77, d) text embeddings; `opacity` weights the
        colour-only pull (None: every pixel fully); `negatives`, `shared`: see `guided_eps` (with
        shared_luminance, the shared prompt's part of the gradient acts on the renders' luminance only)."""
        pixels, latents = self.encode(rgb)
        low, high = self.step_range(iteration)
        batch = latents.shape[0]
        t = torch.randint(low, high + 1, (batch,), generator=generator).to(latents.device)
        noise = None
        if self.score == "sds":
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        if shared is not None and self.shared_luminance:  # without and with the shared prompt, one UNet pass
            both = self.score_gradient(latents, cond, uncond, t, noise, negatives, (shared[0], (0.0, shared[1])))
            gradient, part = both[0], both[1] - both[0]
            pixel_gradient = torch.autograd.grad(sds_loss(latents, part), pixels, retain_graph=True)[0]
            loss = sds_loss(latents, gradient) + (pixels * pixel_gradient.mean(dim=1, keepdim=True)).sum()
        else:
            gradient = self.score_gradient(latents, cond, uncond, t, noise, negatives, shared)
            loss = sds_loss(latents, gradient)
        recon_weight = self.annealed(self.recon_weight, self.recon_weight_end, iteration)
        chroma_weight = self.annealed(self.recon_chroma_weight, self.recon_chroma_weight_end, iteration)
        if recon_weight > 0 or chroma_weight > 0:
            loss = loss + self.reconstruction_loss(pixels, latents, recon_weight, chroma_weight, opacity)
        return loss, {"t": t.float().mean().item(), "grad_norm": gradient.norm().item()}
