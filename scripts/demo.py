#!/usr/bin/env python
"""The main job end to end on a bundled reference set: learn a prompt distribution, then sample it in 2D.

Uses the embedded default model when it is installed (dd3d/tiny/model); until then an untrained stand-in of the
same architecture is built locally, so the pipeline runs but its images are noise. Each step prints the command
a user would type.
"""

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dd3d.backbone import DEFAULT_MODEL  # noqa: E402

OUT = ROOT / "outputs" / "demo"
REFS = ROOT / "examples" / "refs" / "warm-houses"


def step(*args: str) -> None:
    command = [sys.executable, *args]
    print("\n$ " + shlex.join(["python", *args]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> None:
    model_args = []
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        from dd3d.tiny.build import save_tiny_model

        stand_in = OUT / "stand-in-model"
        if not (stand_in / "model_index.json").is_file():
            save_tiny_model(stand_in)
        print(f"note: the embedded default model is not shipped yet; using an UNTRAINED stand-in at {stand_in} "
              "(the pipeline runs end to end, the images are noise)")
        model_args = ["--model", str(stand_in.relative_to(ROOT))]
    step("scripts/train_distribution.py", "--images", str(REFS.relative_to(ROOT)), *model_args,
         "--out", "outputs/demo/warm-houses", "overwrite=true", "steps=200", "checkpoint_every=100",
         "sample.every=100", "sample.steps=20")
    dist = "outputs/demo/warm-houses/distribution.safetensors"
    step("scripts/sample2d.py", "--dist", dist, *model_args, "--n", "8", "--steps", "20", "--seed", "0",
         "--fixed-noise", "--out", "outputs/demo/warm-houses/2d")
    step("scripts/sample2d.py", "--dist", dist, *model_args, "--n", "8", "--steps", "20", "--seed", "0",
         "--fixed-noise", "--std-scale", "0", "--out", "outputs/demo/warm-houses/2d-mean")
    step("scripts/sample2d.py", "--dist", dist, *model_args, "--describe")
    print(f"\ndemo done: see {OUT.relative_to(ROOT)}/warm-houses (distribution.safetensors, samples/, 2d/, train.log)")


if __name__ == "__main__":
    main()
