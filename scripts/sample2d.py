#!/usr/bin/env python
"""The 2D path: new images from learned prompt distributions (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import run  # noqa: E402
from dd3d.sample2d import main  # noqa: E402

if __name__ == "__main__":
    run(main)
