"""Shared fixtures: tiny SD-shaped models (epsilon and v-prediction) built once per session, reference images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from dd3d.tiny.build import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    from dd3d.tiny.build import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def backbone(tiny_model):
    from dd3d.backbone import Backbone

    return Backbone.load(tiny_model)


@pytest.fixture(scope="session")
def backbone_v(tiny_model_v):
    from dd3d.backbone import Backbone

    return Backbone.load(tiny_model_v)


def make_house(size=(40, 32), seed=0) -> Image.Image:
    """A small coloured house-like drawing: distinct enough per seed, cheap to make."""
    rng = np.random.default_rng(seed)
    array = np.full((size[1], size[0], 3), 230, dtype=np.uint8)
    h, w = size[1], size[0]
    array[h // 3 :, w // 5 : 4 * w // 5] = rng.integers(80, 255, 3)
    array[h // 6 : h // 3, w // 4 : 3 * w // 4] = (120, 40, 20)
    return Image.fromarray(array)


@pytest.fixture
def refs(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for index in range(4):
        make_house(seed=index).save(folder / f"house{index}.png")
    return folder
