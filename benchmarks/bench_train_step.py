"""Milliseconds per stage-1 training step (batch 4, M=4 prompt draws, K=32 prompts, n_ctx=4).

CPU: the tiny backbone. GPU: a Stable-Diffusion-2.1-base-shaped model with random weights at 512 px (64x64
latents), fp32 vs bf16 (frozen weights in bf16 under autocast, ctx in fp32, as `train.mixed_precision=bf16`).
--size toy runs those rows with the same layout at small widths (64 px), on CPU too: a quick check of the code path.
Run: python benchmarks/bench_train_step.py [--steps 10] [--size full|toy]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dd3d.backbone import Backbone  # noqa: E402
from dd3d.learn import PromptLearner, step_generator, training_losses  # noqa: E402
from dd3d.prompts import SoftPromptEncoder  # noqa: E402
from dd3d.tiny.build import save_tiny_model  # noqa: E402

DEFAULTS = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "train_distribution.yaml")
TRAIN = DEFAULTS.train


def time_steps(backbone: Backbone, latent_size: int, steps: int, autocast_dtype) -> float:
    """Mean wall-clock ms of forward + backward + AdamW step, after two warm-up steps."""
    device = backbone.device
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4)
    learner = PromptLearner(encoder, num_prompts=32, init_std=0.02, seed=0,
                            shared_base=DEFAULTS.prompt.shared_base).to(device)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3, weight_decay=1e-2)
    latents = torch.randn(16, 4, latent_size, latent_size)
    times = []
    for step in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _, _ = training_losses(learner, backbone, latents, TRAIN, step_generator(0, step, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learner.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sum(times[2:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", choices=["full", "toy"], default="full", help="SD-2.1-base shape or a toy one")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tiny = Backbone.load(save_tiny_model(Path(folder) / "tiny"))
        rows.append(("tiny backbone, 16 px", "cpu", "fp32", time_steps(tiny, 8, args.steps, None)))
    if torch.cuda.is_available() or args.size == "toy":
        from sd_shapes import SIZES, sd21_base_backbone

        device = "cuda" if torch.cuda.is_available() else "cpu"
        latent = SIZES[args.size]["unet"][-1]
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            backbone = sd21_base_backbone(device, dtype or torch.float32, args.size)
            rows.append(
                (
                    f"SD-2.1-base shape{' (toy)' if args.size == 'toy' else ''}, {8 * latent} px",
                    torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    name,
                    time_steps(backbone, latent, args.steps, dtype),
                )
            )
            del backbone
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"# {platform.node()} torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'model':<28}{'device':<28}{'precision':<11}{'ms/step':>9}")
    for model, device, precision, ms in rows:
        print(f"{model:<28}{device:<28}{precision:<11}{ms:>9.1f}")


if __name__ == "__main__":
    main()
