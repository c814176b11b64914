"""A short stage-2 run on the embedded model makes geometry, not a blob: the plain prompt "a cyan snowman" beats
the best ball about the origin against the world's true snowman (dd3d.evaluate's 3D metrics) on two seeds. The quality
benchmark's runs from the true object start there."""

import sys
from pathlib import Path

import pytest
import torch

from dd3d import evaluate as ev
from dd3d.gen3d import load_scene, main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gen3d_quality  # noqa: E402

SHORT_RUN = [  # the CPU profile, shortened: 200 steps with the schedule compressed to match
    "steps=200", "guidance.anneal_steps=150", "shading.albedo_steps=50", "view_negative_steps=100",
    "checkpoint_every=200", "validation.every=0", "video.frames=1", "video.size=8", "export.formats=[]",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="measured with the CPU profile")
def test_a_short_plain_prompt_run_beats_the_best_ball(tmp_path):
    margins = []
    for seed in (0, 1):
        out = tmp_path / f"snowman-{seed}"
        main(["--prompt", "a cyan snowman", "--out", str(out), *SHORT_RUN, f"seed={seed}"])
        scene, _ = load_scene(ev.asset_checkpoints(out)[0])
        with torch.no_grad():
            geometry = ev.evaluate_geometry(scene.field.density, "snowman", resolution=48)
        assert geometry["iou"] > geometry["ball_iou"] and geometry["haze"] < 0.1, (seed, geometry)
        margins.append(geometry["iou"] - geometry["ball_iou"])
    # Measured with the embedded model's 6000-step tail: 0.30 / 0.41 against the balls' 0.26 / 0.23 (seeds 0 / 1; the
    # full 2000-step runs +0.38 / +0.32, BENCHMARKS.md); a blob, a haze or an empty field fails this.
    assert sum(margins) / len(margins) > 0.05, margins


@pytest.mark.skipif(torch.cuda.is_available(), reason="measured with the CPU profile")
def test_a_run_from_the_truth_starts_at_the_true_object_and_trains_on(tmp_path):
    quick = ["steps=3", "checkpoint_every=1", "validation.every=0", "video.frames=1", "video.size=8"]
    folder, _, start_iou = bench_gen3d_quality.run_asset("house", tmp_path, quick, from_truth=True)
    # The fitted field is the true house (a fitted mug measured 0.93; the best ball about the origin reads about
    # 0.6), and the resumed run goes on to the configured steps instead of stopping at the one step that wrote it.
    assert start_iou > 0.85
    assert ev.asset_checkpoints(folder)[0].name == "step-000003.pt"
