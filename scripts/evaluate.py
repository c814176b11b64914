#!/usr/bin/env python
"""Evaluation: 2D samples and 3D assets against their references, in numbers and a report (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import run  # noqa: E402
from dd3d.report import main  # noqa: E402

if __name__ == "__main__":
    run(main)
