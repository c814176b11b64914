#!/usr/bin/env python
"""The main job end to end on a bundled reference set with the embedded default model: learn a prompt
distribution from renders of cool-coloured mugs, sample it in 2D, lift it to 3D with SDS, export the mesh, and
measure the samples and the asset against the references and the world's true mug. Each step prints the command a
user would type. Without the embedded model an untrained stand-in of the same architecture is used (the pipeline
runs; the images are noise and the evaluation is skipped).
"""

import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dd3d.backbone import DEFAULT_MODEL  # noqa: E402

OUT = Path("outputs") / "demo"
REFS = Path("examples") / "refs" / "cool-mugs"


def step(*args: str) -> None:
    print("\n$ " + shlex.join(["python", *args]), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def evaluation_report(dist_run: Path, asset: Path) -> None:
    """The evaluation of the references, the 2D samples and the asset: its table (every number below its bar is
    named), metrics.json and report.html in the demo folder."""
    step(
        "scripts/evaluate.py", "--refs", str(REFS), "--samples", str(dist_run / "2d"), "--asset", str(asset),
        "--json", str(OUT / "metrics.json"), "--report", str(OUT / "report.html"),
    )


def main() -> None:
    start = time.time()
    model_args = []
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        from dd3d.tiny.build import save_tiny_model

        stand_in = OUT / "stand-in-model"
        if not (ROOT / stand_in / "model_index.json").is_file():
            save_tiny_model(ROOT / stand_in)
        print(f"note: the embedded default model is not installed; using an UNTRAINED stand-in at {stand_in}")
        model_args = ["--model", str(stand_in)]
    run = OUT / REFS.name
    asset = OUT / f"{REFS.name}-3d"
    # The distribution is meant for stage 2, so its prompts are learned with view words (README, stage 1).
    step(
        "scripts/train_distribution.py",
        "--images",
        str(REFS),
        *model_args,
        "--out",
        str(run),
        "overwrite=true",
        "steps=300",
        "train.view_words=true",
        "checkpoint_every=100",
        "sample.every=100",
        "sample.steps=20",
    )
    dist = str(run / "distribution.safetensors")
    step(
        "scripts/sample2d.py",
        "--dist",
        dist,
        *model_args,
        "--n",
        "32",
        "--steps",
        "20",
        "--seed",
        "0",
        "--fixed-noise",
        "--out",
        str(run / "2d"),
    )
    step("scripts/sample2d.py", "--dist", dist, *model_args, "--describe")
    shortened = ["steps=150"] if model_args else []  # the stand-in's guidance is noise: show the run, not a result
    step("scripts/gen3d.py", "--dist", dist, *model_args, "--out", str(asset), "overwrite=true", *shortened)
    if not model_args:
        evaluation_report(run, asset)
    print(
        f"\ndemo done in {time.time() - start:.0f} s: see {run} (distribution, samples/, 2d/), {asset} "
        f"(turntable, validation/, mesh.obj, mesh.glb) and {OUT / 'report.html'}"
    )


if __name__ == "__main__":
    main()
