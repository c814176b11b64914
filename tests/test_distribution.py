import pytest
import torch
from safetensors.torch import save_file

from dd3d.cli import UserError
from dd3d.distribution import Gaussian, PromptDistribution


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
