import math

import pytest
import torch

from dd3d.learn import PromptLearner, denoising_loss, min_snr_weights, orthogonality_loss
from dd3d.prompts import SoftPromptEncoder


def make_learner(backbone, k=8, seed=0):
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="a", suffix="")
    return PromptLearner(encoder, num_prompts=k, init_std=0.02, seed=seed)


def random_batch(backbone, batch=2, draws=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    noise = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    prompt_eps = torch.randn(batch, draws, 77, 32, generator=generator)
    return latents, noise, t, prompt_eps


def test_only_ctx_receives_gradients(backbone):
    learner = make_learner(backbone)
    hidden, eos = learner()
    assert hidden.shape == (8, 77, 32) and eos.shape == (8, 32)
    loss = denoising_loss(backbone, hidden, *random_batch(backbone), min_snr_gamma=5.0) + orthogonality_loss(eos)
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    for module in (backbone.unet, backbone.vae, backbone.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_orthogonality_loss_known_values():
    assert orthogonality_loss(torch.eye(4)).item() == pytest.approx(0.0)
    assert orthogonality_loss(torch.ones(3, 5)).item() == pytest.approx(1.0)
    # Two pairs at 60 degrees (cos 0.5), one orthogonal pair: (2 * 2 * 0.25 + 0) / (3 * 2).
    features = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2]])
    cos = features @ features.T
    expected = (cos.pow(2).sum() - 3) / 6
    assert orthogonality_loss(features * 7).item() == pytest.approx(expected.item(), abs=1e-6)


def test_min_snr_weights(backbone, backbone_v):
    t = torch.tensor([0, 999])
    snr = backbone.snr(t)
    assert torch.allclose(min_snr_weights(backbone, t, 5.0), snr.clamp(max=5) / snr)
    assert torch.allclose(min_snr_weights(backbone_v, t, 5.0), snr.clamp(max=5) / (snr + 1))
    assert torch.equal(min_snr_weights(backbone, t, 0.0), torch.ones(2))


@pytest.mark.parametrize("fixture", ["backbone", "backbone_v"])
def test_loss_uses_the_models_target(fixture, request, monkeypatch):
    """The loss is zero exactly when the UNet outputs the target of the model's prediction type."""
    model = request.getfixturevalue(fixture)
    latents, noise, t, prompt_eps = random_batch(model, draws=2)
    hidden = torch.randn(4, 77, 32)
    target = model.training_target(latents, noise, t).repeat_interleave(2, dim=0)
    monkeypatch.setattr(model, "predict", lambda noisy, steps, emb: target)
    assert denoising_loss(model, hidden, latents, noise, t, prompt_eps, 5.0).item() == pytest.approx(0.0)
    wrong = noise.repeat_interleave(2, dim=0) if model.prediction_type == "v_prediction" else -target
    monkeypatch.setattr(model, "predict", lambda noisy, steps, emb: wrong)
    assert denoising_loss(model, hidden, latents, noise, t, prompt_eps, 5.0).item() > 0.01


def test_same_noise_and_t_for_the_m_draws(backbone, monkeypatch):
    latents, noise, t, prompt_eps = random_batch(backbone, batch=2, draws=3)
    seen = {}

    def spy(noisy, steps, embeddings):
        seen.update(noisy=noisy, steps=steps, embeddings=embeddings)
        return torch.zeros_like(noisy)

    monkeypatch.setattr(backbone, "predict", spy)
    denoising_loss(backbone, torch.randn(4, 77, 32), latents, noise, t, prompt_eps, 5.0)
    assert seen["noisy"].shape[0] == 6 and torch.equal(seen["noisy"][0], seen["noisy"][2])
    assert torch.equal(seen["steps"], t.repeat_interleave(3))
    assert not torch.equal(seen["embeddings"][0], seen["embeddings"][1])


def test_loss_falls_when_overfitting_two_images(backbone):
    torch.manual_seed(0)
    learner = make_learner(backbone, k=4)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=3e-2, weight_decay=0.0)
    batch = random_batch(backbone, batch=2, draws=2, seed=3)
    losses = []
    for _ in range(40):
        hidden, _ = learner()
        loss = denoising_loss(backbone, hidden, *batch, min_snr_gamma=5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The random tiny UNet depends only weakly on its text input, so the attainable drop is a few per cent.
    assert losses[-1] < losses[0] - 0.015, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 0.8 * (len(losses) - 1)


def test_a_single_prompt_trains_with_finite_gradients(backbone):
    """K=1 (Textual-Inversion-like): zero spread and no orthogonality term, not a NaN at step 1."""
    learner = make_learner(backbone, k=1)
    hidden, eos = learner()
    loss = denoising_loss(backbone, hidden, *random_batch(backbone), min_snr_gamma=5.0) + orthogonality_loss(eos)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(learner.ctx.grad).all() and learner.ctx.grad.abs().sum() > 0


def synthetic_model(backbone, monkeypatch, modes):
    """The UNet replaced by one whose error on latent b is (embedding[0, 0] - modes[b]): a two-mode problem whose
    optimum is known (each reference wants its own prompt value)."""
    def predict(noisy, steps, embeddings):
        per_row = modes.repeat_interleave(len(noisy) // len(modes))
        error = (embeddings[:, 0, 0] - per_row).view(-1, 1, 1, 1)
        return noisy * 0 + error  # the target below is zero: the loss is error^2 per draw

    monkeypatch.setattr(backbone, "predict", predict)
    monkeypatch.setattr(backbone, "training_target", lambda latents, noise, t: torch.zeros_like(latents))


def test_specialise_counts_the_best_draw_only(backbone, monkeypatch):
    synthetic_model(backbone, monkeypatch, torch.tensor([0.0, 0.0]))
    latents, noise, t, prompt_eps = random_batch(backbone, batch=2, draws=2)
    hidden = torch.zeros(2, 77, 32)
    hidden[0, 0, 0], hidden[1, 0, 0] = 0.1, 1.0
    hidden.requires_grad_(True)
    picks = torch.tensor([[0, 1], [1, 0]])
    loss = denoising_loss(backbone, hidden, latents, noise, t, prompt_eps, 0.0, picks, bandwidth=0.0, relax=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.01, rel=1e-4)  # both latents count only prompt 0's error 0.1^2
    assert hidden.grad[0, 0, 0] > 0 and hidden.grad[1].abs().sum() == 0


def test_reference_prompts_split_the_prompts_among_the_images():
    from dd3d.learn import reference_prompts

    owners = torch.tensor([0, 0, 1, 1, 2, 2])  # three images, each with its mirrored view
    split = reference_prompts(owners, 7)
    assert torch.allclose(split.sum(dim=1), torch.ones(3))
    assert split[0].nonzero().flatten().tolist() == [0, 3, 6]  # prompt k belongs to image k mod 3
    assert split[1].nonzero().flatten().tolist() == [1, 4] and split[2].nonzero().flatten().tolist() == [2, 5]
    assert (split > 0).sum(dim=0).tolist() == [1] * 7  # every prompt used, by one image only
    fewer = reference_prompts(owners, 2)  # more images than prompts: image i shares prompt i mod 2
    assert fewer.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_a_shared_base_is_part_of_every_context_and_trains(backbone):
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="a", suffix="")
    learner = PromptLearner(encoder, num_prompts=3, init_std=0.02, seed=0, shared_base=True)
    with torch.no_grad():
        learner.base.fill_(0.5)
    assert torch.equal(learner.contexts, learner.ctx + 0.5)
    hidden, eos = learner()
    assert torch.allclose(hidden, encoder(learner.ctx + 0.5)[0])
    denoising_loss(backbone, hidden, *random_batch(backbone), min_snr_gamma=5.0).backward()
    assert learner.base.grad.abs().sum() > 0 and learner.ctx.grad.abs().sum() > 0
    assert PromptLearner(encoder, 3, 0.02, 0).base is None  # off: the paper's K free contexts


@pytest.mark.parametrize("objective", ["gaussian", "specialise", "per_reference"])
def test_two_mode_references(objective, backbone, monkeypatch):
    """References in two modes (+1 and -1): the paper's Gaussian learns their average, prompts trained with the
    specialise or the per_reference objective split between the two modes."""
    from omegaconf import OmegaConf

    from dd3d.distribution import Mixture
    from dd3d.learn import prompt_shares, reference_prompts, training_losses

    synthetic_model(backbone, monkeypatch, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    hidden = torch.nn.Parameter(0.02 * torch.randn(8, 77, 32, generator=torch.Generator().manual_seed(0)))
    learner = lambda: (hidden, hidden[:, 0])  # noqa: E731  (the encoder is not what this tests)
    cfg = OmegaConf.create({"batch_size": 4, "num_samples": 4, "min_snr_gamma": 0.0, "ortho_weight": 0.0,
                            "objective": objective, "bandwidth": 0.5, "relax": 0.1})
    optimizer = torch.optim.Adam([hidden], lr=0.03)
    latents = torch.zeros(4, 4, 8, 8)
    for step in range(300):
        # fixed order: latent b of the batch is reference b, so modes line up with the synthetic model
        monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))
        loss, _, _ = training_losses(learner, backbone, latents, cfg, torch.Generator().manual_seed(step),
                                     reference_prompts(torch.arange(4), 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    values = hidden.detach()[:, 0, 0]
    if objective == "per_reference":  # prompt k learned from reference k mod 4 alone
        assert (values[0::2] > 0.5).all() and (values[1::2] < -0.5).all(), values
    if objective == "gaussian":
        assert values.mean().abs() < 0.3  # one blended instance between the modes
    else:
        mixture = Mixture.of_prompts(hidden.detach(), 0.5)
        means = torch.stack([c.mean[0, 0] for c in mixture.components])
        assert (means > 0.5).sum() >= 2 and (means < -0.5).sum() >= 2, values  # both modes kept
        # Each prompt's share of the references: half the references want +1, half -1.
        share_cfg = OmegaConf.merge(cfg, {"share_draws": 2, "share_min_t": 0.5})
        shares = prompt_shares(backbone, hidden.detach(), latents, share_cfg, 0)
        assert shares.sum() == pytest.approx(1.0)
        assert shares[values > 0].sum() == pytest.approx(0.5) and shares[values < 0].sum() == pytest.approx(0.5)


def test_prompt_shares_read_the_noisy_half_of_the_schedule(backbone, monkeypatch):
    """share_min_t 0.5: every timestep of the share pass lies in the upper half of the schedule (where colour and
    layout are decided); 0 draws from the whole schedule."""
    from omegaconf import OmegaConf

    from dd3d.learn import prompt_shares

    seen = []
    original = backbone.predict
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, cond: seen.append(t.clone()) or original(noisy, t, cond))
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    for low, check in ((0.5, lambda t: t.min() >= backbone.num_train_timesteps // 2), (0.0, lambda t: t.min() < 400)):
        seen.clear()
        cfg = OmegaConf.create({"share_draws": 4, "share_min_t": low, "min_snr_gamma": 5.0})
        prompt_shares(backbone, hidden, latents, cfg, 0)
        assert check(torch.cat(seen)), low


def test_prompt_shares_do_not_depend_on_how_many_prompts_share_a_unet_call(backbone):
    """The share pass batches (prompt, view) pairs up to `chunk` per call: one prompt per call, two (the last call
    one), and all at once give the same shares, each view credited to its own best prompt."""
    from omegaconf import OmegaConf

    from dd3d.learn import prompt_shares

    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = 3 * torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    cfg = OmegaConf.create({"share_draws": 2, "share_min_t": 0.5, "min_snr_gamma": 5.0})
    shares = [prompt_shares(backbone, hidden, latents, cfg, 0, chunk=chunk) for chunk in (6, 12, 64)]
    assert (shares[0] > 0).sum() >= 2  # the views do not all prefer one prompt: the test can tell them apart
    assert torch.equal(shares[0], shares[1]) and torch.equal(shares[0], shares[2])


def test_prompt_views_pick_the_word_each_prompts_references_denoise_best_with(backbone, monkeypatch):
    """train.view_words: a model whose error on a reference is (word index - the word it shows): each prompt gets the
    word of the reference it was learned from."""
    from omegaconf import OmegaConf

    from dd3d.distribution import VIEWS, PromptDistribution
    from dd3d.learn import prompt_views, reference_prompts

    shown = torch.tensor([2.0, 0.0, 3.0])  # back, front, overhead
    latents = shown.view(3, 1, 1, 1).expand(3, 4, 8, 8).contiguous()
    monkeypatch.setattr(backbone, "add_noise", lambda clean, noise, t: clean)
    monkeypatch.setattr(backbone, "training_target", lambda clean, noise, t: torch.zeros_like(clean))
    monkeypatch.setattr(backbone, "predict", lambda noisy, t, emb: noisy * 0 + (emb[:, 0, 0] - noisy[:, 0, 0, 0])
                        .view(-1, 1, 1, 1))
    dist = PromptDistribution(ctx=torch.zeros(6, 4, 32), prefix="", suffix="", model_id="tiny",
                              fingerprint=backbone.fingerprint)
    monkeypatch.setattr(dist, "encode", lambda backbone, view: torch.full((6, 77, 32), float(VIEWS.index(view))))
    cfg = OmegaConf.create({"share_draws": 2, "share_min_t": 0.5, "min_snr_gamma": 0.0})
    views = prompt_views(backbone, dist, latents, reference_prompts(torch.arange(3), 6), cfg, 0)
    assert views == ("back", "front", "overhead") * 2


def test_view_words_end_the_m_draws_in_turn(backbone):
    """Draw m of a view is its picked prompt encoded with ", <VIEWS[m mod 4]> view" after the template."""
    from dd3d.distribution import VIEWS

    encoders = [SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="a", suffix=f", {w} view")
                for w in VIEWS]
    plain = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="a", suffix="")
    learner = PromptLearner(plain, num_prompts=3, init_std=0.02, seed=0, view_encoders=encoders)
    picks = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 1, 0]])
    drawn = learner.with_view_words(picks)
    assert drawn.shape == (2, 5, 77, 32)
    for b in range(2):
        for m in range(5):
            expected = encoders[m % 4](learner.contexts[picks[b, m]][None])[0][0]
            assert torch.allclose(drawn[b, m], expected, atol=1e-6)
