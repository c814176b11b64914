"""Stage-2 quality sweep: plain prompts "a <colour> <kind>" over the world's kinds (one colour each) with the
defaults of this machine (configs/gen3d_cpu.yaml merged over configs/gen3d.yaml without CUDA), each asset measured
against the world's true object (dd3d.evaluate: IoU in the canonical orientation, the best ball, haze, fill) and
read by the oracle on 8 albedo and 8 world-lit turntable frames (kind, colour, view; dd3d.evaluate.asset_frames).

Issue 13's bars for plain prompts: IoU beats the best ball by at least 0.1 on at least 5 of the 7 kinds, and the
oracle's kind is right in at least 6 of 8 frames of every asset.

Slow on CPU (one full gen3d run per kind, minutes each): use --kinds for a subset, --steps to shorten.
Run: python benchmarks/bench_gen3d_quality.py [--kinds mug house] [--out outputs/bench-gen3d-quality]
     [--json q.json] [key=value gen3d overrides ...]
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


def run_asset(kind: str, out: Path, overrides: list[str]) -> tuple[Path, float]:
    folder = out / kind
    prompt = f"a {COLOUR_OF[kind]} {kind}"
    command = [sys.executable, str(ROOT / "scripts" / "gen3d.py"), "--prompt", prompt, "--out", str(folder),
               "overwrite=true", "export.formats=[]", *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return folder, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-gen3d-quality")
    parser.add_argument("--steps", type=int, help="override the profile's steps (a quicker, weaker sweep)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the assets already under --out again (with today's evaluation), training none")
    parser.add_argument("overrides", nargs="*", help="gen3d key=value overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])

    from dd3d.tiny.oracle import Oracle

    oracle = Oracle.load()
    rows, results = [], {}
    for kind in args.kinds:
        folder, seconds = (args.out / kind, 0.0) if args.reuse else run_asset(kind, args.out, overrides)
        metrics, _ = ev.evaluate_asset(oracle, ev.asset_checkpoints(folder)[0], kind, {COLOUR_OF[kind]})
        geometry, look, truth = metrics["geometry"], metrics["appearance"], metrics["truth_appearance"]
        results[kind] = {"seconds": seconds, **metrics}
        rows.append((kind, COLOUR_OF[kind], geometry["iou"], geometry["ball_iou"], geometry["iou_over_ball"],
                     geometry["haze"], geometry["fill"], look["albedo"]["kind"], look["shaded"]["kind"],
                     look["albedo"]["colour"], look["shaded"]["view"],
                     f"{truth['albedo']['kind']}/{truth['shaded']['kind']}", seconds))
        print(f"{kind}: IoU {geometry['iou']:.3f} ball {geometry['ball_iou']:.3f} kind "
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
