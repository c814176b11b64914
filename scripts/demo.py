#!/usr/bin/env python
"""The main job end to end on a bundled reference set with the embedded default model: learn a prompt
distribution from renders of cool-coloured mugs, sample it in 2D, lift it to 3D with SDS, export the mesh, and let
the model's oracle say what the samples and the asset's turntable views show. Each step prints the command a
user would type. Without the embedded model an untrained stand-in of the same architecture is used (the pipeline
runs; the images are noise and the oracle check is skipped).
"""

import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dd3d.backbone import DEFAULT_MODEL  # noqa: E402

OUT = Path("outputs") / "demo"
REFS = Path("examples") / "refs" / "cool-mugs"


def step(*args: str) -> None:
    print("\n$ " + shlex.join(["python", *args]), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def summary(labels: dict[str, list[str]]) -> str:
    return "; ".join(
        f"{head}: " + ", ".join(f"{k} {v}" for k, v in Counter(values).most_common())
        for head, values in labels.items()
        if head != "view"
    )


def oracle_report(dist_run: Path, asset: Path) -> None:
    """What the oracle sees in the references, the 2D samples and 8 turntable views of the asset."""
    import numpy as np
    import torch
    from PIL import Image

    from dd3d.gen3d import load_scene, turntable_frames
    from dd3d.tiny.oracle import Oracle

    oracle = Oracle.load()
    refs = [Image.open(path) for path in sorted((ROOT / REFS).glob("*.png"))]
    samples = [Image.open(path) for path in sorted((ROOT / dist_run / "2d").glob("0*.png"))]
    ref_labels = oracle.classify(refs)
    print(f"\noracle, references: {summary(ref_labels)}")
    print(f"oracle, 2D samples: {summary(oracle.classify(samples))}")
    checkpoint = sorted((ROOT / asset / "checkpoints").glob("step-*.pt"))[-1]
    scene, cfg = load_scene(checkpoint)
    views = torch.from_numpy(np.stack(turntable_frames(scene, cfg, 8))).permute(0, 3, 1, 2)
    kinds = oracle.classify(views)["kind"]
    wanted = Counter(ref_labels["kind"]).most_common(1)[0][0]
    print(
        f"oracle, 8 turntable views of the asset: {summary({'kind': kinds})} -> "
        f"'{wanted}' in {kinds.count(wanted)}/8 views"
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
    step(
        "scripts/train_distribution.py",
        "--images",
        str(REFS),
        *model_args,
        "--out",
        str(run),
        "overwrite=true",
        "steps=300",
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
        "16",
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
        oracle_report(run, asset)
    print(
        f"\ndemo done in {time.time() - start:.0f} s: see {run} (distribution, samples/, 2d/) and {asset} "
        "(turntable, validation/, mesh.obj, mesh.glb)"
    )


if __name__ == "__main__":
    main()
