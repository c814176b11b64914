"""Peak tensor memory of a stage-2 iteration and a stage-1 step with a Stable-Diffusion-2.1-base-sized model,
measured without a GPU.

A dispatch-mode tracker adds up the bytes of every tensor storage created during the step while it is alive, in
the order a GPU would run the step. The frozen model lives on the meta device (shapes and dtypes only), so a 1.3 B
parameter model costs nothing here, and its attention is counted as the fused kernel a GPU runs; the NeRF render
of stage 2 runs for real on CPU (its sample count depends on the field). Weights, the learnable state and Adam's
moments are added as resident memory. Not counted: the CUDA context (about 0.5 GB), the caching allocator's
rounding and fragmentation, cuBLAS/cuDNN workspaces, and autocast's fp32 outputs (stage 1's activations are
counted in the frozen model's dtype).
Run: python benchmarks/bench_memory.py [--stage 1|2|both]
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_shapes import sd21_base_backbone  # noqa: E402

from dd3d.cli import load_config  # noqa: E402
from dd3d.gen3d import Scene, light_positions, sample_training_cameras  # noqa: E402
from dd3d.learn import PromptLearner, training_losses  # noqa: E402
from dd3d.prompts import SoftPromptEncoder  # noqa: E402
from dd3d.sds import ScoreDistillation, sds_gradient, sds_loss  # noqa: E402

GIB = 2**30


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive, and the peak of that sum."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():  # a view shares its base's storage
                self._add(tensor.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.current += self.sizes[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key)


def fused_attention(sdpa):
    """F.scaled_dot_product_attention as a GPU runs it (a fused kernel keeping the output and the log-sum-exp, no
    attention matrix) for unmasked meta tensors: on meta, PyTorch would pick the math path and materialise it."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not query.is_meta or attn_mask is not None or kwargs:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        kernel = torch.ops.aten._scaled_dot_product_efficient_attention
        return kernel(query, key, value, None, needs_grad, dropout_p, is_causal, scale=scale)[0]

    return attention


def nbytes(*modules) -> int:
    return sum(p.nbytes for module in modules for p in module.parameters())


def frozen_model(dtype: torch.dtype):
    """The SD-2.1-base-shaped model on the meta device: shapes and dtypes only, nothing allocated or computed."""
    with torch.device("meta"):
        backbone = sd21_base_backbone("meta", dtype)
    backbone.vae.to(dtype)
    return backbone


def stage2(dtype: torch.dtype) -> tuple[dict, int, str]:
    """One gen3d iteration with configs/gen3d.yaml (64x64 render, Lambertian shading, normals, occupancy warm-up:
    every sample in the box is marched), the UNet and VAE in `dtype`. Returns (resident bytes by part, peak bytes
    during the step, a note)."""
    cfg = load_config("gen3d.yaml", None, [])
    backbone = frozen_model(dtype)
    width = backbone.text_encoder.config.hidden_size
    cond, uncond = torch.zeros(1, 77, width, device="meta"), torch.zeros(1, 77, width, device="meta")
    guidance = ScoreDistillation(backbone)
    scene = Scene(cfg)
    scene.occupancy.update(0, scene.field.density)
    generator = torch.Generator().manual_seed(0)
    cameras = sample_training_cameras(cfg, generator)
    lights = light_positions(cameras, cfg.camera, generator)
    tracker = LiveTensorBytes()
    with tracker:
        out = scene.render(cameras, cfg.camera.height, cfg.camera.width, "lambertian", lights, normals=True)
        render_live = tracker.current
        rgb = out["rgb"].detach().to("meta").requires_grad_(True)  # SDS through the VAE encoder, on meta
        _, latents = guidance.encode(rgb)
        t = torch.tensor([500], device="meta")
        gradient = sds_gradient(backbone, latents, cond, uncond, t, torch.zeros_like(latents), 100.0)
        sds_loss(latents, gradient).backward()
        del latents, gradient
        rgb_grad = torch.rand_like(out["rgb"])  # the gradient on to the field, for real
        (out["rgb"] * rgb_grad).sum().add(cfg.loss.orient * out["loss_orient"]).backward()
    resident = {
        "frozen model weights": nbytes(backbone.text_encoder, backbone.unet, backbone.vae),
        "field, background, Adam": nbytes(scene) * 3,  # parameters and Adam's moments; gradients are in the peak
    }
    note = f"{out['num_samples']:,} samples marched; the render's activations: {render_live / GIB:.2f} GiB"
    return resident, tracker.peak, note


def stage1(dtype: torch.dtype) -> tuple[dict, int, str]:
    """One training step with configs/train_distribution.yaml (batch 4, M=4, K=32, n_ctx=4) at 512 px, the
    frozen model in `dtype` (its activations in `dtype` too: autocast's fp32 ops are not modelled)."""
    cfg = load_config("train_distribution.yaml", None, [])
    backbone = frozen_model(dtype)
    latents = torch.zeros(64, 4, 64, 64, device="meta")  # e.g. 16 references x 4 views, encoded once
    prompt = cfg.prompt
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, prompt.n_ctx, prompt.prefix, prompt.suffix)
    learner = PromptLearner(encoder, prompt.num_prompts, prompt.init_std, cfg.seed, prompt.shared_base).to("meta")
    tracker = LiveTensorBytes()
    with tracker:
        loss, _, _ = training_losses(learner, backbone, latents, cfg.train, torch.Generator().manual_seed(0))
        loss.backward()
    resident = {
        "frozen model weights": nbytes(backbone.text_encoder, backbone.unet, backbone.vae),
        "ctx, Adam, latents": learner.ctx.nbytes * 3 + latents.nbytes,
    }
    return resident, tracker.peak, f"{len(latents)} encoded reference views"


def report(title: str, resident: dict, peak: int, note: str) -> None:
    print(f"# {title} ({note})")
    for name, size in {**resident, "peak during the step": peak, "total peak": sum(resident.values()) + peak}.items():
        print(f"{name:<26}{size / GIB:>9.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["1", "2", "both"], default="both")
    args = parser.parse_args()
    F.scaled_dot_product_attention = fused_attention(F.scaled_dot_product_attention)
    if args.stage in ("2", "both"):
        report("stage 2: gen3d iteration, SD-2.1-base shape, fp16 model, fp32 render 64x64", *stage2(torch.float16))
    if args.stage in ("1", "both"):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            report(f"stage 1: training step, SD-2.1-base shape at 512 px, batch 4 x M 4, K 32, {name}", *stage1(dtype))


if __name__ == "__main__":
    main()
