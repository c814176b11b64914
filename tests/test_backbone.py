import pytest
import torch
from diffusers import StableDiffusionPipeline

from dd3d.backbone import DEFAULT_MODEL, Backbone, resolve_model_source
from dd3d.cli import UserError


def test_loads_local_folder(backbone, tiny_model):
    assert backbone.resolution == 16
    assert backbone.prediction_type == "epsilon"
    assert not any(p.requires_grad for m in (backbone.unet, backbone.vae, backbone.text_encoder) for p in m.parameters())
    # The same folder opens with the stock diffusers pipeline, offline.
    assert isinstance(StableDiffusionPipeline.from_pretrained(tiny_model), StableDiffusionPipeline)


def test_encode_decode_shapes(backbone):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = backbone.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert backbone.decode_latents(latents).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("fixture", ["backbone", "backbone_v"])
def test_target_and_eps_conversion_agree(fixture, request):
    model = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    noisy = model.add_noise(latents, noise, t)
    target = model.training_target(latents, noise, t)
    if model.prediction_type == "v_prediction":
        alpha_bar = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        assert torch.allclose(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    else:
        assert torch.equal(target, noise)
    # A perfect prediction of the target converts back to the true noise.
    assert torch.allclose(model.eps_from_prediction(target, noisy, t), noise, atol=1e-5)


def test_fingerprint_identifies_text_encoder(tiny_model, tiny_model_v, backbone, backbone_v):
    assert backbone.fingerprint != backbone_v.fingerprint
    half = Backbone.load(tiny_model, dtype=torch.bfloat16)
    assert half.fingerprint == backbone.fingerprint
    assert half.unet.dtype == torch.bfloat16


def test_bad_model_sources(tmp_path):
    with pytest.raises(UserError, match="neither an existing folder nor a hub id"):
        resolve_model_source(tmp_path / "nope")
    with pytest.raises(UserError, match="not a diffusers"):
        resolve_model_source(tmp_path)
    with pytest.raises(UserError, match="cannot load model"):
        Backbone.load("nobody/no-such-model")  # offline: one clear error, no hub traceback
    if not (DEFAULT_MODEL / "model_index.json").exists():
        with pytest.raises(UserError, match="embedded default model"):
            resolve_model_source(None)
