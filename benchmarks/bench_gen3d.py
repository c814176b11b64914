"""Stage-2 iteration time split into render, VAE encode, UNet (CFG; with the profile's score: SDS, or interval score
matching with its DDIM inversion), the reconstruction pull's decode (when the profile uses it), backward and optimiser
step.

CPU: the embedded default model with configs/gen3d_cpu.yaml. GPU: a Stable-Diffusion-2.1-base-shaped model with
random weights in fp16 (UNet, VAE) and the fp32 render at 64x64 with configs/gen3d.yaml. Also prints the UNet-only floor
(UNet CFG forward + VAE encode forward/backward, timed in the same run) and the iteration time over that floor.
--size toy: the SD-2.1-base layout at small widths with configs/gen3d_cpu.yaml, on any device (a quick check).
Run: python benchmarks/bench_gen3d.py [--iterations 20] [--size full|toy]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dd3d.backbone import Backbone  # noqa: E402
from dd3d.cli import CONFIG_DIR, load_config  # noqa: E402
from dd3d.gen3d import Scene, sample_training_cameras  # noqa: E402
from dd3d.sds import ScoreDistillation, sds_gradient, sds_loss  # noqa: E402


class Timer:
    def __init__(self, device):
        self.device, self.totals = device, {}

    @contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


def run(backbone: Backbone, cfg, iterations: int) -> dict:
    device = backbone.device
    scene = Scene(cfg).to(device)
    optimizer = torch.optim.Adam(scene.parameters(), lr=1e-2, eps=1e-15)
    guidance = ScoreDistillation(backbone, recon_weight=cfg.guidance.recon_weight, score=cfg.guidance.score,
                                 interval=cfg.guidance.interval, inversion_stride=cfg.guidance.inversion_stride)
    d = backbone.text_encoder.config.hidden_size
    cond, uncond = torch.randn(1, 77, d, device=device), torch.randn(1, 77, d, device=device)
    timer = Timer(device)
    for step in range(iterations + 3):
        if step == 3:
            timer.totals = {}  # warm-up done
        generator = torch.Generator().manual_seed(step)
        scene.occupancy.update(step, scene.field.density)
        cameras = sample_training_cameras(cfg, generator).to(device)
        with timer("render"):
            rgb = scene.render(cameras, cfg.camera.height, cfg.camera.width)["rgb"]
        with timer("vae encode"):
            pixels, latents = guidance.encode(rgb)
        t = torch.randint(20, 980, (1,), device=device)
        noise = torch.randn(latents.shape, generator=generator).to(device) if cfg.guidance.score == "sds" else None
        with timer(f"unet ({cfg.guidance.score})"):
            gradient = guidance.score_gradient(latents, cond, uncond, t, noise)
        loss = sds_loss(latents, gradient)
        if guidance.recon_weight > 0:
            with timer("recon decode"):
                loss = loss + guidance.reconstruction_loss(pixels, latents, guidance.recon_weight)
        with timer("backward"):
            loss.backward()
        with timer("optimiser"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # The floor: UNet CFG forward + VAE encode forward and backward, on a fixed image.
    image = torch.rand(1, cfg.camera.height, cfg.camera.width, 3, device=device, requires_grad=True)
    for step in range(iterations + 3):
        if step == 3:
            timer.totals.pop("floor", None)
        with timer("floor"):
            _, latents = guidance.encode(image)
            gradient = sds_gradient(
                backbone, latents, cond, uncond, torch.tensor([500], device=device), torch.randn_like(latents), 100.0
            )
            sds_loss(latents, gradient).backward()
    return {name: 1000 * total / iterations for name, total in timer.totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--size", choices=["full", "toy"], default="full", help="SD-2.1-base shape or a toy one")
    args = parser.parse_args()
    if args.size == "toy":
        from sd_shapes import sd21_base_backbone

        device = "cuda" if torch.cuda.is_available() else "cpu"
        backbone = sd21_base_backbone(device, torch.float32, "toy")
        cfg = load_config("gen3d.yaml", None, [], base=CONFIG_DIR / "gen3d_cpu.yaml")
        label = f"SD-2.1-base layout at toy size, fp32, {device}"
        timings = run(backbone, cfg, args.iterations)
    elif torch.cuda.is_available():
        from sd_shapes import sd21_base_backbone

        backbone = sd21_base_backbone("cuda", torch.float16)
        backbone.vae.to(torch.float16)
        cfg = load_config("gen3d.yaml", None, [])
        label = f"SD-2.1-base shape fp16, {torch.cuda.get_device_name()}"
        timings = run(backbone, cfg, args.iterations)
    else:
        backbone = Backbone.load(None)
        cfg = load_config("gen3d.yaml", None, [], base=CONFIG_DIR / "gen3d_cpu.yaml")
        label = f"embedded default model, cpu ({torch.get_num_threads()} threads)"
        timings = run(backbone, cfg, args.iterations)
    floor = timings.pop("floor")
    total = sum(timings.values())
    print(f"# {label}, render {cfg.camera.width}x{cfg.camera.height}, {args.iterations} iterations")
    for name, ms in timings.items():
        print(f"{name:<14}{ms:>9.1f} ms")
    print(f"{'iteration':<14}{total:>9.1f} ms")
    print(f"{'unet floor':<14}{floor:>9.1f} ms   (iteration / floor = {total / floor:.2f}x)")
    print(f"10k iterations: {total * 10:.0f} s")


if __name__ == "__main__":
    main()
