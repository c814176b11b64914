#!/usr/bin/env python
"""Export a trained gen3d asset as .obj/.glb meshes (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd3d.cli import run  # noqa: E402
from dd3d.gen3d import export_main  # noqa: E402

if __name__ == "__main__":
    run(export_main)
