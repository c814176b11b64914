import pytest
import torch

from dd3d.backbone import Backbone
from dd3d.cli import UserError
from dd3d.sds import ScoreDistillation, guided_eps, interval_score_gradient, sds_gradient, sds_loss


@pytest.mark.parametrize("fixture", ["backbone", "backbone_v"])
def test_sds_gradient_is_weighted_guided_noise_residual(fixture, request):
    model = request.getfixturevalue(fixture)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    cond, uncond = torch.randn(2, 77, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8, generator=generator)
    gradient = sds_gradient(model, latents, cond, uncond, t, noise, guidance_scale=7.5)

    with torch.no_grad():  # the formula, by hand
        noisy = model.add_noise(latents, noise, t)
        eps_c = model.eps_from_prediction(model.predict(noisy, t, cond), noisy, t)
        eps_u = model.eps_from_prediction(model.predict(noisy, t, uncond), noisy, t)
        weight = (1 - model.alphas_cumprod[t]).view(-1, 1, 1, 1)
        expected = weight * (eps_u + 7.5 * (eps_c - eps_u) - noise)
    assert torch.allclose(gradient, expected, atol=1e-5)

    sds_loss(latents, gradient).backward()
    assert torch.allclose(latents.grad, gradient / 2, atol=1e-6)  # batch-mean of the per-image gradient


def test_zero_when_guided_prediction_equals_the_noise(backbone, monkeypatch):
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: noise.expand(len(noisy), -1, -1, -1))
    gradient = sds_gradient(backbone, latents, torch.zeros(1, 77, 32), torch.ones(1, 77, 32), torch.tensor([500]),
                            noise, guidance_scale=100.0)
    assert gradient.abs().max() == 0


def test_interval_score_leaves_only_the_guidance_where_the_model_explains_the_render(backbone, monkeypatch):
    """A model whose unconditional estimate is the same noise everywhere explains the render exactly: the DDIM
    inversion recovers that noise at both ends of the interval, so only the text's guidance is left -- with no
    random noise in it (SDS's residual eps_hat - eps would be mostly the sampled noise)."""
    generator = torch.Generator().manual_seed(3)
    latents, fixed, text = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    cond, uncond = torch.ones(3, 77, 32), torch.zeros(3, 77, 32)
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: fixed + text * emb[:, :1, :1, None])
    t = torch.tensor([30, 420, 900])  # below the interval, and needing one and several inversion moves
    gradient = interval_score_gradient(backbone, latents.expand(3, -1, -1, -1), cond, uncond, t, guidance_scale=7.5,
                                       interval=50, inversion_stride=200)
    weight = (1 - backbone.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert torch.allclose(gradient, weight * 7.5 * text, atol=1e-4)
    within = interval_score_gradient(backbone, latents, cond[:1], uncond[:1], t[:1], 7.5)  # no inversion move at all
    assert torch.allclose(within, gradient[:1], atol=1e-5)


@pytest.mark.parametrize("score", ["sds", "interval"])
def test_guidance_interval_guides_only_its_timesteps(backbone, monkeypatch, score):
    """A linear model (the text's direction is the embedding itself): inside the interval the guided estimate's
    text part is guidance_scale times the conditional direction, outside it once (the prompt alone)."""
    text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: text * emb[:, :1, :1, None])
    cond, uncond = torch.ones(2, 77, 32), torch.zeros(2, 77, 32)
    t = torch.tensor([200, 800])  # t/T 0.2 (inside [0, 0.5]) and 0.8 (outside)
    guidance = ScoreDistillation(backbone, guidance_scale=7.5, score=score, guidance_interval=(0.0, 0.5))
    assert guidance.scale_at(t).flatten().tolist() == [7.5, 1.0]
    noise = torch.zeros(2, 4, 8, 8) if score == "sds" else None
    gradient = guidance.score_gradient(torch.zeros(2, 4, 8, 8), cond, uncond, t, noise)
    weight = (1 - backbone.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert torch.allclose(gradient, weight * torch.tensor([7.5, 1.0]).view(-1, 1, 1, 1) * text, atol=1e-4)
    with pytest.raises(UserError, match="guidance_interval"):
        ScoreDistillation(backbone, guidance_interval=(0.6, 0.2))


def test_perp_neg_removes_only_the_negatives_part_across_the_positive_direction(backbone, monkeypatch):
    """A linear model (the estimate is the embedding's first entries): a negative prompt's direction along the
    camera's own is kept, its perpendicular part is taken off times its weight; at weight 0, or a negative that
    is the positive prompt itself, the estimate is plain classifier-free guidance."""
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: emb[:, :8, :].reshape(-1, 4, 8, 8))
    noisy, t = torch.zeros(1, 4, 8, 8), torch.tensor([500])
    uncond = torch.zeros(1, 77, 32)
    cond = torch.zeros(1, 77, 32)
    cond[0, 0, 0] = 1.0  # the positive direction: one element
    negative = torch.zeros(1, 77, 32)
    negative[0, 0, 0], negative[0, 0, 1] = 0.5, 2.0  # half along it, 2 across it
    plain = guided_eps(backbone, noisy, t, cond, uncond, 7.5)
    steered = guided_eps(backbone, noisy, t, cond, uncond, 7.5, (negative[:, None], torch.tensor([[0.5]])))
    difference = (steered - plain).flatten()
    assert torch.isclose(difference[1], torch.tensor(-7.5 * 0.5 * 2.0)) and difference[0] == 0
    assert difference[2:].abs().max() == 0
    for negatives in ((negative[:, None], torch.tensor([[0.0]])), (cond[:, None], torch.tensor([[3.0]]))):
        assert torch.allclose(guided_eps(backbone, noisy, t, cond, uncond, 7.5, negatives), plain)
    padded = (torch.stack([negative, torch.zeros(1, 77, 32)], dim=1), torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(guided_eps(backbone, noisy, t, cond, uncond, 7.5, padded), steered)


def test_shared_prompt_blends_the_two_guidance_directions(backbone, monkeypatch):
    """On the linear stand-in: with a shared prompt at weight w the guidance direction is (1 - w) the asset's own
    plus w the shared one's; w = 0 is plain guidance, w = 1 the shared prompt's alone; Perp-Neg then acts on the
    blend."""
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: emb[:, :8, :].reshape(-1, 4, 8, 8))
    noisy, t, uncond = torch.zeros(1, 4, 8, 8), torch.tensor([500]), torch.zeros(1, 77, 32)
    own, other = torch.zeros(1, 77, 32), torch.zeros(1, 77, 32)
    own[0, 0, 0], other[0, 0, 1] = 1.0, 2.0
    blended = guided_eps(backbone, noisy, t, own, uncond, 7.5, shared=(other, 0.25)).flatten()
    assert torch.isclose(blended[0], torch.tensor(7.5 * 0.75)) and torch.isclose(blended[1], torch.tensor(7.5 * 0.5))
    assert torch.allclose(guided_eps(backbone, noisy, t, own, uncond, 7.5, shared=(other, 0.0)),
                          guided_eps(backbone, noisy, t, own, uncond, 7.5))
    assert torch.allclose(guided_eps(backbone, noisy, t, own, uncond, 7.5, shared=(other, 1.0)),
                          guided_eps(backbone, noisy, t, other, uncond, 7.5))
    negatives = (other[:, None], torch.tensor([[1.0]]))  # along the blend in part: only the rest is taken off
    assert torch.allclose(guided_eps(backbone, noisy, t, own, uncond, 7.5, negatives, (other, 0.25)),
                          guided_eps(backbone, noisy, t, own * 0.75 + other * 0.25, uncond, 7.5, negatives))
    both = guided_eps(backbone, noisy, t, own, uncond, 7.5, negatives, (other, (0.0, 0.25)))  # one UNet pass
    assert torch.allclose(both[0], guided_eps(backbone, noisy, t, own, uncond, 7.5, negatives))
    assert torch.allclose(both[1], guided_eps(backbone, noisy, t, own, uncond, 7.5, negatives, (other, 0.25)))


def test_shared_luminance_leaves_the_colour_to_the_assets_own_prompt(backbone, monkeypatch):
    """With shared_luminance the shared prompt changes the renders' gradient equally in the three channels (their
    brightness and coverage), so the colour is pulled by the asset's own prompt alone; without it, it does not.
    Either way the UNet runs once per step."""
    calls = []
    predict = backbone.predict
    monkeypatch.setattr(backbone, "predict", lambda *args: calls.append(1) or predict(*args))
    generator = torch.Generator().manual_seed(5)
    rgb = torch.rand(2, 16, 16, 3, generator=generator, requires_grad=True)
    cond, other, uncond = (torch.randn(2, 77, 32, generator=generator) for _ in range(3))

    def rgb_gradient(guidance, shared):
        rgb.grad = None
        loss, _ = guidance(rgb, cond, uncond, 0, torch.Generator().manual_seed(0), shared=shared)
        loss.backward()
        return rgb.grad.clone()

    for luminance in (True, False):
        guidance = ScoreDistillation(backbone, guidance_scale=7.5, shared_luminance=luminance)
        calls.clear()
        part = rgb_gradient(guidance, (other, 0.5)) - rgb_gradient(guidance, None)
        assert len(calls) == 2
        assert part.abs().max() > 1e-4
        colour = (part - part.mean(dim=-1, keepdim=True)).abs().max() / part.abs().max()
        assert (colour < 1e-3) == luminance  # 4e-5 with it (a larger UNet batch's rounding), 0.74 without


def test_v_prediction_is_converted_before_guidance(backbone_v, monkeypatch):
    """A v-model that predicts the true velocity yields zero SDS gradient: eps is recovered from v first."""
    latents, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([300])
    velocity = backbone_v.training_target(latents, noise, t)
    monkeypatch.setattr(backbone_v, "predict", lambda noisy, steps, emb: velocity.expand(len(noisy), -1, -1, -1))
    gradient = sds_gradient(backbone_v, latents, torch.zeros(1, 77, 32), torch.ones(1, 77, 32), t, noise, 100.0)
    assert gradient.abs().max() < 1e-4


@pytest.mark.parametrize("score", ["sds", "interval"])
def test_guidance_on_renders_reaches_the_image_and_anneals(backbone, score):
    guidance = ScoreDistillation(backbone, max_step_percent=0.98, max_step_percent_end=0.5, anneal_steps=100,
                                 score=score)
    assert guidance.step_range(0) == (20, 980) and guidance.step_range(100) == (20, 500)
    rgb = torch.rand(2, 12, 12, 3, requires_grad=True)
    loss, info = guidance(rgb, torch.randn(2, 77, 32), torch.randn(2, 77, 32), 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0 and 20 <= info["t"] <= 980
    with pytest.raises(UserError):
        ScoreDistillation(backbone, min_step_percent=0.9, max_step_percent=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_guides_the_fp32_render_like_fp32(tiny_model, backbone, dtype):
    """The GPU setting (UNet and VAE in fp16, render in fp32), run on CPU: fp32 gradients close to the fp32 model's."""
    half = Backbone.load(tiny_model, dtype=dtype, vae_dtype=dtype)
    cond, uncond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 77, 32)
    pixels = torch.rand(2, 12, 12, 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (backbone, half):
        rgb = pixels.clone().requires_grad_(True)
        loss, _ = ScoreDistillation(model)(rgb, cond, uncond, 0, torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.dtype == torch.float32 and rgb.grad.dtype == torch.float32 and rgb.grad.isfinite().all()
        grads.append(rgb.grad.flatten())
    assert torch.cosine_similarity(*grads, dim=0) > 0.95


def pull_and_residual(backbone, pixels, settings, iteration=0, opacity=None):
    """(the gradient the pull settings add on the render's pixels, the residual x - D(E(x)) in [0, 1] units)."""
    batch = len(pixels)
    cond, uncond = torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(5)), torch.zeros(batch, 77, 32)
    grads = []
    for options in ({}, settings):
        rgb = pixels.clone().requires_grad_(True)
        loss, _ = ScoreDistillation(backbone, **options)(rgb, cond, uncond, iteration,
                                                          torch.Generator().manual_seed(0), opacity)
        loss.backward()
        grads.append(rgb.grad)
    with torch.no_grad():
        shown = (backbone.decode_latents(backbone.encode_images(pixels.permute(0, 3, 1, 2) * 2 - 1)) + 1) / 2
    return grads[1] - grads[0], pixels - shown.permute(0, 2, 3, 1)


@pytest.mark.parametrize("settings, iteration, full, chroma", [
    (dict(recon_weight=4.0), 0, 4.0, 0.0),
    (dict(recon_weight=12.0, recon_weight_end=0.0, anneal_steps=90), 60, 4.0, 0.0),
    (dict(recon_weight=12.0, recon_weight_end=0.0, anneal_steps=90, recon_chroma_weight=2.0), 90, 0.0, 2.0),
    (dict(recon_chroma_weight=1.0, recon_chroma_weight_end=4.0, anneal_steps=90), 30, 0.0, 2.0),
])
def test_reconstruction_pull_moves_each_pixel_towards_what_the_vae_shows(backbone, settings, iteration, full, chroma):
    """recon_weight w adds w (x - D(E(x))) to the gradient on every pixel (in [0, 1] units), D(E(x)) held fixed;
    with recon_weight_end, w moves linearly to it over anneal_steps (here 12 -> 0: 4 at two thirds of the way);
    recon_chroma_weight c adds c times the residual less its mean over the colour channels (colour only), annealed
    the same way to recon_chroma_weight_end (here 1 -> 4: 2 at a third of the way)."""
    size = backbone.resolution
    pixels = torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(3))
    pull, residual = pull_and_residual(backbone, pixels, settings, iteration)
    colour_only = residual - residual.mean(dim=-1, keepdim=True)
    expected = (full * residual + chroma * colour_only) / 2  # averaged over the batch of 2
    assert torch.allclose(pull, expected, atol=1e-5)
    if chroma:
        assert torch.allclose(pull.sum(dim=-1), torch.zeros(()), atol=1e-5)  # leaves brightness


def test_colour_pull_leaves_pixels_the_object_does_not_cover(backbone):
    """With the render's opacity given, the colour-only pull is weighted by it: background pixels (opacity 0) are not
    pulled, so it cannot paint the object's colour onto the background; covered pixels get the full pull."""
    size = backbone.resolution
    pixels = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(4))
    opacity = torch.zeros(1, size, size, 1)
    opacity[:, :, size // 2:] = 1.0
    pull, residual = pull_and_residual(backbone, pixels, dict(recon_chroma_weight=3.0), opacity=opacity)
    expected = 3.0 * (residual - residual.mean(dim=-1, keepdim=True))
    assert pull[:, :, : size // 2].abs().max() < 1e-6
    assert torch.allclose(pull[:, :, size // 2:], expected[:, :, size // 2:], atol=1e-5)
    assert pull[:, :, size // 2:].abs().max() > 1e-3
