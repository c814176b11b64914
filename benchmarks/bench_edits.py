#!/usr/bin/env python
"""Edits and variation scaling of a learned distribution, read by the oracle on the embedded world: a suffix edit
(", <view> view") should give that view, std scale 0 one instance, and the attribute entropy should grow with the
std scale up to the references' own.

  python benchmarks/bench_edits.py --dist outputs/demo/cool-mugs/distribution.safetensors --refs examples/refs/cool-mugs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d import evaluate as ev  # noqa: E402
from dd3d.cli import load_config  # noqa: E402


def samples(dist: Path, work: Path, name: str, n: int, overrides: list[str]) -> list:
    from dd3d.sample2d import sample

    out = work / name
    sample(load_config("sample2d.yaml", None, [f"n={n}", "steps=20", "seed=0", "batch_size=16", "fixed_noise=true",
                                               *overrides], dists=[str(dist)], out=str(out)))
    return ev.load_images(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, required=True)
    parser.add_argument("--refs", type=Path, required=True)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--view", default="side", help="the view the suffix edit asks for")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dd3d.tiny.oracle import Oracle

    oracle = Oracle.load()
    refs, _, _ = ev.reference_reading(oracle, args.refs, ev.load_images(args.refs))
    print("| setting | colour entropy | kind entropy | view histogram |\n|---|---|---|---|")
    print(f"| references | {ev.entropy(ev.histogram(refs['colour'], ev.ATTRIBUTES['colour'])):.2f} | "
          f"{ev.entropy(ev.histogram(refs['kind'], ev.ATTRIBUTES['kind'])):.2f} | "
          + ", ".join(f"{k} {v:.0%}" for k, v in ev.histogram(refs["view"], ev.VIEWS).items() if v) + " |")
    with tempfile.TemporaryDirectory() as work:
        settings = {f"std scale {s}": [f"std_scale=[{s}]"] for s in (0.0, 0.5, 1.0, 1.5)}
        settings[f'suffix ", {args.view} view"'] = [f"suffix=', {args.view} view'"]
        for name, overrides in settings.items():
            labels = ev.read_images(oracle, samples(args.dist, Path(work), name.replace(" ", "_"), args.n,
                                                    overrides)).labels
            views = ev.histogram(labels["view"], ev.VIEWS)
            print(f"| {name} | {ev.entropy(ev.histogram(labels['colour'], ev.ATTRIBUTES['colour'])):.2f} | "
                  f"{ev.entropy(ev.histogram(labels['kind'], ev.ATTRIBUTES['kind'])):.2f} | "
                  + ", ".join(f"{k} {v:.0%}" for k, v in views.items() if v) + " |", flush=True)


if __name__ == "__main__":
    main()
