import pytest
import torch
from safetensors.torch import save_file

from dd3d.cli import UserError
from dd3d.distribution import Gaussian, Mixture, PromptDistribution


def make_distribution(backbone, k=6, seed=0):
    ctx = torch.randn(k, 4, backbone.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PromptDistribution(ctx=ctx, prefix="a", suffix="house", model_id="tiny", fingerprint=backbone.fingerprint)


def test_gaussian_statistics():
    hidden = torch.randn(32, 77, 8) * 3 + 1
    gaussian = Gaussian.from_hidden(hidden)
    assert torch.allclose(gaussian.mean, hidden.mean(0))
    assert torch.allclose(gaussian.std, hidden.std(0))
    draws = gaussian.sample(4000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 77, 8)
    assert torch.allclose(draws.mean(0), gaussian.mean, atol=0.25)
    assert torch.allclose(draws.std(0) / gaussian.std, torch.ones(77, 8), atol=0.1)


def test_std_scale_zero_gives_the_mean():
    gaussian = Gaussian.from_hidden(torch.randn(8, 77, 4))
    draws = gaussian.sample(3, std_scale=0.0)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], gaussian.mean)


def test_save_load_roundtrip_holds_only_ctx_and_metadata(backbone, tmp_path):
    dist = make_distribution(backbone)
    path = tmp_path / "d.safetensors"
    dist.save(path)
    loaded = PromptDistribution.load(path)
    assert torch.equal(loaded.ctx, dist.ctx)
    assert (loaded.prefix, loaded.suffix, loaded.fingerprint) == ("a", "house", backbone.fingerprint)
    assert path.stat().st_size < dist.ctx.numel() * 4 + 4096  # no text encoder inside
    assert list(tmp_path.iterdir()) == [path]  # the temp file of the atomic write is gone


def test_fit_under_edited_template(backbone):
    dist = make_distribution(backbone)
    plain = dist.fit(backbone)
    edited = dist.fit(backbone, prefix="a photo of a", suffix="at night")
    assert plain.mean.shape == (77, 32)
    assert not torch.allclose(plain.mean, edited.mean)


def test_other_text_encoder_is_refused(backbone, backbone_v):
    dist = make_distribution(backbone)
    with pytest.raises(UserError, match="learned for the text encoder"):
        dist.fit(backbone_v)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PromptDistribution.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable"):
        PromptDistribution.load(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"ctx": torch.zeros(2, 2, 2)}, str(foreign))
    with pytest.raises(UserError, match="not a dd3d distribution"):
        PromptDistribution.load(foreign)


def two_mode_hidden(k=32):
    """K prompt encodings in two tight clusters, at -2 and +2 in every channel."""
    generator = torch.Generator().manual_seed(1)
    signs = torch.tensor([-2.0, 2.0]).repeat(k // 2)[:, None, None]
    return signs + 0.05 * torch.randn(k, 77, 8, generator=generator)


def draw(sampler, n=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    eps, uniforms = torch.randn(n, 77, 8, generator=generator), torch.rand(n, generator=generator)
    return sampler.apply(eps, uniforms)[0]


def test_prompt_mixture_keeps_two_modes_apart_where_the_gaussian_blends_them():
    hidden = two_mode_hidden()
    blended = draw(Gaussian.from_hidden(hidden)).mean(dim=(1, 2))
    kept = draw(Mixture.of_prompts(hidden, bandwidth=0.1)).mean(dim=(1, 2))
    # The diagonal Gaussian puts most draws between the modes (the average of 616 channel values lands near 0) ...
    assert (blended.abs() < 1).float().mean() > 0.9
    # ... the mixture draws one mode or the other, about half each.
    assert (kept.abs() > 1.5).all() and 0.4 < (kept > 0).float().mean() < 0.6


def test_prompt_mixture_moments_and_scaling():
    hidden = two_mode_hidden()
    mixture = Mixture.of_prompts(hidden, bandwidth=0.5)
    assert torch.allclose(mixture.weights.sum(), torch.tensor(1.0)) and len(mixture.components) == 32
    assert torch.allclose(mixture.mean, hidden.mean(0), atol=1e-5)
    matched = mixture.moment_matched()
    draws = draw(mixture, 4000)
    assert torch.allclose(draws.mean(0), matched.mean, atol=0.2)
    assert torch.allclose(draws.std(0) / matched.std, torch.ones(77, 8), atol=0.1)
    # std scale 0: one instance (the mean); 1: the mixture itself.
    collapsed = draw(mixture.scaled(0.0), 5)
    assert torch.allclose(collapsed, mixture.mean.expand(5, -1, -1))
    assert torch.allclose(mixture.scaled(1.0).components[3].mean, mixture.components[3].mean, atol=1e-6)


def test_shrink_pulls_each_prompt_towards_the_weighted_mean():
    hidden = torch.stack([torch.full((77, 8), 4.0), torch.zeros(77, 8), torch.zeros(77, 8), torch.zeros(77, 8)])
    shares = torch.tensor([0.25, 0.25, 0.5, 0.0])
    plain = Mixture.of_prompts(hidden, 0.5, shares)
    shrunk = Mixture.of_prompts(hidden, 0.5, shares, shrink=0.25)
    # The shares-weighted mean is 1.0 everywhere; the first prompt (4.0) moves a quarter of the way to it, 3.25.
    assert torch.allclose(shrunk.mean, torch.ones(77, 8)) and torch.allclose(shrunk.weights, plain.weights)
    assert torch.allclose(shrunk.components[0].mean, torch.full((77, 8), 3.25))
    assert torch.allclose(shrunk.components[1].mean, torch.full((77, 8), 0.25))
    assert torch.allclose(shrunk.components[0].std, 0.75 * plain.components[0].std)
    assert torch.allclose(Mixture.of_prompts(hidden, 0.5, shares, shrink=1.0).components[0].mean, shrunk.mean)


def test_shrink_towards_neighbours_keeps_modes_apart():
    # Two modes of three prompts each, at 0 +- 1 and 10 +- 1; the last prompt has no share.
    levels = [-1.0, 0.0, 1.0, 9.0, 10.0, 11.0, 3.5]
    hidden = torch.stack([torch.full((77, 8), v) for v in levels])
    shares = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    local = Mixture.of_prompts(hidden, 0.5, shares, shrink=1.0, neighbours=3)
    centres = [float(c.mean[0, 0]) for c in local.components]
    # Full shrink to each prompt's 3 nearest shared prompts: every prompt lands on its own mode's mean, the shareless
    # one on the nearer mode's; the global shrink puts all on the 5.0 between the modes.
    assert centres == pytest.approx([0.0] * 3 + [10.0] * 3 + [0.0])
    pooled = Mixture.of_prompts(hidden, 0.5, shares, shrink=1.0)
    assert all(float(c.mean[0, 0]) == pytest.approx(5.0) for c in pooled.components)
    # As many neighbours as shared prompts is the global shrink.
    wide = Mixture.of_prompts(hidden, 0.5, shares, shrink=0.3, neighbours=6)
    narrow = Mixture.of_prompts(hidden, 0.5, shares, shrink=0.3)
    assert all(torch.allclose(a.mean, b.mean) for a, b in zip(wide.components, narrow.components))


def test_combined_mixture_flattens_weights():
    a = Mixture.of_prompts(two_mode_hidden(4), 0.5)
    b = Gaussian(torch.zeros(77, 8), torch.ones(77, 8))
    combined = Mixture.combine([a, b], torch.tensor([0.6, 0.4]))
    assert len(combined.components) == 5
    assert torch.allclose(combined.weights, torch.tensor([0.15, 0.15, 0.15, 0.15, 0.4]))


def test_single_prompt_has_zero_spread():
    hidden = torch.randn(1, 77, 8)
    gaussian = Gaussian.from_hidden(hidden)
    assert torch.equal(gaussian.mean, hidden[0]) and not gaussian.std.any()


def test_format_2_round_trip_with_prompt_shares_and_version_1_files_still_load(backbone, tmp_path):
    dist = make_distribution(backbone, k=4)
    dist.weights, dist.sampler = torch.tensor([0.5, 0.5, 0.0, 0.0]), "prompts"
    dist.save(tmp_path / "v2.safetensors")
    loaded = PromptDistribution.load(tmp_path / "v2.safetensors")
    assert torch.equal(loaded.weights, dist.weights) and loaded.sampler == "prompts"
    mixture = loaded.fit(backbone, sampler="auto")
    assert isinstance(mixture, Mixture) and torch.equal(mixture.weights, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # A zero-share prompt is never drawn.
    _, chosen = mixture.apply(torch.zeros(200, 77, 32), torch.rand(200, generator=torch.Generator().manual_seed(0)))
    assert set(chosen.tolist()) == {0, 1}
    # A version-1 file (written before weights and the sampler field) loads as the paper's Gaussian.
    metadata = {"kind": "dd3d-prompt-distribution", "format_version": "1", "prefix": "a", "suffix": "house",
                "num_prompts": "4", "n_ctx": "4", "hidden_size": "32", "model_id": "tiny",
                "text_encoder_fingerprint": backbone.fingerprint, "reference_positions": "false"}
    save_file({"ctx": dist.ctx.contiguous()}, str(tmp_path / "v1.safetensors"), metadata=metadata)
    old = PromptDistribution.load(tmp_path / "v1.safetensors")
    assert old.weights is None and isinstance(old.fit(backbone, sampler="auto"), Gaussian)


def test_prompts_learned_with_view_words_keep_them_unless_a_view_is_named(backbone, tmp_path):
    """Format 3: each prompt's view word round-trips; the training template appends it to that prompt alone, a
    requested view (stage 2's camera) or a suffix that names one replaces it for every prompt."""
    dist = make_distribution(backbone, k=4)
    dist.views = ("front", "back", "front", "overhead")
    dist.save(tmp_path / "v3.safetensors")
    loaded = PromptDistribution.load(tmp_path / "v3.safetensors")
    assert loaded.views == dist.views
    own = loaded.encode(backbone)
    for k, word in enumerate(dist.views):
        alone = loaded.encoder(backbone, suffix=f"house, {word} view")(loaded.ctx[k:k + 1])[0][0]
        assert torch.allclose(own[k], alone, atol=1e-6)
    side = loaded.encoder(backbone, suffix="house, side view")(loaded.ctx)[0]
    assert torch.allclose(loaded.encode(backbone, view="side"), side, atol=1e-6)
    assert torch.allclose(loaded.encode(backbone, suffix="house, side view"), side, atol=1e-6)
    assert torch.allclose(loaded.fit(backbone, view="side").mean, side.mean(0), atol=1e-6)
    dist.views = None  # without view words the training template is the prompt as learned
    assert torch.allclose(dist.encode(backbone), dist.encoder(backbone)(dist.ctx)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prompt_mixture_fitted_on_the_gpu_draws_what_the_cpu_one_draws():
    # The encoder runs on the GPU there, so the mixture's components live there while its weights stay on the CPU.
    hidden, shares = two_mode_hidden(8), torch.tensor([1.0, 2.0, 1.0, 0.0, 1.0, 1.0, 3.0, 1.0])
    cpu = Mixture.of_prompts(hidden, 0.5, shares, shrink=0.3, neighbours=3)
    gpu = Mixture.of_prompts(hidden.cuda(), 0.5, shares, shrink=0.3, neighbours=3)
    assert gpu.components[0].mean.is_cuda and not gpu.weights.is_cuda
    assert gpu.spread_uniform(0.3) == pytest.approx(cpu.spread_uniform(0.3))
    for (a, b) in zip(gpu.neighbour_uniforms(0.4, 3), cpu.neighbour_uniforms(0.4, 3)):
        assert torch.allclose(a, b)
    assert torch.allclose(draw(gpu, 50).cpu(), draw(cpu, 50), atol=1e-5)
    pooled = Mixture.of_prompts(hidden.cuda(), 0.5, shares, shrink=0.3)
    assert torch.allclose(pooled.mean.cpu(), Mixture.of_prompts(hidden, 0.5, shares, shrink=0.3).mean, atol=1e-5)
