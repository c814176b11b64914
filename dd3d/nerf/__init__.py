"""The stage-2 3D representation: hash-grid NeRF field, occupancy grid, volume renderer, cameras (pure PyTorch;
tinycudann and nerfacc are used on a GPU when installed)."""

from dd3d.nerf.cameras import CameraBatch, camera_rays, orbit_cameras, sample_cameras, view_label
from dd3d.nerf.encoding import HashGridEncoding
from dd3d.nerf.field import NeRFField
from dd3d.nerf.occupancy import OccupancyGrid
from dd3d.nerf.renderer import VolumeRenderer

__all__ = [
    "CameraBatch",
    "HashGridEncoding",
    "NeRFField",
    "OccupancyGrid",
    "VolumeRenderer",
    "camera_rays",
    "orbit_cameras",
    "sample_cameras",
    "view_label",
]
