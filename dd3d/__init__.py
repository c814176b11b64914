"""dd3d: DreamDistribution -- prompt distributions for text-to-image diffusion, and their use as 3D guidance."""

__version__ = "0.1.0"
