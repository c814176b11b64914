"""A short stage-2 run on the embedded model makes geometry, not a blob: the plain prompt "a cyan snowman" beats
the best ball about the origin against the world's true snowman (dd3d.evaluate's 3D metrics), seeded."""

import pytest
import torch

from dd3d import evaluate as ev
from dd3d.gen3d import load_scene, main

SHORT_RUN = [  # the CPU profile, shortened: 200 steps with the schedule compressed to match
    "steps=200", "guidance.anneal_steps=150", "shading.albedo_steps=50", "checkpoint_every=200",
    "validation.every=0", "video.frames=1", "video.size=8", "export.formats=[]", "seed=0",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="measured with the CPU profile")
def test_a_short_plain_prompt_run_beats_the_best_ball(tmp_path):
    out = tmp_path / "snowman"
    main(["--prompt", "a cyan snowman", "--out", str(out), *SHORT_RUN])
    scene, _ = load_scene(ev.asset_checkpoints(out)[0])
    with torch.no_grad():
        geometry = ev.evaluate_geometry(scene.field.density, "snowman", resolution=48)
    # Measured 0.59 against the ball's 0.22 (0.37 with the timestep range ending at 0.5; BENCHMARKS.md); a blob, a
    # haze or an empty field fails this.
    assert geometry["iou"] > geometry["ball_iou"] + 0.05, geometry
    assert geometry["haze"] < 0.1, geometry
