"""A threestudio prompt processor that draws a fresh prompt from a dd3d distribution on every call.

threestudio's systems call `prompt_processor()` once per training step and index the returned per-direction text
embeddings by each camera's direction (side, front, back, overhead, with the processor's thresholds). Here each
direction has the Gaussian of the template "prefix [ctx] suffix, <direction> view" fitted once at start (the same
`dd3d.view_prompts.ViewPrompts` that `scripts/gen3d.py` uses), and every call draws new embeddings from them. The
unconditional branch is the negative prompt, empty by default. Use it in a threestudio config:

    import threestudio_ext.prompt_processor  # e.g. from a custom/ extension's __init__.py
    system.prompt_processor_type: dd3d-distribution-prompt-processor
    system.prompt_processor:
      pretrained_model_name_or_path: <the distribution's model; null = dd3d's embedded model>
      dists: [outputs/cathedrals/distribution.safetensors]
      std_scale: [1.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import threestudio
import torch
from omegaconf import OmegaConf
from threestudio.models.prompt_processors.base import PromptProcessor

from dd3d.backbone import Backbone
from dd3d.distribution import build_sampler
from dd3d.view_prompts import ViewPrompts


@threestudio.register("dd3d-distribution-prompt-processor")
class DistributionPromptProcessor(PromptProcessor):
    @dataclass
    class Config(PromptProcessor.Config):
        prompt: str = "a sample of a dd3d prompt distribution"  # only logged; the distribution is the prompt
        pretrained_model_name_or_path: Optional[str] = None
        dists: List[str] = field(default_factory=list)
        weights: Optional[List[float]] = None
        mix: str = "blend"  # blend | mixture, as in scripts/sample2d.py
        std_scale: List[float] = field(default_factory=lambda: [1.0])
        sampler: str = "auto"  # auto (as learned) | gaussian (the paper) | prompts (one component per prompt)
        sampler_bandwidth: float = 0.5
        sampler_shrink: float = 0.15
        sampler_shrink_neighbours: int = 0  # 0: shrink towards the mixture's mean | N: towards the N nearest prompts
        prefix: Optional[str] = None  # null = the training template
        suffix: Optional[str] = None
        class_index: Optional[int] = None
        seed: int = 0

    cfg: Config

    def prepare_text_embeddings(self) -> None:
        """Nothing to cache: the distributions are fitted in load_text_embeddings."""

    def load_text_embeddings(self) -> None:
        if self.cfg.view_dependent_prompt_front:
            raise ValueError("dd3d distributions use the '<template>, <view> view' form: "
                             "set view_dependent_prompt_front to false")
        sampler_cfg = OmegaConf.create({key: getattr(self.cfg, key) for key in
                                        ("dists", "weights", "mix", "std_scale", "prefix", "suffix", "class_index",
                                         "sampler", "sampler_bandwidth", "sampler_shrink",
                                         "sampler_shrink_neighbours")})
        backbone = Backbone.load(self.cfg.pretrained_model_name_or_path)
        self.view_prompts = ViewPrompts.from_distributions(sampler_cfg, backbone)
        self.view_free = ViewPrompts({"": build_sampler(sampler_cfg, backbone)}, self.view_prompts.uncond)
        negative = backbone.encode_text([self.cfg.negative_prompt]).float().to(self.device)
        self.uncond_text_embeddings = negative
        self.uncond_text_embeddings_vd = negative.expand(len(self.directions), -1, -1)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.draw()

    def draw(self) -> None:
        """New text embeddings for every direction and for view-free prompting."""
        names = [direction.name for direction in self.directions]
        self.text_embeddings_vd = self._draw(self.view_prompts, names)
        self.text_embeddings = self._draw(self.view_free, [""])

    def _draw(self, prompts: ViewPrompts, views: list[str]) -> torch.Tensor:
        eps = torch.randn((len(views), *prompts.shape), generator=self.generator)
        uniforms = torch.rand(len(views), generator=self.generator)
        return prompts.draw(views, eps, uniforms)[0].to(self.device)

    def __call__(self):
        self.draw()
        return super().__call__()
