#!/usr/bin/env python
"""Stage-1 fidelity on the embedded world: the whole 2D chain on several reference sets, DreamDistribution against
its baselines, in the paper's style of table with the world's metrics.

Sets: the bundled ones (examples/refs) and sets rendered here from the world with fresh seeds (two colours of one
kind, four colours of one kind, two kinds of one colour, one kind in all sizes). Methods, each sampled 32 times:
  paper      DreamDistribution as the paper specifies it (K=32 prompts, one diagonal Gaussian over encoder outputs,
             lr 1e-3)
  dd3d       dd3d's defaults (configs/train_distribution.yaml: the per_reference objective, a shared base, the
             prompt mixture)
  <name>     any variant given with --variant name:key=value,key=value (stage-1 overrides, and sampling ones as
             sample2d.<key>=value; variants with the same stage-1 overrides share one trained run); "{class}" in
             a value stands for the set's class words (the class prompt's without the article: "mug", "red object")
  k1         a single learned prompt (K=1, zero spread: Textual-Inversion-like)
  class      the plain class prompt ("a <kind>", "a <colour> object" when the set spans kinds)
  captions   the references' exact captions (the ceiling: what the model does when told exactly what to draw)
  references the reference images themselves, n drawn with replacement: a perfect sampler, whose TVs are the
             floor that sampling noise alone puts under every method at this n
Each number is the mean over --seeds. CPU: about 20 minutes with the defaults (8 sets, one seed) on 2 cores.

  python benchmarks/bench_fidelity.py                       # all sets, seed 0
  python benchmarks/bench_fidelity.py --seeds 0 1           # twice as long, half the sampling noise
  python benchmarks/bench_fidelity.py --sets cool-mugs two-colour-chairs --seeds 0 --steps 300
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dd3d import evaluate as ev  # noqa: E402
from dd3d.cli import CONFIG_DIR, load_config  # noqa: E402

BUNDLED = ("cool-mugs", "warm-houses", "red-things", "small-warm-ducks")
HELD_OUT = {  # rendered here with seeds the bundled sets and the model's training data do not use
    "two-colour-chairs": dict(count=16, seed=2001, kinds=["chair"], colours=["green", "pink"],
                              about="chairs, half green and half pink"),
    "four-colour-cars": dict(count=16, seed=2002, kinds=["car"], colours=["red", "yellow", "cyan", "purple"],
                             about="cars in four colours"),
    "orange-lamps-and-snowmen": dict(count=16, seed=2003, kinds=["lamp", "snowman"], colours=["orange"],
                                     about="lamps and snowmen, all orange"),
    "ducks-of-all-sizes": dict(count=16, seed=2004, kinds=["duck"], colours=["green"], scale_range=(0.75, 1.25),
                               about="green ducks from small to large"),
}
SPEC_DEFAULTS = dict(scale_range=(0.75, 1.25), overhead_share=0.0, camera=dict())
METRICS = ("kind", "colour", "view", "size")
# The paper's recipe, whatever the defaults are.
PAPER = ["train.objective=gaussian", "train.lr=1e-3", "prompt.shared_base=false"]


def reference_folder(name: str, work: Path) -> Path:
    if name in BUNDLED:
        return ROOT / "examples" / "refs" / name
    from dd3d.tiny.reference_sets import write_reference_set

    folder = work / "sets" / name
    if not (folder / "README.md").is_file():
        write_reference_set(folder, name, spec={**SPEC_DEFAULTS, **HELD_OUT[name]})
    return folder


def class_prompt(labels: dict[str, list[str]]) -> str:
    """What the references share, in words: "a <kind>", or "a <colour> object" when they span kinds."""
    kinds, colours = set(labels["kind"]), set(labels["colour"])
    if len(kinds) == 1:
        return f"a {next(iter(kinds))}"
    return f"a {next(iter(colours))} object" if len(colours) == 1 else "an object"


def resampled(images: list, n: int, seed: int) -> list:
    """n of the images drawn with replacement (seeded): what a sampler that draws the references exactly gives."""
    return [images[i] for i in np.random.default_rng(seed).integers(len(images), size=n)]


def same_training(saved, cfg) -> bool:
    """Whether a cached run was trained as `cfg` would train it: settings it predates take their defaults, and its
    `sample` section only draws progress grids."""
    saved = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "train_distribution.yaml"), saved)
    strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k != "sample"}  # noqa: E731
    return strip(saved) == strip(cfg)


def learned_samples(refs: Path, runs: Path, seed: int, steps: int, n: int, overrides: list[str]) -> list:
    """Train a distribution on `refs` with the stage-1 overrides (once per distinct set of them: variants that only
    change sampling share the run) and sample it n times with the sampling overrides (sample2d.<key>=value)."""
    from dd3d.learn import train
    from dd3d.sample2d import sample

    learn_args = [o for o in overrides if not o.startswith("sample2d.")]
    sample_args = [o.removeprefix("sample2d.") for o in overrides if o.startswith("sample2d.")]
    run = runs / ("-".join(learn_args).replace("/", "_") or "default") / f"seed-{seed}"
    dist = run / "distribution.safetensors"
    cfg = load_config("train_distribution.yaml", None, [f"steps={steps}", f"seed={seed}", "sample.every=0",
                                                        "checkpoint_every=100000", "overwrite=true", *learn_args],
                      images=str(refs), out=str(run))
    saved = run / "config.yaml"
    if not (dist.is_file() and saved.is_file() and same_training(OmegaConf.load(saved), cfg)):
        train(cfg)
    out = run / ("2d-" + ("-".join(sample_args) or "default"))
    sample(load_config("sample2d.yaml", None, [f"n={n}", "steps=20", f"seed={seed}", "batch_size=16",
                                               *sample_args], dists=[str(dist)], out=str(out)))
    return ev.load_images(out)


def evaluate_set(name: str, args, oracle, backbone, variants: dict[str, list[str]]) -> dict:
    refs = reference_folder(name, args.work)
    labels, _, _ = ev.reference_reading(oracle, refs, ev.load_images(refs))
    words = class_prompt(labels).split(" ", 1)[1]
    variants = {variant: [o.replace("{class}", words) for o in overrides] for variant, overrides in variants.items()}
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        ceiling = ev.text_images(backbone, ev.exact_captions(labels, args.n), seed)
        methods = {
            **{variant: lambda o=overrides: learned_samples(refs, args.work / "runs" / name, seed, args.steps,
                                                             args.n, o)
               for variant, overrides in variants.items()},
            "class": lambda: ev.text_images(backbone, [class_prompt(labels)] * args.n, seed),
            "references": lambda: resampled(ev.load_images(refs), args.n, seed),
        }
        for method, make in methods.items():
            started = time.time()
            result = ev.evaluate_2d(oracle, refs, make(), ceiling)
            result["seconds"] = time.time() - started
            rows.setdefault(method, []).append(result)
        top = ev.evaluate_2d(oracle, refs, ceiling, ceiling)
        rows.setdefault("captions", []).append(top)
        print(f"  {name} seed {seed} done", flush=True)
    return {method: summarise(results) for method, results in rows.items()}


def summarise(results: list[dict]) -> dict:
    mean = lambda values: float(np.mean(values))  # noqa: E731
    out = {f"tv_{m}": mean([r["tv"][m] for r in results]) for m in METRICS}
    for key in ("precision", "recall", "density", "coverage", "frechet"):
        out[key] = mean([r["oracle_features"][key] for r in results])
    out["confidence"] = mean([r["confidence"] for r in results])
    out["confidence_ratio"] = mean([r["confidence_ratio"] for r in results])
    out["colours"] = dict(Counter(c for r in results for c in r["samples"]["labels"]["colour"]).most_common())
    return out


def table(results: dict[str, dict]) -> str:
    header = ("| set | method | TV kind | TV colour | TV view | TV size | coverage | density | Frechet | "
              "conf/ceiling | sample colours |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    methods = list(next(iter(results.values())))
    for name, by_method in results.items():
        for method in methods:
            r = by_method[method]
            colours = ", ".join(f"{c} {k}" for c, k in r["colours"].items())
            lines.append(f"| {name} | {method} | " + " | ".join(f"{r[f'tv_{m}']:.2f}" for m in METRICS)
                         + f" | {r['coverage']:.2f} | {r['density']:.2f} | {r['frechet']:.0f} | "
                         f"{r['confidence_ratio']:.2f} | {colours} |")
    for method in methods:
        rows = [by_method[method] for by_method in results.values()]
        lines.append(f"| **mean** | {method} | " + " | ".join(
            f"{np.mean([r[f'tv_{m}'] for r in rows]):.2f}" for m in METRICS)
            + f" | {np.mean([r['coverage'] for r in rows]):.2f} | {np.mean([r['density'] for r in rows]):.2f} | "
            f"{np.mean([r['frechet'] for r in rows]):.0f} | {np.mean([r['confidence_ratio'] for r in rows]):.2f} | |")
    return "\n".join(lines)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in re.split(r",(?![^\[]*\])", overrides) if o]  # commas inside [...] belong to a list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=[*BUNDLED, *HELD_OUT], choices=[*BUNDLED, *HELD_OUT])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="more seeds: more minutes, less noise")
    parser.add_argument("--steps", type=int, default=300, help="stage-1 steps of every learned method")
    parser.add_argument("--n", type=int, default=32, help="samples per method, set and seed")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a learned method besides dd and k1 (stage-1 overrides; sample2d.<key>=value)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the paper and k1 baselines (each trains its own runs)")
    parser.add_argument("--no-default", action="store_true", help="skip dd3d's defaults (only the variants)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-fidelity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dd3d.backbone import Backbone
    from dd3d.tiny.oracle import Oracle

    variants = {} if args.no_baselines else {"paper": PAPER}
    if not args.no_default:
        variants["dd3d"] = []  # today's defaults (configs/train_distribution.yaml)
    variants.update(parse_variant(v) for v in args.variant)
    if not args.no_baselines:
        variants["k1"] = [*PAPER, "prompt.num_prompts=1"]
    oracle, backbone = Oracle.load(), Backbone.load(None)
    started = time.time()
    results = {}
    path = args.work / "results.json"
    for name in args.sets:
        results[name] = evaluate_set(name, args, oracle, backbone, variants)
        print(table({name: results[name]}), flush=True)  # each set as it finishes: a cut-off run still reports
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))
    print(f"\n{table(results)}\n\n{len(args.sets)} sets x {len(args.seeds)} seeds, {args.steps} stage-1 steps, "
          f"{args.n} samples each: {time.time() - started:.0f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
