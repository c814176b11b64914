import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from dd3d.backbone import DEFAULT_MODEL, Backbone, generate, make_pipeline, resolve_model_source
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


def test_guidance_interval_guides_only_the_steps_inside_it(backbone, monkeypatch):
    """Over the whole schedule it is plain CFG; with no step inside, the prompt alone (guidance 1); in between, the
    UNet sees the empty prompt's branch exactly at the steps whose t/T is inside the interval (and the prompt's
    alone, half the batch, at the others)."""
    pipeline = make_pipeline(backbone)
    prompt = backbone.encode_text(["a red house", "a blue mug"])
    empty = backbone.encode_text([""])
    unet_forward, guided = pipeline.unet.forward, {}

    def recording_forward(sample, timestep, encoder_hidden_states, **kwargs):
        if len(encoder_hidden_states) == 2 * len(prompt):
            assert torch.equal(encoder_hidden_states[: len(prompt)], empty.expand(len(prompt), -1, -1))
        guided[int(timestep)] = len(encoder_hidden_states) == 2 * len(prompt)
        return unet_forward(sample, timestep, encoder_hidden_states, **kwargs)

    def images(guidance, interval=(0.0, 1.0)):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        out = generate(pipeline, prompt, empty, 4, guidance, generators, 16, interval)
        return np.stack([np.asarray(image, dtype=np.int16) for image in out])

    plain, prompt_alone = images(7.5), images(1.0)
    assert np.abs(plain - prompt_alone).max() > 8
    assert np.array_equal(images(7.5, (0.0, 1.0)), plain)
    assert np.abs(images(7.5, (0.0, 0.0)) - prompt_alone).max() <= 1  # the steps are t = 751, 501, 251, 1
    assert np.array_equal(images(1.0, (0.2, 0.6)), prompt_alone)  # scale 1: nothing to guide inside either
    monkeypatch.setattr(pipeline.unet, "forward", recording_forward)
    images(7.5, (0.2, 0.6))
    assert guided == {751: False, 501: True, 251: True, 1: False}
