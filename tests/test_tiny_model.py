"""The shipped embedded default model and its oracle: offline loading, generation quality, oracle accuracy."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dd3d.backbone import DEFAULT_MODEL, Backbone
from dd3d.tiny.oracle import Oracle, accuracy
from dd3d.tiny.quality import generate_images, measure_quality
from dd3d.tiny.train import folder_size
from dd3d.tiny.world import COLOUR_NAMES, KINDS, caption, render_dataset

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model_index.json").is_file(),
    reason=f"the embedded default model is not installed at {DEFAULT_MODEL} (train it: scripts/train_tiny_backbone.py)",
)


@pytest.fixture(scope="module")
def pipeline():
    return StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load()


def test_loads_offline_through_both_loaders(pipeline):
    assert isinstance(pipeline.tokenizer, CLIPTokenizer) and len(pipeline.tokenizer) == 49408
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    backbone = Backbone.load(None)
    assert backbone.model_id == "embedded-default"
    assert backbone.resolution == 32 and backbone.prediction_type == "epsilon"
    assert backbone.text_encoder.config.hidden_size == pipeline.text_encoder.config.hidden_size
    files = [p for p in DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")], "weights are safetensors only"
    assert folder_size(DEFAULT_MODEL) <= 40 * 2**20
    assert (DEFAULT_MODEL / "README.md").is_file()


def test_reported_quality_meets_the_bars():
    metrics = json.loads((DEFAULT_MODEL / "metrics.json").read_text())
    plain, view = metrics["quality"]["plain"], metrics["quality"]["view"]
    assert plain["images"] >= len(KINDS) * len(COLOUR_NAMES)
    assert plain["kind_accuracy"] >= 0.8 and plain["colour_accuracy"] >= 0.8
    assert view["view_accuracy"] >= 0.6


def test_generation_quality_smoke(pipeline, oracle):
    """One image for every kind and colour ("a <colour> <kind>"), and for every kind, colour and view
    ("..., <view> view" cycling the views), few DDIM steps; the bars with a margin of ten points."""
    torch.manual_seed(0)
    quality = measure_quality(pipeline, oracle, images_per_prompt=1, steps=15, guidance=7.5, seed=11,
                              cycle_views=True)
    assert quality["plain"]["kind_accuracy"] >= 0.7, quality["plain"]
    assert quality["plain"]["colour_accuracy"] >= 0.7, quality["plain"]
    assert quality["view"]["view_accuracy"] >= 0.5, quality["view"]


def test_prompt_changes_the_image(pipeline, oracle):
    prompts = [caption("house", "red"), caption("car", "blue"), caption("duck", "yellow"), caption("mug", "green")]
    images = generate_images(pipeline, prompts, steps=15, guidance=7.5, seed=5)
    assert images[0].size == (32, 32)
    labels = oracle.classify(images)
    hits = sum(k == want for k, want in zip(labels["kind"], ["house", "car", "duck", "mug"]))
    hits += sum(c == want for c, want in zip(labels["colour"], ["red", "blue", "yellow", "green"]))
    assert hits >= 6, labels


def test_oracle_accuracy_on_fresh_renders(oracle):
    data = render_dataset(96, seed=20240, resolution=oracle.resolution)
    scores = accuracy(oracle, data)
    assert scores["kind"] >= 0.9 and scores["colour"] >= 0.95 and scores["view"] >= 0.65, scores
    reported = oracle.metrics["heldout_accuracy"]
    assert reported["kind"] >= 0.9 and reported["colour"] >= 0.95
