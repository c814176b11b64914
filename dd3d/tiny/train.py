"""Train the embedded default model from scratch on the procedural world, and its oracle; the command line of
scripts/train_tiny_backbone.py.

Stages of a `Recipe` (`dd3d.tiny.recipe`), each resumable (its results and checkpoints live in the work folder, written
atomically):
  1. render the training set and a held-out set (`dd3d.tiny.world`)
  2. train the oracle (kind / colour / view classifier, `dd3d.tiny.oracle`) and measure it on the held-out renders
  3. train the VAE (AutoencoderKL) on the training images; set its latent scaling factor
  4. encode the training images to latents once
  5. train the text encoder (CLIPTextModel) and the UNet (UNet2DConditionModel) jointly, with EMA weights; then,
     if the recipe has unet_tail_steps, the UNet alone with the text encoder frozen (also on a finished model:
     --continue-unet)
  6. export a StableDiffusionPipeline folder (EMA weights) with the oracle beside it, measure the quality bars with
     the oracle (`dd3d.tiny.quality`), write metrics.json and the model card (`dd3d.tiny.model_card`), then move the
     folder into place in one step

Every random draw is a function of (seed, stage, step), so a killed run resumes to the same result. The command line
also rewrites the model card alone, or the bundled reference sets (`dd3d.tiny.reference_sets`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

from dd3d.backbone import DEFAULT_MODEL
from dd3d.cli import UserError
from dd3d.files import atomic_write
from dd3d.progress import tqdm
from dd3d.tiny import oracle as oracle_lib
from dd3d.tiny.build import build_tiny_pipeline
from dd3d.tiny.model_card import hardware, rewrite_model_card, write_model_card
from dd3d.tiny.quality import measure_quality
from dd3d.tiny.recipe import RUN_KEYS, Recipe, keyed_generator, load_recipe
from dd3d.tiny.reference_sets import REFERENCE_SETS, REFS_DIR, write_reference_set
from dd3d.tiny.world import BLOBS, captions_for, render_dataset

OTHER_SCALES = (0.4, 1.25)  # featureless shapes from smaller than any object to the largest


def _save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Trainer:
    """The stages above over one work folder."""

    def __init__(self, work: Path, recipe: Recipe, model_dir: Path = DEFAULT_MODEL, device: str = "cpu", log=print):
        self.work = Path(work)
        self.device = torch.device(device)
        self.recipe = recipe
        self.model_dir = Path(model_dir)
        self.log = log
        self.timings: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self.work.mkdir(parents=True, exist_ok=True)
        timings_file = self.work / "timings.json"
        if timings_file.exists():
            self.timings = json.loads(timings_file.read_text())

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        self._since[name] = time.time()

    def _tick(self, name: str) -> None:
        """Add the time since the last start or tick of stage `name` to timings.json (kept across resumes)."""
        now = time.time()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._since.get(name, now)
        self._since[name] = now
        atomic_write(self.work / "timings.json", lambda tmp: tmp.write_text(json.dumps(self.timings, indent=2)))

    def check_recipe(self) -> None:
        """A work folder belongs to one recipe (its config.yaml): resuming with another one is refused."""
        saved = self.work / "config.yaml"
        current = json.loads(json.dumps(asdict(self.recipe)))
        if saved.exists():
            previous = OmegaConf.to_container(OmegaConf.load(saved))
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise UserError(
                    f"{self.work} holds a run with another recipe (differs in: {', '.join(changed)}); "
                    "pass overwrite=true to start over or use another --out"
                )
        else:
            atomic_write(saved, lambda tmp: OmegaConf.save(OmegaConf.create(current), tmp))

    def run(self) -> dict:
        self.check_recipe()
        train, heldout = self.render()
        oracle = self.train_oracle(train, heldout)
        pipeline = build_tiny_pipeline(prediction_type=self.recipe.prediction_type, seed=self.recipe.seed,
                                       **self.recipe.architecture)
        self.train_vae(pipeline.vae, train)
        latents = self.encode(pipeline.vae, train)
        self.train_unet(pipeline, train, latents)
        tail = self.train_unet_tail(pipeline, train, latents, heldout)
        return self.export(pipeline, oracle, heldout, extra=tail)

    def retrain_oracle(self) -> dict:
        """Only the oracle, beside the pipeline already in model_dir (its weights kept); the quality bars re-measured
        with the new oracle. The recorded recipe and timings are the pipeline's, with the oracle's updated."""
        previous = json.loads((self.model_dir / "metrics.json").read_text())
        train, heldout = self.render()
        oracle = self.train_oracle(train, heldout)
        pipeline = StableDiffusionPipeline.from_pretrained(str(self.model_dir))
        return self.export(pipeline, oracle, heldout, previous, "oracle")

    def continue_unet(self) -> dict:
        """Only the UNet's tail (recipe.unet_tail_steps) on the model already in model_dir: its VAE, text encoder and
        oracle kept, the quality bars re-measured. The recorded recipe is the model's with the tail's keys updated."""
        previous = json.loads((self.model_dir / "metrics.json").read_text())
        train = self._cached_render("train", self.recipe.train_images, 1, True, {})
        heldout = self._cached_render("heldout", self.recipe.heldout_images, 2, True, {})
        pipeline = StableDiffusionPipeline.from_pretrained(str(self.model_dir))
        latents = self.encode(pipeline.vae, train, scaling=pipeline.vae.config.scaling_factor)
        tail = self.train_unet_tail(pipeline, train, latents, heldout)
        return self.export(pipeline, oracle_lib.Oracle.load(self.model_dir), heldout, previous, "unet_tail", tail)

    # --- 1. data -----------------------------------------------------------------------------------------------
    def render(self) -> tuple[dict, dict]:
        """The training and held-out renders (the held-out ones with another seed), each with the same scenes unlit
        as "unlit_images" when the oracle learns from unlit images."""
        unlit = self.recipe.oracle_unlit_share > 0
        train = self._rendered("train", self.recipe.train_images, 1, unlit)
        return train, self._rendered("heldout", self.recipe.heldout_images, 2, unlit)

    def _rendered(self, name: str, count: int, offset: int, unlit: bool, **scene_kwargs) -> dict:
        """render_dataset(count, seed * 1000 + offset, ...), plus the same scenes unlit as "unlit_images"."""
        data = self._cached_render(name, count, offset, True, scene_kwargs)
        if unlit:
            data["unlit_images"] = self._cached_render(f"{name}-unlit", count, offset, False, scene_kwargs)["images"]
        return data

    def _cached_render(self, name: str, count: int, offset: int, lit: bool, scene_kwargs: dict) -> dict:
        path = self.work / "data" / f"{name}.pt"
        if not path.exists():
            self._start("render")
            with tqdm(total=count, desc=f"render {name}", unit="img") as bar:
                data = render_dataset(count, self.recipe.seed * 1000 + offset, self.recipe.resolution,
                                      progress=bar.update, device=self.device, lit=lit, **scene_kwargs)
            _save_torch(path, data)
            self._tick("render")
        return torch.load(path)

    # --- 2. oracle ---------------------------------------------------------------------------------------------
    def train_oracle(self, train: dict, heldout: dict) -> oracle_lib.Oracle:
        folder = self.work / "oracle"
        if not (folder / oracle_lib.CONFIG_NAME).exists():
            unlit, count = self.recipe.oracle_unlit_share > 0, self.recipe.oracle_other_images
            if count:  # featureless shapes, the kind OTHER
                others = [oracle_lib.as_other(self._rendered(name, n, offset, unlit, kinds=BLOBS,
                                                             scale_range=OTHER_SCALES))
                          for name, n, offset in (("other", count, 3), ("other-heldout", count // 10, 4))]
                train = {key: torch.cat([train[key], others[0][key]]) for key in others[0]}
            self._start("oracle")
            with tqdm(total=self.recipe.oracle_steps, desc="oracle") as bar:
                def progress(loss):
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                oracle = oracle_lib.train_oracle(train, self.recipe.oracle_steps, self.recipe.oracle_batch,
                                                 self.recipe.oracle_lr, self.recipe.seed, self.recipe.oracle_width,
                                                 unlit_share=self.recipe.oracle_unlit_share, progress=progress,
                                                 device=self.device)
            metrics = {"heldout_accuracy": oracle_lib.accuracy(oracle, heldout), "heldout_images": len(heldout["kind"])}
            if unlit:
                metrics["heldout_unlit_accuracy"] = oracle_lib.accuracy(oracle, heldout, images="unlit_images")
            if count:
                metrics["heldout_other_accuracy"] = oracle_lib.accuracy(oracle, others[1])
            oracle.cpu().save(folder, metrics)
            self._tick("oracle")
        oracle = oracle_lib.Oracle.load(folder)
        self.log(f"oracle accuracy on held-out renders: {oracle.metrics['heldout_accuracy']}")
        return oracle

    # --- 3. VAE ------------------------------------------------------------------------------------------------
    def train_vae(self, vae, train: dict) -> None:
        recipe, path = self.recipe, self.work / "checkpoints" / "vae.ckpt"
        with torch.no_grad():  # start with small posterior noise: a decoder fed noisy latents learns slowly
            vae.quant_conv.bias[vae.config.latent_channels :] = recipe.vae_initial_logvar
        vae.to(self.device)
        optimiser = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=recipe.weight_decay)
        step = 0
        if path.exists():
            state = torch.load(path, map_location=self.device)
            vae.load_state_dict(state["vae"])
            optimiser.load_state_dict(state["optimiser"])
            step = state["step"]
        if step >= recipe.vae_steps:
            return
        self._start("vae")
        vae.train()
        images = train["images"]
        with tqdm(total=recipe.vae_steps, initial=step, desc="vae") as bar:
            while step < recipe.vae_steps:
                generator = keyed_generator(recipe.seed, 3, step)
                index = torch.randint(len(images), (recipe.vae_batch,), generator=generator)
                pixels = oracle_lib.as_pixels(images[index]).to(self.device)
                posterior = vae.encode(pixels).latent_dist
                noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
                latents = posterior.mean + posterior.std * noise
                decoded = vae.decode(latents).sample
                loss = F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels)
                # Colours are labels here: weigh the error of 4x4-pixel averages so they come right early.
                loss = loss + recipe.vae_colour_weight * F.mse_loss(F.avg_pool2d(decoded, 4), F.avg_pool2d(pixels, 4))
                loss = loss + recipe.vae_kl_weight * posterior.kl().mean()
                for group in optimiser.param_groups:
                    group["lr"] = recipe.vae_lr * recipe.vae_lr_factor(step)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
                optimiser.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if step % recipe.checkpoint_every == 0 or step == recipe.vae_steps:
                    _save_torch(path, {"vae": vae.state_dict(), "optimiser": optimiser.state_dict(), "step": step})
                    self._tick("vae")
        vae.eval()
        self._tick("vae")

    # --- 4. latents --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, vae, data: dict, name: str = "latents", scaling: float | None = None) -> torch.Tensor:
        """Posterior means of all images of `data`, scaled by `scaling`; None (the training set of a new VAE): by 1 /
        their std, which becomes the VAE's scaling factor."""
        path = self.work / "data" / f"{name}.pt"
        if path.exists():
            saved = torch.load(path)
            vae.register_to_config(scaling_factor=saved["scaling_factor"])
            return saved["latents"]
        self._start("encode")
        vae.eval()
        means = [vae.encode(oracle_lib.as_pixels(chunk).to(self.device)).latent_dist.mean.cpu()
                 for chunk in data["images"].split(256)]
        latents = torch.cat(means)
        scaling = float(1.0 / latents.std()) if scaling is None else scaling
        vae.register_to_config(scaling_factor=scaling)
        latents = latents * scaling
        _save_torch(path, {"latents": latents, "scaling_factor": scaling})
        self._tick("encode")
        self.log(f"VAE latent scaling factor {scaling:.4f}")
        return latents

    # --- 5. text encoder + UNet ----------------------------------------------------------------------------------
    def train_unet(self, pipeline: StableDiffusionPipeline, train: dict, latents: torch.Tensor) -> None:
        recipe, path = self.recipe, self.work / "checkpoints" / "unet.ckpt"
        unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
        modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).to(self.device)
        optimiser = torch.optim.AdamW(
            [{"params": unet.parameters(), "lr": recipe.unet_lr}, {"params": text_encoder.parameters(),
                                                                   "lr": recipe.text_lr}],
            weight_decay=recipe.weight_decay,
        )
        ema = copy.deepcopy(modules).requires_grad_(False)
        step = 0
        if path.exists():
            state = torch.load(path, map_location=self.device)
            modules.load_state_dict(state["modules"])
            ema.load_state_dict(state["ema"])
            optimiser.load_state_dict(state["optimiser"])
            step = state["step"]
        if step < recipe.unet_total_steps:
            self._start("unet")
            self._unet_loop(modules, ema, optimiser, tokenizer, pipeline.scheduler, train, latents, step, path)
            self._tick("unet")
        modules.load_state_dict(ema.state_dict())  # the exported model carries the EMA weights
        modules.eval()

    def _unet_loop(self, modules, ema, optimiser, tokenizer, scheduler, train, latents, step, path,
                   until: int | None = None) -> int:
        """Train from `step` to the recipe's last step (or `until`); returns the step reached."""
        recipe = self.recipe
        until = recipe.unet_total_steps if until is None else min(until, recipe.unet_total_steps)
        unet, text_encoder = modules["unet"], modules["text_encoder"]
        device = self.device
        task = DenoisingTask(recipe, scheduler, device)
        token_cache: dict[str, torch.Tensor] = {}

        def tokenize(texts: list[str]) -> torch.Tensor:
            for text in set(texts) - token_cache.keys():
                token_cache[text] = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids[0]
            return torch.stack([token_cache[text] for text in texts]).to(device)

        modules.train()
        ema_params = list(ema.parameters())
        live_params = list(modules.parameters())
        with tqdm(total=recipe.unet_total_steps, initial=step, desc="text encoder + unet") as bar:
            while step < until:
                texts, noisy, t, target = task.batch(5, step, train, latents)
                hidden = text_encoder(tokenize(texts)).last_hidden_state
                loss = task.loss(unet(noisy, t, encoder_hidden_states=hidden).sample, target, t)
                factor = recipe.unet_lr_factor(step)
                for group, base in zip(optimiser.param_groups, (recipe.unet_lr, recipe.text_lr)):
                    group["lr"] = base * factor
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(live_params, recipe.grad_clip)
                optimiser.step()
                step += 1
                decay = min(recipe.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1 - decay)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if step % recipe.checkpoint_every == 0 or step == recipe.unet_total_steps:
                    state = {"modules": modules.state_dict(), "ema": ema.state_dict(),
                             "optimiser": optimiser.state_dict(), "step": step}
                    _save_torch(path, state)
                    self._tick("unet")
        return step

    # --- 5b. the UNet alone, the text encoder frozen --------------------------------------------------------------
    def train_unet_tail(self, pipeline: StableDiffusionPipeline, train: dict, latents: torch.Tensor,
                        heldout: dict, until: int | None = None) -> dict:
        """recipe.unet_tail_steps more steps of the UNet alone from its exported (EMA) weights, the text encoder
        frozen: the text encoder, and so every prompt distribution learned on the model, stays as it is. Returns
        {"unet_tail_heldout_loss": {step: ...}}: the EMA weights' denoising error on the held-out renders (fixed
        draws) before the tail and every TAIL_EVAL_EVERY steps; {} without a tail. `until`: stop at that step (the
        pipeline's UNet then holds the live weights, not the EMA)."""
        recipe, path = self.recipe, self.work / "checkpoints" / "unet-tail.ckpt"
        if not recipe.unet_tail_steps:
            return {}
        device = self.device
        unet = pipeline.unet.to(device)
        encode_text = CaptionEncoder(pipeline.tokenizer, pipeline.text_encoder.to(device).requires_grad_(False))
        task = DenoisingTask(recipe, pipeline.scheduler, device)
        heldout_latents = self.encode(pipeline.vae, heldout, "heldout-latents", pipeline.vae.config.scaling_factor)
        ema = copy.deepcopy(unet).requires_grad_(False)
        optimiser = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=recipe.weight_decay)
        step, losses = 0, {}
        if path.exists():
            state = torch.load(path, map_location=device)
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            optimiser.load_state_dict(state["optimiser"])
            step, losses = state["step"], state["heldout_loss"]
        else:
            losses["0"] = task.heldout_loss(unet, heldout, heldout_latents, encode_text)
        self._start("unet_tail")
        unet.train()
        ema_params, live_params = list(ema.parameters()), list(unet.parameters())
        with tqdm(total=recipe.unet_tail_steps, initial=step, desc="unet alone") as bar:
            while step < (recipe.unet_tail_steps if until is None else until):
                texts, noisy, t, target = task.batch(7, step, train, latents)
                loss = task.loss(unet(noisy, t, encoder_hidden_states=encode_text(texts)).sample, target, t)
                for group in optimiser.param_groups:
                    group["lr"] = recipe.unet_lr * recipe.unet_tail_lr_factor(step)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(live_params, recipe.grad_clip)
                optimiser.step()
                step += 1
                with torch.no_grad():  # the EMA starts from trained weights: no warm-up of its decay
                    torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1 - recipe.ema_decay)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if step % TAIL_EVAL_EVERY == 0 or step == recipe.unet_tail_steps:
                    losses[str(step)] = task.heldout_loss(ema, heldout, heldout_latents, encode_text)
                    self.log(f"unet alone, step {step}: held-out denoising error {losses[str(step)]:.5f}")
                if step % recipe.checkpoint_every == 0 or step == recipe.unet_tail_steps:
                    state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                             "step": step, "heldout_loss": losses}
                    _save_torch(path, state)
                    self._tick("unet_tail")
        if step == recipe.unet_tail_steps:
            unet.load_state_dict(ema.state_dict())  # the exported model carries the EMA weights
        unet.eval()
        return {"unet_tail_heldout_loss": losses}

    # --- 6. export and measure ---------------------------------------------------------------------------------
    def export(self, pipeline: StableDiffusionPipeline, oracle: oracle_lib.Oracle, heldout: dict,
               previous: dict | None = None, stage: str = "", extra: dict | None = None) -> dict:
        """Save the pipeline and oracle, measure and record the quality bars. `previous`: the metrics of the model
        of which only `stage` was trained again ("oracle": --retrain-oracle, "unet_tail": --continue-unet); its
        recipe and training times are kept, with the stage's recipe keys updated and its time in a note. `extra`:
        more entries for metrics.json."""
        recipe, timings, machine, notes = asdict(self.recipe), self.timings, hardware(), {}
        if previous is not None:
            stage_keys = {key: value for key, value in recipe.items() if key.startswith(f"{stage}_")}
            recipe = {**previous["recipe"], **stage_keys}
            timings, machine = previous["timings_s"], previous["hardware"]
            parts = ("render", "oracle") if stage == "oracle" else ("render", "encode", stage)
            minutes = sum(self.timings.get(part, 0.0) for part in parts) / 60
            done = STAGE_NOTES[stage].format(minutes=minutes, **recipe)
            notes["timing_note"] = (previous.get("timing_note", "") + "\n" + done).strip()
            extra = {**{key: previous[key] for key in ("unet_tail_heldout_loss",) if key in previous}, **(extra or {})}
        self._start("evaluate")
        staging = self.model_dir.with_name(f".{self.model_dir.name}.staging{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        pipeline.to("cpu").save_pretrained(str(staging), safe_serialization=True)
        oracle.save(staging, oracle.metrics)
        saved = StableDiffusionPipeline.from_pretrained(str(staging)).to(self.device)
        quality = measure_quality(saved, oracle.to(self.device),
                                  self.recipe.eval_images_per_prompt, self.recipe.eval_steps,
                                  self.recipe.eval_guidance, self.recipe.seed)
        self._tick("evaluate")
        metrics = {
            "oracle_heldout_accuracy": oracle.metrics["heldout_accuracy"],
            "oracle_heldout_unlit_accuracy": oracle.metrics.get("heldout_unlit_accuracy"),
            "oracle_heldout_other_accuracy": oracle.metrics.get("heldout_other_accuracy"),
            "quality": quality,
            "timings_s": timings,
            "hardware": machine,
            "recipe": recipe,
            "parameters": {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
                           for name in ("text_encoder", "unet", "vae")},
            **notes,
            **(extra or {}),
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        metrics["folder_mb"] = folder_size(staging) / 2**20
        write_model_card(staging / "README.md", metrics)
        metrics["folder_mb"] = folder_size(staging) / 2**20
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        replace_folder(staging, self.model_dir)
        self.log(f"model written to {self.model_dir} ({metrics['folder_mb']:.1f} MB)")
        return metrics


STAGE_NOTES = {  # what a stage trained again on a finished model adds to its timing note
    "oracle": "The oracle was retrained alone afterwards (`--retrain-oracle`: {minutes:.1f} min of rendering and "
              "training).",
    "unet_tail": "The UNet alone was trained {unet_tail_steps} steps more afterwards (`--continue-unet`: "
                 "{minutes:.1f} min of rendering, encoding and training).",
}
TAIL_EVAL_EVERY = 500  # steps between held-out measurements of the UNet-alone tail


class DenoisingTask:
    """The diffusion training task on cached latents: one step's random batch (a function of the seed, the stage's
    key and the step), the min-SNR-weighted loss, and a fixed held-out measurement."""

    def __init__(self, recipe: Recipe, scheduler, device):
        self.recipe, self.device = recipe, device
        self.alphas = scheduler.alphas_cumprod.float().to(device)
        self.timesteps = scheduler.config.num_train_timesteps
        snr = self.alphas / (1 - self.alphas)
        if recipe.prediction_type == "epsilon":
            self.weights = snr.clamp(max=recipe.min_snr_gamma) / snr
        else:
            self.weights = snr.clamp(max=recipe.min_snr_gamma) / (snr + 1)

    def batch(self, stage: int, step: int, data: dict, latents: torch.Tensor):
        """Captions (some dropped to ""), noisy latents, timesteps and the prediction target of one step."""
        recipe, device = self.recipe, self.device
        generator = keyed_generator(recipe.seed, stage, step)
        rng = np.random.default_rng([recipe.seed, stage, step])
        index = torch.randint(len(latents), (recipe.unet_batch,), generator=generator)
        texts = captions_for(data["kind"][index], data["colour"][index], data["view"][index], data["scale"][index],
                             rng)
        texts = ["" if drop else text for text, drop in zip(texts, rng.random(len(texts)) < recipe.caption_dropout)]
        clean = latents[index].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        t = torch.randint(self.timesteps, (len(index),), generator=generator).to(device)
        noisy, target = self.noised(clean, noise, t)
        return texts, noisy, t, target

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        a = self.alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1)
        target = noise if self.recipe.prediction_type == "epsilon" else a * noise - s * clean
        return a * clean + s * noise, target

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.weights[t] * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()

    @torch.no_grad()
    def heldout_loss(self, unet, data: dict, latents: torch.Tensor, encode_text, draws: int = 4) -> float:
        """Mean squared error of the prediction on `draws` noisings of every held-out image (timesteps stratified
        over the schedule, fixed draws, full captions): comparable between runs of one recipe."""
        generator = keyed_generator(self.recipe.seed, 8, 0)
        rng = np.random.default_rng([self.recipe.seed, 8, 0])
        index = torch.arange(len(latents)).repeat(draws)
        strata = 20
        t = (torch.arange(len(index)) % strata) * (self.timesteps // strata)
        t = t + torch.randint(self.timesteps // strata, (len(index),), generator=generator)
        noise = torch.randn((len(index), *latents.shape[1:]), generator=generator)
        texts = captions_for(data["kind"][index], data["colour"][index], data["view"][index], data["scale"][index],
                             rng)
        was_training, total = unet.training, 0.0
        unet.eval()
        for part in torch.arange(len(index)).split(256):
            clean, step = latents[index[part]].to(self.device), t[part].to(self.device)
            noisy, target = self.noised(clean, noise[part].to(self.device), step)
            prediction = unet(noisy, step, encoder_hidden_states=encode_text([texts[i] for i in part])).sample
            total += (prediction - target).pow(2).mean(dim=(1, 2, 3)).sum().item()
        unet.train(was_training)
        return total / len(index)


class CaptionEncoder:
    """A frozen text encoder's last hidden states of captions, each computed once."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted(set(texts) - self.cache.keys())
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            device = self.text_encoder.device
            self.cache.update(zip(new, self.text_encoder(ids.to(device)).last_hidden_state))
        return torch.stack([self.cache[text] for text in texts])


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` onto `target` (a folder); the old one is removed only after the new one is in place."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- command line ------------------------------------------------------------------------------------------------------

WORK_FILES = ("config.yaml", "timings.json", "data", "oracle", "checkpoints")  # what a run writes in its work folder


def main(argv=None) -> None:
    import argparse

    from dd3d.cli import add_config_arguments, prepare_run_dir

    parser = argparse.ArgumentParser(
        prog="train_tiny_backbone.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny-backbone"),
                        help="work folder: data, checkpoints, oracle (default: outputs/tiny-backbone)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL,
                        help=f"where the finished model goes (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reference-sets", action="store_true",
                        help=f"only (re)write the bundled reference sets under {REFS_DIR} and exit")
    parser.add_argument("--retrain-oracle", action="store_true",
                        help="only retrain the oracle beside the model already in --model-dir (its weights kept) and "
                             "re-measure the model's quality bars with it")
    parser.add_argument("--continue-unet", action="store_true",
                        help="only train the UNet alone for unet_tail_steps more steps on the model already in "
                             "--model-dir (its text encoder, VAE and oracle kept) and re-measure its quality bars")
    parser.add_argument("--model-card", action="store_true",
                        help="only regenerate README.md of --model-dir from its metrics.json and exit")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if args.model_card:
        rewrite_model_card(args.model_dir)
        print(f"wrote {args.model_dir / 'README.md'}")
        return
    if args.reference_sets:
        for name in REFERENCE_SETS:
            rows = write_reference_set(REFS_DIR / name, name)
            print(f"wrote {len(rows)} images to {REFS_DIR / name}")
        return
    cfg = load_recipe(args.config, args.overrides, args.out)
    run_flags = {key: bool(cfg.pop(key)) for key in RUN_KEYS}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, wanted in (("--retrain-oracle", args.retrain_oracle), ("--continue-unet", args.continue_unet)):
        if wanted and not (args.model_dir / "metrics.json").is_file():
            raise UserError(f"{flag} needs a trained model in {args.model_dir} (its metrics.json is missing)")
    if args.continue_unet:
        if not cfg["unet_tail_steps"]:
            raise UserError("--continue-unet needs unet_tail_steps > 0")
        if json.loads((args.model_dir / "metrics.json").read_text())["recipe"].get("unet_tail_steps"):
            raise UserError(f"the model in {args.model_dir} has had its UNet-alone tail already; train a longer tail "
                            "from scratch instead")
    prepare_run_dir(args.out, run_flags["resume"], run_flags["overwrite"], "train_tiny_backbone", WORK_FILES)
    recipe = Recipe(**cfg)
    started = time.time()
    trainer = Trainer(args.out, recipe, args.model_dir, args.device, log=tqdm.write)
    if args.retrain_oracle:
        metrics = trainer.retrain_oracle()
    elif args.continue_unet:
        metrics = trainer.continue_unet()
    else:
        metrics = trainer.run()
    quality = metrics["quality"]
    print(
        f"done in {(time.time() - started) / 60:.1f} min: {args.model_dir} ({metrics['folder_mb']:.1f} MB); "
        f"kind {quality['plain']['kind_accuracy']:.1%}, colour {quality['plain']['colour_accuracy']:.1%}, "
        f"view {quality['view']['view_accuracy']:.1%}"
    )


USAGE = """Train dd3d's embedded default model (dd3d/tiny/model) from scratch on its procedural world.

Renders the data set, trains the oracle, the VAE, then the text encoder and UNet jointly, exports the
StableDiffusionPipeline folder with EMA weights and the oracle, measures the quality bars and writes the model card.
A killed run resumes where it stopped; every random draw follows from the seed.

Examples:
  python scripts/train_tiny_backbone.py                           # the shipped recipe (about 155 min on 2 CPU cores)
  python scripts/train_tiny_backbone.py --threads 2 resume=true   # continue after a kill
  python scripts/train_tiny_backbone.py --device cuda             # much faster on a GPU
  python scripts/train_tiny_backbone.py --continue-unet --out /tmp/tail --model-dir /tmp/model unet_tail_steps=2000
                                             # the UNet alone 2000 steps more on a model trained with unet_tail_steps=0
  python scripts/train_tiny_backbone.py --out /tmp/t --model-dir /tmp/m unet_steps=500 train_images=4000  # a quick try
"""
