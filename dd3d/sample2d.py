"""The 2D path: new images from learned prompt distributions through the diffusers Stable Diffusion pipeline.

Examples:
  python scripts/sample2d.py --dist outputs/x/distribution.safetensors --n 16
  python scripts/sample2d.py --dist d.safetensors --prefix "a photo of" --suffix "at night"   # text-guided edit
  python scripts/sample2d.py --dist d.safetensors --std-scale 2                              # more variation
  python scripts/sample2d.py --dist a.safetensors b.safetensors --weights 0.7 0.3 --mix mixture
  python scripts/sample2d.py --dist d.safetensors --seed 3 --fixed-noise   # same instances across edits/scales
  python scripts/sample2d.py --dist d.safetensors --describe               # nearest words of each learned token
  python scripts/sample2d.py --from-manifest outputs/x/2d/manifest.json --index 5   # regenerate one image
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dd3d.backbone import SCHEDULERS, generate, guidance_window, make_pipeline, open_backbone
from dd3d.cli import CONFIG_DIR, UserError, add_config_arguments, check_ranges, load_config, parse_arguments
from dd3d.distribution import Mixture, PromptDistribution, build_sampler, load_distribution
from dd3d.files import atomic_write, image_grid
from dd3d.progress import tqdm

PROMPT_STREAM, LATENT_STREAM, STRATA_STREAM = 0, 1, 2
GOLDEN = (5**0.5 - 1) / 2  # the Weyl sequence frac(offset + i * GOLDEN) covers [0, 1) evenly for every n
NULLABLE = dict.fromkeys(("model", "out", "prefix", "suffix"), "")  # the types of keys whose default is null
NULLABLE |= {"weights": [0.0], "class_index": 0, "resolution": 0}
CONFIG_RANGES = {
    "sampler": ("in", ("auto", "gaussian", "prompts")),
    "sampler_bandwidth": (">=", 0),
    "sampler_shrink": (">=", 0, "<=", 1),
    "sampler_shrink_neighbours": (">=", 0),
    "n": (">=", 1),
    "batch_size": (">=", 1),
    "seed": (">=", 0),
    "steps": (">=", 1),
    "guidance": (">=", 0),
    "resolution": (">=", 8),
    "describe_topk": (">=", 1),
}


# --- noise: a stream per image ------------------------------------------------------------------------------------


def noise_key(cfg: DictConfig) -> int:
    """0 with fixed noise (noise depends on seed and image index only), else a digest of what the run samples, so
    runs that differ in edits, scales or mixes get fresh instances."""
    if cfg.fixed_noise:
        return 0
    recipe = [list(cfg.dists), cfg.weights and list(cfg.weights), cfg.mix, list(cfg.std_scale), cfg.prefix, cfg.suffix]
    return int.from_bytes(hashlib.sha256(json.dumps(recipe).encode()).digest()[:4], "little")


def image_generator(cfg: DictConfig, index: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([cfg.seed, index, stream, noise_key(cfg)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def prompt_noise(cfg: DictConfig, index: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard-normal eps (77, d) and the mixture uniform of image `index`."""
    generator = image_generator(cfg, index, PROMPT_STREAM)
    return torch.randn(shape, generator=generator), torch.rand((), generator=generator)


def stratified_uniform(cfg: DictConfig, sampler, index: int, uniform: torch.Tensor) -> torch.Tensor:
    """The mixture uniform of image `index`: with cfg.stratify (mixtures only), image i takes the component found at
    position frac(offset + i / golden ratio) along the components' main axis (Mixture.spread_uniform), a
    low-discrepancy sequence, so the first n images of a run draw every component in proportion to its weight (to
    within about two images) instead of by independent chance, and image i's component does not depend on n. Otherwise, and
    for a Gaussian, `uniform` itself."""
    if not (cfg.stratify and isinstance(sampler, Mixture)):
        return uniform
    offset = float(torch.rand((), generator=image_generator(cfg, 0, STRATA_STREAM)))  # one offset per run
    return torch.tensor(sampler.spread_uniform((offset + index * GOLDEN) % 1.0))


# --- the run -------------------------------------------------------------------------------------------------------


def render_indices(cfg: DictConfig, backbone, sampler, indices: list[int], progress: bool = False):
    """Images (and mixture components) for the given image indices, in batches of cfg.batch_size."""
    pipeline = make_pipeline(backbone, cfg.scheduler)
    negative = backbone.encode_text([cfg.negative_prompt])
    resolution = cfg.resolution or backbone.resolution
    shape = sampler.components[0].mean.shape if isinstance(sampler, Mixture) else sampler.mean.shape
    images, components = [], []
    batches = [indices[i : i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    for batch in tqdm(batches, desc="sample", disable=not progress):
        eps, uniforms = zip(*(prompt_noise(cfg, index, shape) for index in batch))
        uniforms = [stratified_uniform(cfg, sampler, index, u) for index, u in zip(batch, uniforms)]
        embeddings, chosen = sampler.apply(torch.stack(eps), torch.stack(uniforms))
        generators = [image_generator(cfg, index, LATENT_STREAM) for index in batch]
        images += generate(pipeline, embeddings, negative, cfg.steps, cfg.guidance, generators, resolution,
                           guidance_window(cfg.guidance_interval))
        components += chosen.tolist()
    return images, components


def sample(cfg: DictConfig) -> Path:
    """Write one PNG per image, a grid and manifest.json (enough to regenerate every image) to cfg.out."""
    check_ranges(cfg, CONFIG_RANGES)
    guidance_window(cfg.guidance_interval)
    backbone = open_backbone(cfg)
    sampler = build_sampler(cfg, backbone)
    out = Path(cfg.out)
    images, components = render_indices(cfg, backbone, sampler, list(range(cfg.n)), progress=True)
    entries = []
    for index, (image, component) in enumerate(zip(images, components)):
        name = f"{index:04d}.png"
        atomic_write(out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
        entries.append({"file": name, "index": index, "component": component})
    atomic_write(out / "grid.png", lambda tmp: image_grid(images).save(tmp, format="PNG"))
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings["dists"] = [str(Path(path).resolve()) for path in cfg.dists]
    settings["model"] = backbone.model_id
    manifest = {"settings": settings, "images": entries}
    atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return out


def regenerate(manifest_path: Path, index: int, backbone=None) -> Image.Image:
    """Image `index` of a sample2d run, made again from its manifest alone."""
    manifest = json.loads(Path(manifest_path).read_text())
    # The defaults fill settings that manifests of older versions lack; those made before the guidance interval
    # existed guided every step, those made before stratification drew each component independently.
    settings = {"guidance_interval": [0.0, 1.0], "stratify": False, **manifest["settings"]}
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "sample2d.yaml"), settings)
    if not 0 <= index < cfg.n:
        raise UserError(f"index {index} is outside this run's {cfg.n} images")
    backbone = backbone or open_backbone(cfg)
    images, _ = render_indices(cfg, backbone, build_sampler(cfg, backbone), [index])
    return images[0]


def describe(dist: PromptDistribution, backbone, topk: int = 5) -> list[list[tuple[str, float]]]:
    """For each learned position, the `topk` vocabulary tokens nearest (cosine) to the mean context over K."""
    table = backbone.text_encoder.embeddings.token_embedding.weight.detach().float().cpu()
    mean = dist.ctx.mean(dim=0)
    similarity = torch.nn.functional.normalize(mean, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    scores, ids = similarity.topk(topk, dim=-1)
    return [
        [(backbone.tokenizer.decode([int(i)]).strip(), float(s)) for i, s in zip(row_ids, row)]
        for row_ids, row in zip(ids, scores)
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="sample2d.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dist", nargs="+", help="distribution file(s): .safetensors, or reference .pt checkpoints")
    parser.add_argument("--weights", nargs="+", type=float, help="mixing weights, one per distribution")
    parser.add_argument("--mix", choices=["blend", "mixture"])
    parser.add_argument("--std-scale", nargs="+", type=float, help="std scale(s): 0 = the mean, 1 = as learned")
    parser.add_argument("--prefix", help="generation template text before the learned tokens")
    parser.add_argument("--suffix", help="generation template text after the learned tokens")
    parser.add_argument("--negative-prompt", help="unconditional branch text (default: the empty prompt)")
    parser.add_argument("--n", type=int, help="number of images")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--fixed-noise", action="store_true", default=None, help="the same instances across runs")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS))
    parser.add_argument("--class-index", type=int, help="class of a reference checkpoint (only single-class: 0)")
    parser.add_argument("--model", help="hub id or local diffusers folder (default: the distribution's model)")
    parser.add_argument("--out", help="output folder (default: <distribution folder>/2d)")
    parser.add_argument("--describe", action="store_true", default=None, help="print the learned tokens' nearest words")
    parser.add_argument("--from-manifest", type=Path, help="regenerate an image of an earlier run (with --index)")
    parser.add_argument("--index", type=int, default=0, help="image index for --from-manifest")
    add_config_arguments(parser)
    args = parse_arguments(parser, argv, "sample2d.yaml")
    if args.from_manifest is not None:
        if not args.from_manifest.is_file():
            raise UserError(f"manifest {args.from_manifest} does not exist")
        path = Path(args.out or args.from_manifest.parent) / f"regenerated-{args.index:04d}.png"
        image = regenerate(args.from_manifest, args.index)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        print(f"wrote {path}")
        return
    flags = {
        "dists": args.dist,
        "weights": args.weights,
        "mix": args.mix,
        "std_scale": args.std_scale,
        "prefix": args.prefix,
        "suffix": args.suffix,
        "negative_prompt": args.negative_prompt,
        "n": args.n,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "fixed_noise": args.fixed_noise,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "class_index": args.class_index,
        "model": args.model,
        "out": args.out,
        "describe": args.describe,
    }
    cfg = load_config("sample2d.yaml", args.config, args.overrides, nullable=NULLABLE, **flags)
    if not cfg.dists:
        raise UserError("pass --dist <distribution file> [more files]")
    for path in cfg.dists:
        if not Path(path).is_file():
            raise UserError(f"distribution file {path} does not exist")
    if cfg.describe:
        backbone = open_backbone(cfg)
        for path in cfg.dists:
            dist = load_distribution(path, backbone, cfg.class_index)
            dist.check_backbone(backbone)
            template = " ".join(part for part in (dist.prefix, f"[ctx x {dist.n_ctx}]", dist.suffix) if part)
            print(f"{path}: template '{template}'")
            for position, tokens in enumerate(describe(dist, backbone, cfg.describe_topk)):
                print(f"  ctx[{position}]: " + ", ".join(f"{token} ({score:.2f})" for token, score in tokens))
        return
    if cfg.out is None:
        cfg.out = str(Path(cfg.dists[0]).parent / "2d")
    print(f"wrote {sample(cfg)}")
