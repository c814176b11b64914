"""Stage 2: optimise a hash-grid NeRF with score distillation from a learned prompt distribution.

Examples:
  python scripts/gen3d.py --dist outputs/x/distribution.safetensors --out outputs/x3d
  python scripts/gen3d.py --dist d.safetensors --prefix "a" --suffix "made of stone" --num-samples 4
  python scripts/gen3d.py --prompt "a red chair"          # plain text-to-3D (DreamFusion)
  python scripts/gen3d.py --out outputs/x3d resume=true   # continue after a kill
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dd3d.backbone import guidance_window, open_backbone
from dd3d.cli import (
    CONFIG_DIR,
    UserError,
    add_config_arguments,
    check_ranges,
    check_unchanged_on_resume,
    load_config,
    parse_arguments,
    prepare_run_dir,
    warn,
)
from dd3d.distribution import Mixture
from dd3d.export import extract_mesh, write_mesh
from dd3d.files import Checkpoints, atomic_write
from dd3d.nerf import NeRFField, OccupancyGrid, VolumeRenderer, camera_rays, orbit_cameras, sample_cameras
from dd3d.progress import tqdm
from dd3d.sds import ScoreDistillation, check_timestep_range
from dd3d.view_prompts import ViewPrompts

RUN_KIND = "gen3d"
# What a run writes in its folder (and in each sample-N/ of a multi-asset run); mesh.* includes export_mesh.py's files.
RUN_FILES = ("config.yaml", "checkpoints", "validation", "train.log", "turntable.*", "mesh.*", "sample-*")
NULLABLE = dict.fromkeys(("prompt", "model", "out", "prefix", "suffix"), "")  # types of keys whose default is null
NULLABLE |= {"weights": [0.0], "class_index": 0, "export.threshold": 0.0}
NULLABLE |= dict.fromkeys(("guidance.grad_clip", "guidance.recon_weight_end", "guidance.recon_chroma_weight_end"), 0.0)
NULLABLE |= dict.fromkeys(("export.resolution", "export.texture", "export.face_budget"), 0)
NULLABLE |= {"camera.light_direction": [0.0], "view_negative_steps": 0, "optim.average_from": 0}
CONFIG_RANGES = {
    "sampler": ("in", ("auto", "gaussian", "prompts")),
    "sampler_bandwidth": (">=", 0),
    "sampler_shrink": (">=", 0, "<=", 1),
    "sampler_shrink_neighbours": (">=", 0),
    "seed": (">=", 0),
    "steps": (">=", 1),
    "num_samples": (">=", 1),
    "prompt_draw": ("in", ("auto", "per_iteration", "per_asset")),
    "prompt_jitter": (">=", 0),
    "view_negative": (">=", 0),
    "view_negative_steps": (">=", 0),
    "view_negative_late": (">=", 0),
    "asset_neighbours": (">=", 1),
    "asset_shared": (">=", 0, "<=", 1),
    "camera.batch_size": (">=", 1),
    "camera.width": (">=", 1),
    "camera.height": (">=", 1),
    "renderer.ambient": (">=", 0),
    "renderer.diffuse": (">=", 0),
    "loss.orient": (">=", 0),
    "loss.sparsity": (">=", 0),
    "loss.opaque": (">=", 0),
    "shading.albedo_steps": (">=", 0),
    "shading.albedo": (">=", 0, "<=", 1),
    "shading.textureless": (">=", 0, "<=", 1),
    "guidance.guidance_scale": (">=", 0),
    "guidance.anneal_steps": (">=", 0),
    "guidance.weighting": ("in", ("sds", "uniform")),
    "guidance.score": ("in", ("sds", "interval")),
    "guidance.interval": (">=", 1),
    "guidance.inversion_stride": (">=", 1),
    "guidance.grad_clip": (">", 0),
    "guidance.recon_weight": (">=", 0),
    "guidance.recon_weight_end": (">=", 0),
    "guidance.recon_chroma_weight": (">=", 0),
    "guidance.recon_chroma_weight_end": (">=", 0),
    "optim.lr": (">", 0),
    "optim.eps": (">", 0),
    "optim.betas": (">=", 0, "<", 1),
    "optim.average_from": (">=", 0),
    "validation.every": (">=", 0),
    "validation.views": (">=", 1),
    "validation.size": (">=", 1),
    "checkpoint_every": (">=", 1),
    "keep_checkpoints": (">=", 1),
    "log_every": (">=", 1),
    "video.frames": (">=", 1),
    "video.fps": (">", 0),
    "video.size": (">=", 1),
    "export.resolution": (">=", 2),
    "export.texture": (">=", 1),
    "export.face_budget": (">=", 1),
    "export.surface": ("in", ("opacity", "density")),
}
FIXED_ON_RESUME = ("field", "renderer.background", "occupancy.resolution")  # they fix the checkpoint's shapes


class Scene(torch.nn.Module):
    """Field, renderer (with its background) and occupancy grid: everything a checkpoint holds besides Adam."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.field = NeRFField(**OmegaConf.to_container(cfg.field, resolve=True))
        self.renderer = VolumeRenderer(**OmegaConf.to_container(cfg.renderer, resolve=True))
        self.occupancy = OccupancyGrid(radius=cfg.field.radius, **OmegaConf.to_container(cfg.occupancy, resolve=True))

    def render(self, cameras, height: int, width: int, shading: str = "albedo", lights=None, normals=True) -> dict:
        origins, directions = camera_rays(cameras, height, width)
        return self.renderer(self.field, origins, directions, self.occupancy, shading, lights, normals)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.field(points)[1]


class WeightAverage:
    """The running mean of a scene's parameters over the steps after `start` (stochastic weight averaging,
    Izmailov et al. 2018): the asset is the mean of where the noisy late optimisation wandered, not its last step."""

    def __init__(self, scene: Scene, start: int):
        self.start, self.count = start, 0
        self.mean = {name: p.detach().clone() for name, p in scene.named_parameters()}

    @torch.no_grad()
    def update(self, scene: Scene, done: int) -> None:
        if done > self.start:
            self.count += 1
            for name, p in scene.named_parameters():
                self.mean[name].lerp_(p.detach(), 1.0 / self.count)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = {name: value.to(self.mean[name]) for name, value in state["mean"].items()}


def apply_average(scene: Scene, state: dict | None) -> None:
    """Put a checkpoint's averaged weights (`WeightAverage.state_dict`) into the scene, if it holds any, and mark
    the occupancy grid's cells for them."""
    if state and int(state["count"]) > 0:
        scene.load_state_dict(state["mean"], strict=False)
        scene.occupancy.refresh(scene.field.density)


STEP_STREAM, ASSET_PROMPT_STREAM, INIT_STREAM, SPREAD_STREAM = 0, 1, 2, 3


def derived_seed(seed: int, asset: int, stream: int, step: int = 0) -> int:
    """One integer per (seed, asset, stream, step): a resumed run draws exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, asset, stream, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


DISTANT_LIGHT = 100.0  # world units: a point light this far away lights the scene box like a directional light


def light_positions(cameras, cfg: DictConfig, generator: torch.Generator) -> torch.Tensor:
    """A point light per camera: near the camera's direction, a random multiple of the camera distance away
    (DreamFusion); or, with cfg.light_direction, a distant light near that direction fixed in the world."""
    fixed = cfg.light_direction is not None
    if fixed:
        direction = torch.nn.functional.normalize(torch.tensor(list(cfg.light_direction), dtype=torch.float32), dim=0)
        direction = direction.expand(len(cameras), 3)
    else:
        direction = cameras.positions / cameras.distance[:, None]
    jittered = torch.nn.functional.normalize(
        direction + cfg.light_jitter * torch.randn(direction.shape, generator=generator), dim=-1
    )
    low, high = cfg.light_distance_range
    scale = low + (high - low) * torch.rand(len(cameras), generator=generator)
    return jittered * (DISTANT_LIGHT if fixed else (scale * cameras.distance)[:, None])


def pick_shading(cfg: DictConfig, step: int, generator: torch.Generator) -> str:
    if step < cfg.albedo_steps:
        return "albedo"
    roll = float(torch.rand((), generator=generator))
    if roll < cfg.albedo:
        return "albedo"
    return "textureless" if roll < cfg.albedo + cfg.textureless else "lambertian"


def sample_training_cameras(cfg: DictConfig, generator: torch.Generator | None, n: int | None = None):
    camera = cfg.camera
    try:
        return sample_cameras(
            n or camera.batch_size,
            tuple(camera.elevation_range),
            tuple(camera.azimuth_range),
            tuple(camera.distance_range),
            tuple(camera.fovy_range),
            generator=generator,
            scene_radius=cfg.field.radius,
            thresholds=dict(camera.view_thresholds),
        )
    except ValueError as err:
        raise UserError(f"impossible camera ranges: {err}") from None


class PromptNoise:
    """The standard-normal eps and mixture uniform fed to the view Gaussians each step (see `prompt_draw`)."""

    def __init__(self, cfg: DictConfig, asset: int, prompts: ViewPrompts):
        mode = cfg.prompt_draw
        if mode == "auto":
            mode = "per_iteration" if cfg.num_samples == 1 else "per_asset"
        if mode not in ("per_iteration", "per_asset"):
            raise UserError(f"prompt_draw must be auto, per_iteration or per_asset, not '{cfg.prompt_draw}'")
        self.mode, self.jitter, self.shape = mode, cfg.prompt_jitter, prompts.shape
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, asset, ASSET_PROMPT_STREAM))
        self.asset_eps, self.asset_uniform = (
            torch.randn(self.shape, generator=generator),
            torch.rand((), generator=generator),
        )
        mixture = prompts.samplers["front"]
        if mode == "per_asset" and cfg.asset_spread and isinstance(mixture, Mixture):
            offset = torch.rand((), generator=torch.Generator().manual_seed(derived_seed(cfg.seed, 0, SPREAD_STREAM)))
            self.asset_uniform = torch.tensor(mixture.spread_uniform((asset + float(offset)) / cfg.num_samples))
        self.neighbours = None
        if mode == "per_asset" and cfg.asset_neighbours > 1 and isinstance(mixture, Mixture):
            self.neighbours = mixture.neighbour_uniforms(float(self.asset_uniform), cfg.asset_neighbours)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = torch.randn((n, *self.shape), generator=generator)
        if self.mode == "per_iteration":
            return fresh, torch.rand(n, generator=generator)
        eps = (self.asset_eps + self.jitter * fresh) / math.sqrt(1 + self.jitter**2)  # still standard normal
        if self.neighbours is None:
            return eps, self.asset_uniform.expand(n)
        uniforms, weights = self.neighbours
        return eps, uniforms[torch.multinomial(weights, n, replacement=True, generator=generator)]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().clamp(0, 1) * 255).round().byte().cpu().numpy()


@torch.no_grad()
def render_views(scene: Scene, cameras, size: int, shading: str, lights=None) -> list[np.ndarray]:
    out = scene.render(cameras, size, size, shading, lights)
    return [to_uint8(image) for image in out["rgb"]]


@torch.no_grad()
def write_validation(scene: Scene, cfg: DictConfig, path: Path) -> None:
    """Albedo (top row) and Lambertian-shaded (bottom row) renders from evenly spaced azimuths."""
    val = cfg.validation
    cameras = orbit_cameras(val.views, cfg.video.elevation, cfg.video.distance, cfg.video.fovy).to(_device(scene))
    lights = cameras.positions * 1.5
    rows = render_views(scene, cameras, val.size, "albedo") + render_views(
        scene, cameras, val.size, "lambertian", lights
    )
    grid = Image.new("RGB", (val.size * val.views, val.size * 2))
    for index, image in enumerate(rows):
        grid.paste(Image.fromarray(image), ((index % val.views) * val.size, (index // val.views) * val.size))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


@torch.no_grad()
def turntable_frames(scene: Scene, cfg: DictConfig, count: int) -> list[np.ndarray]:
    """`count` Lambertian renders from evenly spaced azimuths on the video orbit, lit from beside the camera."""
    video = cfg.video
    cameras = orbit_cameras(count, video.elevation, video.distance, video.fovy).to(_device(scene))
    frames = []
    for start in range(0, count, 8):
        part = cameras[start : start + 8]
        frames += render_views(scene, part, video.size, "lambertian", part.positions * 1.5)
    return frames


def write_turntable(scene: Scene, cfg: DictConfig, folder: Path) -> Path:
    """A turntable video (mp4 via imageio-ffmpeg, a gif when ffmpeg is unavailable) of the shaded asset."""
    video = cfg.video
    frames = turntable_frames(scene, cfg, video.frames)
    try:
        path = folder / "turntable.mp4"
        atomic_write(
            path, lambda tmp: imageio.mimwrite(tmp, frames, fps=video.fps, format="FFMPEG", macro_block_size=1)
        )
    except (ImportError, RuntimeError, OSError, ValueError) as err:
        warn(f"no mp4 writer ({str(err).splitlines()[0]}); writing a gif instead")
        path = folder / "turntable.gif"
        images = [Image.fromarray(frame) for frame in frames]
        atomic_write(
            path,
            lambda tmp: images[0].save(
                tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / video.fps), loop=0
            ),
        )
    return path


def _device(scene: Scene) -> torch.device:
    return next(scene.parameters()).device


def export(scene: Scene, cfg: DictConfig, folder: Path, progress: bool = True) -> list[Path]:
    """The asset as meshes (formats in cfg.export) in `folder`."""
    mesh = extract_mesh(
        scene.field.density,
        scene.albedo,
        aabb=scene.field.radius,
        resolution=cfg.export.resolution,
        threshold=cfg.export.threshold,
        surface=cfg.export.surface,
        texture_size=cfg.export.texture,
        face_budget=cfg.export.face_budget,
        device=_device(scene),
        progress=progress,
    )
    return write_mesh(mesh, folder / "mesh", formats=list(cfg.export.formats))


def train_asset(cfg: DictConfig, backbone, prompts: ViewPrompts, asset: int, folder: Path) -> Path:
    """Optimise one asset in `folder` (resuming from its last checkpoint when asked); returns the folder."""
    device = backbone.device
    torch.manual_seed(derived_seed(cfg.seed, asset, INIT_STREAM))  # the field's initial weights
    scene = Scene(cfg).to(device)
    optimizer = torch.optim.Adam(scene.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, betas=tuple(cfg.optim.betas))
    guidance = ScoreDistillation(backbone, **OmegaConf.to_container(cfg.guidance, resolve=True))
    noise = PromptNoise(cfg, asset, prompts)
    checkpoints = Checkpoints(folder / "checkpoints", cfg.keep_checkpoints)
    average = None if cfg.optim.average_from is None else WeightAverage(scene, cfg.optim.average_from)
    start = 0
    if cfg.resume and (state := checkpoints.load_latest()) is not None:
        scene.load_state_dict(state["scene"])
        optimizer.load_state_dict(state["optimizer"])
        if average is not None and "average" in state:
            average.load_state_dict(state["average"])
        start = state["step"]
    log = open(folder / "train.log", "a")
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} asset {asset} steps {start}->{cfg.steps} on {device}\n")
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"3d {folder.name}")
    for step in progress:
        seed = derived_seed(cfg.seed, asset, STEP_STREAM, step)
        torch.manual_seed(seed)  # the renderer's stratified jitter and the occupancy grid's samples
        generator = torch.Generator().manual_seed(seed)
        scene.train()
        scene.occupancy.update(step, scene.field.density)
        cameras = sample_training_cameras(cfg, generator)
        lights = light_positions(cameras, cfg.camera, generator)
        shading = pick_shading(cfg.shading, step, generator)
        out = scene.render(
            cameras.to(device),
            cfg.camera.height,
            cfg.camera.width,
            shading,
            lights.to(device),
            normals=cfg.loss.orient > 0,
        )
        eps, uniforms = noise.draw(len(cameras), generator)
        cond, uncond = prompts.draw(cameras.views, eps, uniforms)
        negatives = None
        early = cfg.view_negative_steps is None or step < cfg.view_negative_steps
        if (weight := cfg.view_negative if early else cfg.view_negative_late) > 0:
            negatives = [x.to(device) for x in prompts.negatives(cameras.views, cameras.azimuth_deg, eps, uniforms,
                                                                        weight)]
        shared = None
        if cfg.asset_shared > 0 and noise.mode == "per_asset" and not cfg.prompt:  # a plain prompt is its own mixture
            fresh = torch.randn(eps.shape, generator=generator), torch.rand(len(cameras), generator=generator)
            shared = prompts.draw(cameras.views, *fresh)[0].to(device), cfg.asset_shared
        sds, info = guidance(out["rgb"], cond.to(device), uncond.to(device), step, generator, out["opacity"],
                             negatives, shared)
        loss = (
            sds
            + cfg.loss.orient * out["loss_orient"]
            + cfg.loss.sparsity * out["loss_sparsity"]
            + cfg.loss.opaque * out["loss_opaque"]
        )
        if not torch.isfinite(loss):
            kept = checkpoints.paths()
            raise UserError(
                f"the loss became {loss.item()} at step {step + 1}; "
                + (f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written yet")
                + "; try a lower optim.lr or guidance.guidance_scale"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if average is not None:
            average.update(scene, done)

        progress.set_postfix(loss=f"{loss.item():.3g}", t=f"{info['t']:.0f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.write(
                f"step {done} loss {loss.item():.6f} sds {sds.item():.6f} t {info['t']:.0f} "
                f"opacity {out['opacity'].mean().item():.4f} samples {out['num_samples']} {shading}\n"
            )
            log.flush()
        if cfg.validation.every and done % cfg.validation.every == 0 and done < cfg.steps:
            scene.eval()
            write_validation(scene, cfg, folder / "validation" / f"step-{done:06d}.png")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            state = {"scene": scene.state_dict(), "optimizer": optimizer.state_dict()}
            checkpoints.save(done, state | ({"average": average.state_dict()} if average is not None else {}))
    progress.close()
    if average is not None:
        apply_average(scene, average.state_dict())
    scene.eval()
    if cfg.validation.every:
        write_validation(scene, cfg, folder / "validation" / f"step-{cfg.steps:06d}.png")
    write_turntable(scene, cfg, folder)
    if cfg.export.formats:
        try:
            export(scene, cfg, folder)
        except UserError as err:
            warn(f"mesh export skipped: {err} (run scripts/export_mesh.py {folder} with a threshold)")
    log.close()
    return folder


def asset_folders(cfg: DictConfig) -> list[Path]:
    out = Path(cfg.out)
    return [out] if cfg.num_samples == 1 else [out / f"sample-{index}" for index in range(cfg.num_samples)]


def check_config(cfg: DictConfig) -> None:
    """Every setting that can be checked without the model, checked before anything is written."""
    if bool(cfg.dists) == bool(cfg.prompt):
        raise UserError("pass either --dist <distribution file> or --prompt <text>")
    check_ranges(cfg, CONFIG_RANGES)
    light = cfg.camera.light_direction
    if light is not None and (len(light) != 3 or not any(float(v) for v in light)):
        raise UserError(f"camera.light_direction must be null or a non-zero [x, y, z], got {list(light)}")
    guidance = cfg.guidance
    check_timestep_range(guidance.min_step_percent, guidance.max_step_percent, guidance.max_step_percent_end)
    guidance_window(guidance.guidance_interval, "guidance.guidance_interval")
    sample_training_cameras(cfg, None, 1)  # impossible camera ranges
    Scene(cfg)  # field, renderer and occupancy settings


def generate(cfg: DictConfig) -> list[Path]:
    """Run (or resume) stage 2 for every asset of the configuration."""
    check_config(cfg)
    backbone = open_backbone(cfg)
    prompts = (
        ViewPrompts.from_text(cfg.prompt, backbone) if cfg.prompt else ViewPrompts.from_distributions(cfg, backbone)
    )
    out = Path(cfg.out)
    prepare_run_dir(out, cfg.resume, cfg.overwrite, RUN_KIND, RUN_FILES)
    atomic_write(out / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    folders = []
    for asset, folder in enumerate(asset_folders(cfg)):
        folder.mkdir(parents=True, exist_ok=True)
        if folder != out:  # each asset folder is self-contained for export_mesh.py
            atomic_write(folder / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
        folders.append(train_asset(cfg, backbone, prompts, asset, folder))
    return folders


def machine_profile() -> Path | None:
    """The profile merged over configs/gen3d.yaml on this machine: the CPU one when there is no CUDA device."""
    return None if torch.cuda.is_available() else CONFIG_DIR / "gen3d_cpu.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="gen3d.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dist", nargs="+", help="learned distribution file(s)")
    parser.add_argument("--prompt", help="plain text prompt instead of a distribution")
    parser.add_argument("--prefix", help="template text before the learned tokens")
    parser.add_argument("--suffix", help="template text after the learned tokens (the view is appended)")
    parser.add_argument("--num-samples", type=int, help="number of assets, each from its own draw")
    parser.add_argument("--std-scale", nargs="+", type=float)
    parser.add_argument("--weights", nargs="+", type=float)
    parser.add_argument("--mix", choices=["blend", "mixture"])
    parser.add_argument("--model", help="hub id or local diffusers folder")
    parser.add_argument("--out", help="run folder")
    add_config_arguments(parser)
    args = parse_arguments(parser, argv, "gen3d.yaml")
    flags = {
        "dists": args.dist,
        "prompt": args.prompt,
        "prefix": args.prefix,
        "suffix": args.suffix,
        "num_samples": args.num_samples,
        "std_scale": args.std_scale,
        "weights": args.weights,
        "mix": args.mix,
        "model": args.model,
        "out": args.out,
    }
    cfg = load_config("gen3d.yaml", args.config, args.overrides, machine_profile(), NULLABLE, **flags)
    if cfg.out is None:
        name = Path(cfg.dists[0]).parent.name if cfg.dists else "-".join((cfg.prompt or "asset").split())[:40]
        cfg.out = str(Path("outputs") / f"{name}-3d")
    saved = Path(cfg.out) / "config.yaml"
    if cfg.resume and saved.is_file():
        cfg = load_config("gen3d.yaml", args.config, args.overrides, saved, NULLABLE, **flags)
        check_unchanged_on_resume(saved, cfg, FIXED_ON_RESUME)
    for folder in generate(cfg):
        print(f"wrote {folder}")


def load_scene(checkpoint: Path) -> tuple[Scene, DictConfig]:
    """A trained scene from a checkpoint file inside <asset folder>/checkpoints/ and its config."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise UserError(f"no config.yaml next to {checkpoint.parent}; is {checkpoint} a gen3d checkpoint?")
    cfg = load_config("gen3d.yaml", None, [], config, NULLABLE)  # defaults fill keys older runs lack
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        scene = Scene(cfg)
        scene.load_state_dict(state["scene"])
        apply_average(scene, state.get("average"))
    except (RuntimeError, KeyError, OSError) as err:
        raise UserError(f"cannot load {checkpoint}: {str(err).splitlines()[0]}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return scene.to(device).eval(), cfg


def export_main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="export_mesh.py",
        description="Export a trained gen3d asset as .obj/.glb. TARGET: a run folder, an asset folder (sample-N) "
        "or a checkpoint file (checkpoints/step-NNNNNN.pt).",
    )
    parser.add_argument("target", type=Path)
    parser.add_argument("--resolution", type=int, help="grid samples per axis (default 256 on CUDA, 128 on CPU)")
    parser.add_argument("--surface", choices=["opacity", "density"],
                        help="opacity (default): where rays from outside turn half opaque, closed; density: an "
                        "iso-surface of the density")
    parser.add_argument("--threshold", type=float, help="a density iso-level (the density surface at that level)")
    parser.add_argument("--format", nargs="+", choices=["obj", "glb"], default=["obj", "glb"])
    parser.add_argument("--texture", type=int, help="bake an N x N albedo texture instead of vertex colours")
    parser.add_argument("--face-budget", type=int, help="decimate to at most this many faces")
    args = parser.parse_args(argv)
    target = args.target
    if target.is_file():
        checkpoints = [target]
    elif target.is_dir():
        folders = sorted(target.glob("sample-*")) or [target]
        checkpoints = [paths[-1] for folder in folders if (paths := Checkpoints(folder / "checkpoints", 1).paths())]
    else:
        raise UserError(f"{target} does not exist")
    if not checkpoints:
        raise UserError(f"{target} holds no gen3d checkpoint (checkpoints/step-*.pt)")
    for checkpoint in checkpoints:
        scene, cfg = load_scene(checkpoint)
        options = {
            "resolution": args.resolution,
            "threshold": args.threshold,
            "surface": args.surface,
            "formats": args.format,
            "texture": args.texture,
            "face_budget": args.face_budget,
        }
        cfg.export = OmegaConf.merge(cfg.export, {k: v for k, v in options.items() if v is not None})
        for path in export(scene, cfg, checkpoint.parent.parent):
            print(f"wrote {path}")
