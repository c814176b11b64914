"""The threestudio prompt processor, run inside a stand-in of threestudio's prompt-processor base (threestudio is
not a package on the registry, so it cannot be installed here). The stand-in follows threestudio's flow: parse the
config into the class's Config, build the four directions with their thresholds, call prepare_text_embeddings and
load_text_embeddings, and index per-direction embeddings by camera in the output's get_text_embeddings."""

import importlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from dd3d.distribution import PromptDistribution
from tests.test_gen3d import dist_file  # noqa: F401  (fixture)


def _shift(azimuth):
    return (azimuth + 180) % 360 - 180


@dataclass
class Direction:
    name: str
    condition: object


@dataclass
class Output:
    text_embeddings: torch.Tensor
    uncond_text_embeddings: torch.Tensor
    text_embeddings_vd: torch.Tensor
    uncond_text_embeddings_vd: torch.Tensor
    direction2idx: dict
    directions: list

    def get_text_embeddings(self, elevation, azimuth, distance, view_dependent_prompting=True):
        if not view_dependent_prompting:
            n = len(elevation)
            return torch.cat([self.text_embeddings.expand(n, -1, -1), self.uncond_text_embeddings.expand(n, -1, -1)])
        index = torch.zeros_like(elevation, dtype=torch.long)
        for d in self.directions:
            index[d.condition(elevation, azimuth, distance)] = self.direction2idx[d.name]
        return torch.cat([self.text_embeddings_vd[index], self.uncond_text_embeddings_vd[index]])


class PromptProcessor:
    @dataclass
    class Config:
        prompt: str = "a hamburger"
        negative_prompt: str = ""
        pretrained_model_name_or_path: str = "runwayml/stable-diffusion-v1-5"
        overhead_threshold: float = 60.0
        front_threshold: float = 45.0
        back_threshold: float = 45.0
        view_dependent_prompt_front: bool = False

    def __init__(self, cfg: dict):
        self.cfg = OmegaConf.structured(self.Config(**cfg))
        self.device = torch.device("cpu")
        self.configure()

    def configure(self):
        c = self.cfg
        self.directions = [
            Direction("side", lambda e, a, d: torch.ones_like(e, dtype=torch.bool)),
            Direction("front", lambda e, a, d: (_shift(a) > -c.front_threshold) & (_shift(a) < c.front_threshold)),
            Direction("back", lambda e, a, d: (_shift(a) > 180 - c.back_threshold)
                      | (_shift(a) < -180 + c.back_threshold)),
            Direction("overhead", lambda e, a, d: e > c.overhead_threshold),
        ]
        self.direction2idx = {d.name: i for i, d in enumerate(self.directions)}
        self.prepare_text_embeddings()
        self.load_text_embeddings()

    def __call__(self):
        return Output(self.text_embeddings, self.uncond_text_embeddings, self.text_embeddings_vd,
                      self.uncond_text_embeddings_vd, self.direction2idx, self.directions)


@pytest.fixture
def processor_class(monkeypatch):
    registry = {}
    package = types.ModuleType("threestudio")
    package.register = lambda name: lambda cls: registry.setdefault(name, cls)
    base = types.ModuleType("threestudio.models.prompt_processors.base")
    base.PromptProcessor = PromptProcessor
    monkeypatch.setitem(sys.modules, "threestudio", package)
    monkeypatch.setitem(sys.modules, "threestudio.models.prompt_processors.base", base)
    monkeypatch.delitem(sys.modules, "threestudio_ext.prompt_processor", raising=False)
    importlib.import_module("threestudio_ext.prompt_processor")
    return registry["dd3d-distribution-prompt-processor"]


def test_every_call_draws_new_prompts_per_direction(processor_class, tiny_model, backbone, dist_file):  # noqa: F811
    processor = processor_class({"pretrained_model_name_or_path": str(tiny_model), "dists": [str(dist_file)]})
    first, second = processor(), processor()
    assert first.text_embeddings_vd.shape == (4, 77, 32) and first.text_embeddings.shape == (1, 77, 32)
    assert not torch.allclose(first.text_embeddings_vd, second.text_embeddings_vd)
    assert not torch.allclose(first.text_embeddings, second.text_embeddings)
    empty = backbone.encode_text([""])
    cond_uncond = second.get_text_embeddings(torch.tensor([10.0, 70.0]), torch.tensor([170.0, 0.0]),
                                             torch.tensor([2.0, 2.0]))
    back, overhead = second.direction2idx["back"], second.direction2idx["overhead"]
    assert torch.equal(cond_uncond[0], second.text_embeddings_vd[back])
    assert torch.equal(cond_uncond[1], second.text_embeddings_vd[overhead])
    assert torch.allclose(cond_uncond[2:], empty.expand(2, -1, -1), atol=1e-6)


def test_zero_spread_gives_each_directions_template_mean(processor_class, tiny_model, backbone,
                                                        dist_file):  # noqa: F811
    processor = processor_class({"pretrained_model_name_or_path": str(tiny_model), "dists": [str(dist_file)],
                                 "std_scale": [0.0]})
    output = processor()
    dist = PromptDistribution.load(dist_file)
    for direction in processor.directions:
        expected = dist.fit(backbone, suffix=f"house, {direction.name} view").mean
        assert torch.allclose(output.text_embeddings_vd[output.direction2idx[direction.name]], expected, atol=1e-5)
    assert torch.allclose(output.text_embeddings[0], dist.fit(backbone).mean, atol=1e-5)
