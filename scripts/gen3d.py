#!/usr/bin/env python
"""Stage 2: text-to-3D with a learned prompt distribution as SDS guidance (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import run  # noqa: E402
from dd3d.gen3d import main  # noqa: E402

if __name__ == "__main__":
    run(main)
