"""The embedded model's training script, on a toy-sized recipe: runs end to end, resumes exactly, refuses mixes."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dd3d.cli import UserError
from dd3d.tiny.oracle import Oracle
from dd3d.tiny.recipe import Recipe
from dd3d.tiny.train import Trainer, main

TOY_ARCHITECTURE = dict(width=32, image_size=16, unet_channels=(32, 64), unet_attention=(True, True), unet_heads=2,
                        vae_channels=(16, 32), vae_mid_attention=False)
TOY_VALUES = dict(
    train_images=48, heldout_images=16, resolution=16, oracle_steps=2, oracle_batch=8, oracle_other_images=20,
    vae_steps=2, vae_batch=4,
    unet_steps=2, unet_restart_steps=1, unet_restart_cycles=2, unet_batch=4, warmup_steps=1, checkpoint_every=2,
    unet_tail_steps=0,  # trained without the tail, which --continue-unet adds
    eval_images_per_prompt=1, eval_steps=1,
)
TOY = [f"{key}={value}" for key, value in TOY_VALUES.items()] + [
    f"architecture.{key}={list(value) if isinstance(value, tuple) else value}"
    for key, value in TOY_ARCHITECTURE.items()
]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-train")
    out, model = root / "work", root / "model"
    main(["--out", str(out), "--model-dir", str(model), "--threads", "2", *TOY])
    return out, model


def test_end_to_end_writes_a_loadable_model(toy_run):
    out, model = toy_run
    pipeline = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipeline.unet.config.sample_size == 8 and pipeline.text_encoder.config.num_hidden_layers == 3
    assert Oracle.load(model).resolution == 16
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["quality"]["plain"]["images"] == 56 and "view_accuracy" in metrics["quality"]["view"]
    assert set(metrics["timings_s"]) >= {"render", "oracle", "vae", "encode", "unet", "evaluate"}
    card = (model / "README.md").read_text()
    assert "Measured quality" in card and "house" in card
    assert not list(model.parent.glob(".model.*")), "no staging folder left behind"
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "unet.ckpt").is_file()


def test_model_card_is_regenerated_from_metrics(toy_run):
    _, model = toy_run
    card = (model / "README.md").read_text()
    (model / "README.md").unlink()
    main(["--model-card", "--model-dir", str(model)])
    assert (model / "README.md").read_text() == card


def test_retrain_oracle_keeps_the_pipeline_and_its_training_record(toy_run, tmp_path):
    """--retrain-oracle writes a new oracle (with the kind "other") beside the same pipeline weights, keeps the
    pipeline's recipe and training times, and records the oracle's own recipe."""
    _, model = toy_run
    before = json.loads((model / "metrics.json").read_text())
    unet = StableDiffusionPipeline.from_pretrained(str(model)).unet.state_dict()
    main(["--retrain-oracle", "--out", str(tmp_path / "work"), "--model-dir", str(model), *TOY, "oracle_steps=3",
          "oracle_unlit_share=0.5"])
    after = json.loads((model / "metrics.json").read_text())
    assert after["timings_s"] == before["timings_s"] and "retrained alone" in after["timing_note"]
    assert after["recipe"]["oracle_steps"] == 3 and after["recipe"]["unet_steps"] == before["recipe"]["unet_steps"]
    assert "kind" in after["oracle_heldout_other_accuracy"] and "kind" in after["oracle_heldout_unlit_accuracy"]
    assert Oracle.load(model).labels["kind"][-1] == "other"
    again = StableDiffusionPipeline.from_pretrained(str(model)).unet.state_dict()
    assert all(torch.equal(unet[k], again[k]) for k in unet)
    with pytest.raises(UserError, match="needs a trained model"):
        main(["--retrain-oracle", "--out", str(tmp_path / "w2"), "--model-dir", str(tmp_path / "none"), *TOY])
    assert not (tmp_path / "w2").exists()


def test_rerun_needs_resume_and_the_same_recipe(toy_run):
    out, model = toy_run
    with pytest.raises(UserError, match="already holds a run"):
        main(["--out", str(out), "--model-dir", str(model), *TOY])
    with pytest.raises(UserError, match="another recipe"):
        main(["--out", str(out), "--model-dir", str(model), *TOY, "seed=1", "resume=true"])
    with pytest.raises(UserError, match="not of the form"):
        main(["--out", str(out), *TOY, "steps"])


def test_unet_schedule_warm_restart():
    recipe = Recipe(unet_steps=1000, unet_restart_steps=500, unet_restart_cycles=2, unet_restart_lr_factor=0.5,
                    warmup_steps=100)
    assert recipe.unet_total_steps == 2000
    assert recipe.unet_lr_factor(0) == pytest.approx(0.01) and recipe.unet_lr_factor(99) == pytest.approx(1.0)
    assert recipe.unet_lr_factor(999) == pytest.approx(0.1, abs=1e-4)
    for cycle_start in (1000, 1500):
        assert recipe.unet_lr_factor(cycle_start) == pytest.approx(0.5)
        assert recipe.unet_lr_factor(cycle_start + 250) == pytest.approx(0.3)
        assert recipe.unet_lr_factor(cycle_start + 499) == pytest.approx(0.1, abs=1e-4)
    assert Recipe(unet_steps=1000, unet_restart_cycles=0).unet_total_steps == 1000


def test_unet_training_resumes_exactly(tmp_path, toy_run):
    """Two steps, a 'kill', two more on resume == four steps in one go."""
    out, _ = toy_run
    data = torch.load(out / "data" / "train.pt")
    latents = torch.load(out / "data" / "latents.pt")["latents"]
    recipe = Recipe(**_toy_recipe())  # 2 steps of the first cycle, then two 1-step restarts

    def weights(work, stops):
        from dd3d.tiny.build import build_tiny_pipeline

        for stop in stops:
            pipeline = build_tiny_pipeline(seed=recipe.seed, **recipe.architecture)
            trainer = Trainer(work, recipe, tmp_path / "unused")
            original = trainer._unet_loop

            def limited(*args, stop=stop, **kwargs):
                return original(*args, until=stop)

            trainer._unet_loop = limited
            trainer.train_unet(pipeline, data, latents)
        return pipeline.unet.state_dict()

    straight = weights(tmp_path / "a", [4])
    resumed = weights(tmp_path / "b", [2, 4])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_unet_tail_resumes_exactly_and_keeps_the_text_encoder(tmp_path, toy_run):
    """The UNet-alone tail: two steps, a 'kill', two more on resume == four in one go; the text encoder (what a
    learned prompt distribution depends on) is untouched while the UNet moves."""
    out, model = toy_run
    data, heldout = torch.load(out / "data" / "train.pt"), torch.load(out / "data" / "heldout.pt")
    recipe = Recipe(**{**_toy_recipe(), "unet_tail_steps": 4, "unet_tail_warmup": 1, "checkpoint_every": 2})

    def tail(work, stops):
        for stop in stops:
            pipeline = StableDiffusionPipeline.from_pretrained(str(model))
            trainer = Trainer(work, recipe, tmp_path / "unused")
            latents = trainer.encode(pipeline.vae, data, scaling=pipeline.vae.config.scaling_factor)
            losses = trainer.train_unet_tail(pipeline, data, latents, heldout, until=stop)
        return pipeline, losses

    (straight, losses), (resumed, _) = tail(tmp_path / "a", [4]), tail(tmp_path / "b", [2, 4])
    before = StableDiffusionPipeline.from_pretrained(str(model))
    for name in ("unet", "text_encoder"):
        a, b, c = (getattr(p, name).state_dict() for p in (straight, resumed, before))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: resuming changed the result"
        moved = any(not torch.equal(a[k], c[k]) for k in a)
        assert moved == (name == "unet"), f"{name} moved: {moved}"
    assert set(losses["unet_tail_heldout_loss"]) == {"0", "4"}


def test_continue_unet_records_the_tail_beside_the_models_training(toy_run, tmp_path):
    """--continue-unet on a finished model: the text encoder, VAE and oracle are kept, the recipe is the model's with
    the tail's keys, the card says so, and a second tail is refused."""
    _, model = toy_run
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    tail = ["--continue-unet", "--out", str(tmp_path / "work"), "--model-dir", str(copy), "--threads", "2", *TOY,
            "unet_tail_steps=2", "unet_tail_warmup=1"]
    main(tail)
    metrics = json.loads((copy / "metrics.json").read_text())
    previous = json.loads((model / "metrics.json").read_text())
    assert metrics["recipe"] == {**previous["recipe"], "unet_tail_steps": 2, "unet_tail_warmup": 1}
    assert metrics["timings_s"] == previous["timings_s"] and "--continue-unet" in metrics["timing_note"]
    assert set(metrics["unet_tail_heldout_loss"]) == {"0", "2"}
    assert "the UNet alone, the text encoder frozen" in (copy / "README.md").read_text()
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "oracle.safetensors"):
        assert (copy / part).read_bytes() == (model / part).read_bytes(), part
    assert (copy / "unet/diffusion_pytorch_model.safetensors").read_bytes() != (
        model / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already"):
        main([*tail[:2], str(tmp_path / "again"), *tail[3:]])
    assert not (tmp_path / "again").exists(), "a refused run writes nothing"


def _toy_recipe() -> dict:
    return {**TOY_VALUES, "architecture": {**Recipe().architecture, **TOY_ARCHITECTURE}}
