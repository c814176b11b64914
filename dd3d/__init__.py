"""dd3d: DreamDistribution -- prompt distributions for text-to-image diffusion, and their use as 3D guidance."""

import os

# Library chatter (per-file loading bars, dtype and backend advice) is noise in a command-line tool; errors
# still show. Set before diffusers/transformers are first imported; a user's own setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"
