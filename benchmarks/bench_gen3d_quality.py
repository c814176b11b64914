"""Stage-2 quality sweep: plain prompts "a <colour> <kind>" over the world's kinds (one colour each) with the
defaults of this machine (configs/gen3d_cpu.yaml merged over configs/gen3d.yaml without CUDA), each asset measured
against the world's true object (dd3d.evaluate: IoU in the canonical orientation, the best ball, haze, fill) and
read by the oracle on 8 albedo and 8 world-lit turntable frames (kind, colour, view; dd3d.evaluate.asset_frames).

Issue 13's bars for plain prompts: IoU beats the best ball by at least 0.1 on at least 5 of the 7 kinds, and the
oracle's kind is right in at least 6 of 8 frames of every asset.

--from-truth starts every run from the world's true object instead of the initial blob (the field fitted to its
signed distance and colours, then trained with the same guidance and schedule): what the guidance keeps of the right
answer, apart from whether the optimisation finds it from a blob.

Slow on CPU (one full gen3d run per kind, minutes each): use --kinds for a subset, --steps to shorten.
Run: python benchmarks/bench_gen3d_quality.py [--kinds mug house] [--out outputs/bench-gen3d-quality]
     [--from-truth] [--json q.json] [key=value gen3d overrides ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dd3d import evaluate as ev  # noqa: E402
from dd3d.tiny.world import KINDS  # noqa: E402

COLOUR_OF = {"house": "red", "car": "yellow", "chair": "green", "mug": "blue", "lamp": "orange",
             "snowman": "cyan", "duck": "yellow"}


def run_asset(kind: str, out: Path, overrides: list[str], from_truth: bool = False) -> tuple[Path, float, float | None]:
    """One gen3d run of "a <colour> <kind>"; its folder, wall time and (from the truth) the fitted start's IoU."""
    folder = out / kind
    command = [sys.executable, str(ROOT / "scripts" / "gen3d.py"), "--prompt", f"a {COLOUR_OF[kind]} {kind}",
               "--out", str(folder), "export.formats=[]", *overrides]
    start, start_iou = time.perf_counter(), None
    if from_truth:  # one step writes the run folder and a checkpoint; the fitted truth replaces it, then resume
        subprocess.run([*command, "overwrite=true", "steps=1"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        start_iou = fit_to_truth(ev.asset_checkpoints(folder)[0], kind, COLOUR_OF[kind])
        command += ["resume=true", f"steps={configured_steps(overrides)}"]  # the saved config says steps=1
    else:
        command.append("overwrite=true")
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return folder, time.perf_counter() - start, start_iou


def configured_steps(overrides: list[str]) -> int:
    """The steps a gen3d run on this machine would take with these overrides."""
    from dd3d.cli import load_config
    from dd3d.gen3d import NULLABLE, machine_profile

    return int(load_config("gen3d.yaml", None, overrides, machine_profile(), NULLABLE).steps)


def fit_to_truth(checkpoint: Path, kind: str, colour: str, steps: int = 500, batch: int = 4096) -> float:
    """Fit the checkpoint's field to the world's true `kind` at scale 1 in `colour` (density: a sharp step at the
    signed distance's zero level, matched in log(1 + density); albedo: the material colours inside), give it a
    fresh optimizer, save it in place; returns the fitted field's IoU with the truth."""
    import torch

    from dd3d.files import atomic_write
    from dd3d.gen3d import load_scene
    from dd3d.tiny import world

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    scene, cfg = load_scene(checkpoint)
    body = torch.tensor(world.COLOURS[colour])
    palette = torch.stack([body, torch.tensor(world.DARK), torch.tensor(world.LIGHT), body * world.SHADED_GAIN])
    optimizer = torch.optim.Adam(scene.field.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    device = next(scene.parameters()).device
    palette = palette.to(device)
    scene.train()
    for _ in range(steps):
        points = torch.rand(batch, 3, generator=generator) * 2 - 1
        distance, material = (value.to(device) for value in world.object_sdf(kind, points, 1.0))
        density, albedo = scene.field(points.to(device))
        target = 60.0 * torch.sigmoid(-distance / 0.01)
        inside = distance < 0.02
        loss = (torch.log1p(density) - torch.log1p(target)).pow(2).mean()
        loss = loss + 10.0 * (albedo[inside] - palette[material[inside]]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scene.occupancy.refresh(scene.field.density)
    fresh = torch.optim.Adam(scene.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, betas=tuple(cfg.optim.betas))
    fitted = {**state, "scene": scene.state_dict(), "optimizer": fresh.state_dict()}
    atomic_write(checkpoint, lambda tmp: torch.save(fitted, tmp))
    with torch.no_grad():
        return ev.evaluate_geometry(scene.field.density, kind, float(cfg.field.radius))["iou"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-gen3d-quality")
    parser.add_argument("--steps", type=int, help="override the profile's steps (a quicker, weaker sweep)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the assets already under --out again (with today's evaluation), training none")
    parser.add_argument("--from-truth", action="store_true",
                        help="start each run from the world's true object instead of the blob")
    parser.add_argument("overrides", nargs="*", help="gen3d key=value overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])

    from dd3d.tiny.oracle import Oracle

    oracle = Oracle.load()
    rows, results = [], {}
    for kind in args.kinds:
        folder, seconds, start_iou = ((args.out / kind, 0.0, None) if args.reuse
                                      else run_asset(kind, args.out, overrides, args.from_truth))
        metrics, _ = ev.evaluate_asset(oracle, ev.asset_checkpoints(folder)[0], {kind}, {COLOUR_OF[kind]})
        geometry, look, truth = metrics["geometry"], metrics["appearance"], metrics["truth_appearance"]
        results[kind] = {"seconds": seconds, "start_iou": start_iou, **metrics}
        rows.append((kind, COLOUR_OF[kind], geometry["iou"], geometry["ball_iou"], geometry["iou_over_ball"],
                     geometry["haze"], geometry["fill"], look["albedo"]["kind"], look["shaded"]["kind"],
                     look["albedo"]["colour"], look["shaded"]["view"],
                     f"{truth['albedo']['kind']}/{truth['shaded']['kind']}", seconds))
        start = f" (the fitted truth: {start_iou:.3f})" if start_iou is not None else ""
        print(f"{kind}: IoU {geometry['iou']:.3f}{start} ball {geometry['ball_iou']:.3f} kind "
              f"{look['albedo']['kind']}/{look['shaded']['kind']} ({seconds:.0f} s)", flush=True)

    header = ("kind", "colour", "IoU", "ball", "IoU-ball", "haze", "fill", "kind alb", "kind shd", "colour alb",
              "view shd", "truth kind alb/shd", "s")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) and i < 7 else f"{v:.0f}" if isinstance(v, float) else str(v)
                 for i, v in enumerate(row)]
        print("| " + " | ".join(cells) + " |")
    beats = sum(row[4] >= 0.1 for row in rows)
    kinds_ok = sum(min(row[7], row[8]) >= 6 for row in rows)
    print(f"\nIoU - ball >= 0.1: {beats}/{len(rows)} (bar: 5 of 7 kinds); oracle kind >= 6/8 in albedo and shaded: "
          f"{kinds_ok}/{len(rows)} (bar: all)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
