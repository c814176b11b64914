#!/usr/bin/env python
"""Train the embedded default model (dd3d/tiny/model) and its oracle from scratch (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import run  # noqa: E402
from dd3d.tiny.train import main  # noqa: E402

if __name__ == "__main__":
    run(main)
