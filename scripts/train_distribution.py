#!/usr/bin/env python
"""Learn a distribution over soft prompts from a folder of reference images (DreamDistribution, stage 1).

Example:
  python scripts/train_distribution.py --images refs/ --model stabilityai/stable-diffusion-2-1-base --out outputs/x
  python scripts/train_distribution.py --out outputs/x resume=true
Multi-GPU: accelerate launch scripts/train_distribution.py ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import UserError, add_config_arguments, load_config, run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of reference images")
    parser.add_argument("--model", help="hub id or local diffusers folder (default: the embedded model)")
    parser.add_argument("--out", help="run folder (default: outputs/<image folder name>)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    flags = {"images": args.images, "model": args.model, "out": args.out}
    cfg = load_config("train_distribution.yaml", args.config, args.overrides, **flags)
    if cfg.out is None:
        if cfg.images is None:
            raise UserError("pass --images <folder of reference images> (and optionally --out)")
        cfg.out = str(Path("outputs") / Path(cfg.images).resolve().name)
    saved = Path(cfg.out) / "config.yaml"
    if cfg.resume and saved.is_file():
        # Resuming: the saved run's settings, with this command's overrides on top.
        cfg = load_config("train_distribution.yaml", args.config, args.overrides, base=saved, **flags)
    if cfg.images is None:
        raise UserError("pass --images <folder of reference images>")

    from dd3d.learn import train  # heavy imports only once the arguments are good

    path = train(cfg)
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
