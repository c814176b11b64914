"""Shared fixtures: tiny SD-shaped models (epsilon and v-prediction) built once per session, reference images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (read when the hub client loads)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dd3d.backbone import Backbone  # noqa: E402
from dd3d.cli import run  # noqa: E402
from dd3d.tiny.build import save_tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def backbone(tiny_model):
    return Backbone.load(tiny_model)


@pytest.fixture(scope="session")
def backbone_v(tiny_model_v):
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


def run_cli(entry, args, capsys):
    """Run a command-line entry point in-process, as the scripts do; returns (exit code, captured out/err)."""
    try:
        run(entry, [str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()
