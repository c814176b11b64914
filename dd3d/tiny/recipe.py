"""The recipe of the embedded default model: everything that decides the trained model (`Recipe`: sizes, steps,
learning-rate schedules, the architecture), how its random draws are seeded, and how the command line reads it
(`RunConfig`, `load_recipe`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dd3d.cli import UserError
from dd3d.tiny.build import EMBEDDED_ARCHITECTURE


@dataclass
class Recipe:
    """Everything that decides the trained model. Defaults: the shipped model's recipe."""

    seed: int = 0
    train_images: int = 20000
    heldout_images: int = 1000
    resolution: int = 32
    # oracle
    oracle_steps: int = 800
    oracle_batch: int = 128
    oracle_lr: float = 2e-3
    oracle_width: int = 16
    oracle_unlit_share: float = 0.5  # of each batch shown unlit: the oracle also reads an asset's albedo frames
    oracle_other_images: int = 3000  # renders of featureless BLOBS, the kind OTHER (plus a tenth held out)
    # VAE
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6
    vae_colour_weight: float = 3.0
    vae_initial_logvar: float = -8.0
    # text encoder + UNet
    unet_steps: int = 2500
    unet_restart_steps: int = 2000  # after unet_steps, warm restarts: cosine cycles of this many steps,
    unet_restart_cycles: int = 2  # this many,
    unet_restart_lr_factor: float = 0.5  # each starting at this fraction of the base LRs
    unet_tail_steps: int = 6000  # then the UNet alone from its EMA weights, the text encoder frozen (so prompt
    unet_tail_warmup: int = 50  # distributions learned on the model stay valid): a fresh optimiser, this warm-up to
                                # unet_restart_lr_factor and a cosine to 10%, over unet_tail_steps
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    prediction_type: str = "epsilon"
    # evaluation of the exported model
    eval_images_per_prompt: int = 4
    eval_steps: int = 25
    eval_guidance: float = 7.5
    checkpoint_every: int = 200
    architecture: dict = field(default_factory=lambda: dict(EMBEDDED_ARCHITECTURE))

    @property
    def unet_total_steps(self) -> int:
        return self.unet_steps + self.unet_restart_cycles * self.unet_restart_steps

    def vae_lr_factor(self, step: int) -> float:
        """Warm-up and cosine decay over vae_steps."""
        return _lr_factor(step, self.warmup_steps, self.vae_steps)

    def unet_lr_factor(self, step: int) -> float:
        """Warm-up and cosine decay over unet_steps, then each restart cycle: cosine from unet_restart_lr_factor
        down to 10%."""
        if step < self.unet_steps:
            return _lr_factor(step, self.warmup_steps, self.unet_steps)
        cycle_step = (step - self.unet_steps) % max(1, self.unet_restart_steps)
        progress = cycle_step / max(1, self.unet_restart_steps)
        return 0.1 + (self.unet_restart_lr_factor - 0.1) * 0.5 * (1 + math.cos(math.pi * progress))

    def unet_tail_lr_factor(self, step: int) -> float:
        """The UNet-alone tail: linear warm-up to unet_restart_lr_factor, then cosine down to 10%."""
        if step < self.unet_tail_warmup:
            return self.unet_restart_lr_factor * (step + 1) / self.unet_tail_warmup
        progress = (step - self.unet_tail_warmup) / max(1, self.unet_tail_steps - self.unet_tail_warmup)
        return 0.1 + (self.unet_restart_lr_factor - 0.1) * 0.5 * (1 + math.cos(math.pi * progress))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def keyed_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded by its keys, e.g. (seed, stage, step): every random draw of a training run is a
    function of them, so a killed run resumes to the same result."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class RunConfig(Recipe):
    """The recipe plus how to treat an existing work folder."""

    resume: bool = False
    overwrite: bool = False


RUN_KEYS = ("resume", "overwrite")


def load_recipe(config_path: Path | None, overrides: list[str], out: Path) -> dict:
    """Recipe defaults, then (when resuming) the run's saved recipe, then --config, then key=value overrides."""
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(RunConfig)
    try:
        layers = []
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise UserError(f"override '{bad[0]}' is not of the form key=value")
        dotlist = OmegaConf.from_dotlist(overrides)
        saved = Path(out) / "config.yaml"
        if dotlist.get("resume") and saved.is_file():
            layers.append(OmegaConf.load(saved))
        if config_path is not None:
            if not config_path.is_file():
                raise UserError(f"config file {config_path} does not exist")
            layers.append(OmegaConf.load(config_path))
        layers.append(dotlist)
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg)
