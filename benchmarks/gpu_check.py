"""GPU self-check: is every fast path active, does everything run, and how fast is it -- in one command.

Steps, in order (each prints as it goes; a failing step is recorded as FAIL with a one-line reason and the rest
still run; the exit code is 1 if any step failed):
  env           torch/CUDA/GPU, tinycudann and nerfacc (and the backends dd3d picks), the attention kernel, dtypes
  gpu-tests     the tinycudann and nerfacc tests (pytest, in a subprocess; they skip without CUDA)
  stage1        learn a distribution on the embedded model from examples/refs/cool-mugs, a few steps
  2d            sample 2 images from it (4 denoising steps)
  gen3d         stage 2 from it (300 iterations on CUDA, 4 without), turntable and mesh export
  bench-stage1  stage-1 training step, fp32 vs bf16 (benchmarks/bench_train_step.py), with peak memory
  bench-stage2  stage-2 iteration vs the UNet floor (benchmarks/bench_gen3d.py), with peak memory
On CUDA the benchmarks use the Stable-Diffusion-2.1-base shapes (random weights; benchmarks/sd_shapes.py); the
whole check is meant to take at most 8 minutes on one H100/H200, nerfacc's first compile of its CUDA extension
included (not measured yet). Without CUDA the same sequence runs at toy sizes, on one thread, in under a minute
(tests/test_gpu_check.py runs it).
Peak memory is torch.cuda.max_memory_allocated on CUDA; without CUDA, benchmarks/bench_memory.py's tensor tracker.
The tables are rewritten after every step to <out>/gpu_check.md (or to --out FILE.md), so a cut-off run keeps
what it reached.
Run: python benchmarks/gpu_check.py [--out outputs/gpu-check] [--size auto|full|toy] [--only env,stage1,...]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30
REFS = ROOT / "examples" / "refs" / "cool-mugs"
GPU_TESTS = (
    "tests/test_nerf_encoding.py::test_tcnn_matches_torch_path",
    "tests/test_nerf_renderer.py::test_nerfacc_path_matches_torch_path",
    "tests/test_distribution.py::test_prompt_mixture_fitted_on_the_gpu_draws_what_the_cpu_one_draws",
)


class Skip(Exception):
    """The step does not apply on this machine: reported as SKIP, not as a failure."""


@dataclass
class Check:
    table: Path  # where the tables are written
    size: str  # "full" (SD-2.1-base shapes, GPU lengths) or "toy"
    work: Path  # scratch folder for the end-to-end runs
    images: Path  # reference images for stage 1
    env: list = field(default_factory=list)  # (what, value)
    rows: list = field(default_factory=list)  # (step, result, seconds, details)
    numbers: list = field(default_factory=list)  # (what, value, target)
    state: dict = field(default_factory=dict)  # handed from step to step
    started: float = field(default_factory=time.perf_counter)

    @property
    def full(self) -> bool:
        return self.size == "full"

    def note(self, what: str, value: str) -> None:
        self.env.append((what, value))
        say(f"  {what}: {value}")

    def number(self, what: str, value: str, target: str = "") -> None:
        self.numbers.append((what, value, target if self.full else ("n/a at toy size" if target else "")))
        say(f"  {what}: {value}" + (f" (target {target})" if target and self.full else ""))


def say(text: str) -> None:
    print(text, flush=True)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else repr(err)}"
    return text if len(text) <= 240 else text[:237] + "..."


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 100 else f"{size / 2**20:.1f} MiB"


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def release() -> None:
    gc.collect()
    if cuda():
        import torch

        torch.cuda.empty_cache()


# --- env ----------------------------------------------------------------------------------------------------------


def probe_import(name: str) -> tuple[bool, str]:
    try:
        module = __import__(name)
    except Exception as err:  # ImportError, or a binary built for another torch/CUDA
        missing = isinstance(err, ModuleNotFoundError) and err.name == name
        return False, "not installed" if missing else f"import fails ({one_line(err)})"
    return True, f"imports ({getattr(module, '__version__', 'version unknown')})"


def nerfacc_extension() -> str:
    """Why nerfacc's CUDA extension is or is not there (it is compiled on the first import when nvcc exists)."""
    try:
        from nerfacc.cuda._backend import _C
    except Exception as err:
        return f"CUDA extension fails ({one_line(err)})"
    return "CUDA extension loaded" if _C is not None else "no CUDA extension (no CUDA toolkit / nvcc?)"


def attention_kernel(device: str, dtype, grad: bool) -> str:
    """The fused SDPA kernel PyTorch picks for SD-2.1's self-attention shape (5 heads of 64, 32x32 tokens)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    query = torch.randn(2, 5, 1024, 64, device=device, dtype=dtype, requires_grad=grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(query, query, query)
    names = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    return names[0].removeprefix("aten::_scaled_dot_product_") if names else "math (unfused)"


def step_env(check: Check) -> str:
    import torch

    check.note("python", f"{platform.python_version()} ({sys.executable})")
    check.note("torch", torch.__version__)
    check.note("CUDA", f"torch built for {torch.version.cuda}" if torch.version.cuda else "none (CPU build of torch)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / GIB:.0f} GiB, sm_{props.major}{props.minor}"
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            gpu += f", driver {subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
        check.note("GPU", gpu)
        check.note("cuDNN", str(torch.backends.cudnn.version()))
    else:
        check.note("GPU", "none: CUDA is not available (toy sizes)")
    threads = torch.get_num_threads()
    check.note("CPU threads", f"{threads}" + (" (this check's choice at toy size)" if device == "cpu" else ""))
    check.note("fp32 matmul precision", torch.get_float32_matmul_precision() + " (highest = no TF32)")
    for name in ("diffusers", "transformers", "accelerate"):
        check.note(name, probe_import(name)[1])

    from dd3d.backbone import model_dtype
    from dd3d.cli import load_config
    from dd3d.gen3d import Scene
    from dd3d.learn import PRECISION_DTYPES, resolve_precision
    from dd3d.nerf.renderer import nerfacc_available

    check.note("tinycudann", probe_import("tinycudann")[1])
    found, text = probe_import("nerfacc")
    if found and device == "cuda":
        say("  (nerfacc compiles its CUDA extension on first use: this can take a few minutes)")
        text += ", " + nerfacc_extension()
    check.note("nerfacc", text)
    # The backends dd3d picks with the GPU defaults (configs/gen3d.yaml, backend: auto).
    cfg = load_config("gen3d.yaml", None, [])
    scene = Scene(cfg)
    hash_grid = scene.field.encoding.backend
    uses_nerfacc = scene.renderer.backend != "torch" and device == "cuda" and nerfacc_available()
    ray_march = "nerfacc" if uses_nerfacc else "torch"
    check.note("dd3d hash grid backend", hash_grid + ("" if hash_grid == "tcnn" else " (pure PyTorch)"))
    check.note("dd3d ray marching backend", ray_march + ("" if uses_nerfacc else " (pure PyTorch)"))
    del scene

    from diffusers.models.attention_processor import Attention

    processor = type(Attention(query_dim=8, heads=1, dim_head=8).processor).__name__
    check.note("diffusers attention", processor + (" (F.scaled_dot_product_attention)" if "2_0" in processor else ""))
    stage1 = resolve_precision("auto")
    models = model_dtype("auto", device)
    kernels = {"2D/3D": attention_kernel(device, models, grad=False)}
    if stage1 != "no":
        kernels["stage 1"] = attention_kernel(device, PRECISION_DTYPES[stage1], grad=True)
    check.note("SDPA kernel", ", ".join(f"{k}: {v}" for k, v in kernels.items()))
    check.note("stage 1 mixed precision (auto)", f"{stage1} (ctx fp32)")
    check.note("2D/3D model dtype (auto)", f"{str(models).removeprefix('torch.')} (renders fp32)")
    check.note("size of this check", check.size)
    return (
        f"{device}; hash grid {hash_grid}, ray march {ray_march}, SDPA {kernels['2D/3D']}; "
        f"stage 1 {stage1}, 2D/3D {str(models).removeprefix('torch.')}"
    )


# --- GPU-only tests -----------------------------------------------------------------------------------------------


def step_gpu_tests(check: Check) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    say("\n".join("  | " + line for line in output.strip().splitlines()[-15:]))
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", output)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary"
    if done.returncode != 0:
        failed = re.findall(r"^(?:FAILED|ERROR) (.*)$", output, flags=re.M)
        raise RuntimeError(f"pytest exit {done.returncode}: {summary}" + (f"; {failed[0]}" if failed else ""))
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", output, flags=re.M)))
    if not counts.get("passed"):
        raise Skip(f"{summary} ({'; '.join(reasons)})")
    return summary + (f" ({'; '.join(reasons)})" if reasons else "")


# --- end to end on the embedded model -----------------------------------------------------------------------------


def step_stage1(check: Check) -> str:
    from dd3d.learn import main, resolve_precision

    steps = 10 if check.full else 4
    out = check.work / "stage1"
    main(["--images", str(check.images), "--out", str(out), f"steps={steps}", "sample.every=0", "log_every=1"])
    dist = out / "distribution.safetensors"
    if not dist.is_file():
        raise RuntimeError(f"{dist} was not written")
    check.state["dist"] = dist
    losses = re.findall(r"^step \d+ loss (\S+)", (out / "train.log").read_text(), flags=re.M)
    return f"{steps} steps, precision {resolve_precision('auto')}, last loss {losses[-1] if losses else '?'}"


def distribution(check: Check) -> Path:
    if "dist" not in check.state:
        raise RuntimeError("needs the distribution that stage1 writes (stage1 failed or did not run)")
    return check.state["dist"]


def step_2d(check: Check) -> str:
    from PIL import Image

    from dd3d.sample2d import main

    out = check.work / "2d"
    main(["--dist", str(distribution(check)), "--n", "2", "--steps", "4", "--out", str(out)])
    images = sorted(out.glob("0*.png"))
    if len(images) != 2 or not (out / "grid.png").is_file():
        raise RuntimeError(f"expected 2 images and grid.png in {out}, found {[p.name for p in out.iterdir()]}")
    width, height = Image.open(images[0]).size
    return f"2 images of {width}x{height} px, 4 denoising steps"


def step_gen3d(check: Check) -> str:
    from dd3d.gen3d import main

    steps = 300 if check.full else 4
    out = check.work / "gen3d"
    settings = [f"steps={steps}"]
    if not check.full:  # the CPU profile (configs/gen3d_cpu.yaml), trimmed to seconds
        settings += ["camera.width=16", "camera.height=16", "renderer.num_steps=32", "occupancy.resolution=16"]
        settings += ["validation.every=0", "video.frames=2", "video.size=16", "export.resolution=32"]
    start = time.perf_counter()
    main(["--dist", str(distribution(check)), "--out", str(out), *settings])
    seconds = time.perf_counter() - start
    meshes = sorted(path.name for path in out.glob("mesh.*"))
    if not {"mesh.obj", "mesh.glb"} <= set(meshes):
        raise RuntimeError(f"no mesh.obj/mesh.glb in {out} (found {meshes}): the export failed or was skipped")
    faces = sum(line.startswith("f ") for line in (out / "mesh.obj").read_text().splitlines())
    turntable = next(out.glob("turntable.*"), None)
    if turntable is None:
        raise RuntimeError(f"no turntable video in {out}")
    return f"{steps} iterations + turntable ({turntable.suffix}) + export in {seconds:.1f} s; {faces:,} faces"


# --- benchmarks ---------------------------------------------------------------------------------------------------


def sd_backbone(check: Check, dtype):
    """The SD-2.1-base-shaped model (random weights) at this check's size, built once; the UNet and text encoder
    cast to `dtype` (the VAE follows with vae=True)."""
    from sd_shapes import sd21_base_backbone

    if "sd" not in check.state:
        say(f"  building the SD-2.1-base-shaped model ({check.size}, random weights)")
        check.state["sd"] = sd21_base_backbone("cuda" if cuda() else "cpu", dtype, check.size)
    backbone = check.state["sd"]
    backbone.text_encoder.to(dtype)
    backbone.unet.to(dtype)
    return backbone


def timed_with_peak(run, *modules):
    """(result of run(), peak bytes, how measured): torch.cuda.max_memory_allocated on CUDA; on CPU, the resident
    weights of `modules` plus the peak of bench_memory's tracker of the tensors created during the run."""
    import torch

    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated(), "max_memory_allocated"
    from bench_memory import LiveTensorBytes, nbytes

    tracker = LiveTensorBytes()
    with tracker:
        result = run()
    return result, nbytes(*modules) + tracker.peak, "tensor tracker"


def step_bench_stage1(check: Check) -> str:
    import torch
    from bench_train_step import time_steps
    from sd_shapes import SIZES

    latent = SIZES[check.size]["unet"][-1]
    steps = 10 if check.full else 1
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        backbone = sd_backbone(check, dtype or torch.float32)
        ms, peak, how = timed_with_peak(
            lambda backbone=backbone, dtype=dtype: time_steps(backbone, latent, steps, dtype),
            backbone.text_encoder,
            backbone.unet,
        )
        results[name] = ms, peak
        check.number(f"stage 1 step {name}, {8 * latent} px, batch 4 x M 4, K 32", f"{ms:.1f} ms")
        check.number(f"stage 1 peak memory {name} ({how})", gib(peak), "fits 24 GB" if name == "bf16" else "")
    speedup = results["fp32"][0] / results["bf16"][0]
    check.number("stage 1 bf16 speed-up over fp32", f"{speedup:.2f}x", ">= 2x")
    return f"fp32 {results['fp32'][0]:.1f} ms, bf16 {results['bf16'][0]:.1f} ms ({speedup:.2f}x), {steps} steps each"


def step_bench_stage2(check: Check) -> str:
    import torch
    from bench_gen3d import run

    from dd3d.cli import CONFIG_DIR, load_config

    dtype = torch.float16 if cuda() else torch.float32  # gen3d's dtype=auto
    backbone = sd_backbone(check, dtype)
    backbone.vae.to(dtype)
    if check.full:
        cfg, iterations = load_config("gen3d.yaml", None, []), 20
    else:
        toy = ["camera.width=16", "camera.height=16", "renderer.num_steps=32", "occupancy.resolution=16"]
        cfg, iterations = load_config("gen3d.yaml", None, toy, base=CONFIG_DIR / "gen3d_cpu.yaml"), 1
    timings, peak, how = timed_with_peak(
        lambda: run(backbone, cfg, iterations), backbone.text_encoder, backbone.unet, backbone.vae
    )
    floor = timings.pop("floor")
    iteration = sum(timings.values())
    split = ", ".join(f"{name} {ms:.1f}" for name, ms in timings.items())
    label = f"{str(dtype).removeprefix('torch.')} model, render {cfg.camera.width}x{cfg.camera.height}"
    check.number(f"stage 2 iteration ({label})", f"{iteration:.1f} ms ({split})")
    check.number("stage 2 UNet floor (CFG forward + VAE encode fwd/bwd)", f"{floor:.1f} ms")
    check.number("stage 2 iteration / floor", f"{iteration / floor:.2f}x", "<= 1.25x")
    check.number("stage 2, 10k iterations", f"{iteration * 10:.0f} s", "< 600 s")
    check.number(f"stage 2 peak memory ({how})", gib(peak), "fits 24 GB")
    return f"iteration {iteration:.1f} ms, floor {floor:.1f} ms ({iteration / floor:.2f}x), {iterations} iterations"


STEPS = {
    "env": step_env,
    "gpu-tests": step_gpu_tests,
    "stage1": step_stage1,
    "2d": step_2d,
    "gen3d": step_gen3d,
    "bench-stage1": step_bench_stage1,
    "bench-stage2": step_bench_stage2,
}


# --- the run ------------------------------------------------------------------------------------------------------


def write_tables(check: Check) -> None:
    lines = [
        "# dd3d GPU check",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, size {check.size}, "
        f"{time.perf_counter() - check.started:.0f} s so far",
        "",
        "## Environment",
        "",
        "| what | value |",
        "|---|---|",
        *(f"| {what} | {value} |" for what, value in check.env),
        "",
        "## Steps",
        "",
        "| step | result | time | details |",
        "|---|---|---|---|",
        *(f"| {name} | {result} | {seconds:.1f} s | {details} |" for name, result, seconds, details in check.rows),
        "",
        "## Numbers",
        "",
        "| what | value | target |",
        "|---|---|---|",
        *(f"| {what} | {value} | {target} |" for what, value, target in check.numbers),
        "",
    ]
    check.table.parent.mkdir(parents=True, exist_ok=True)
    temporary = check.table.with_name(check.table.name + ".tmp")
    temporary.write_text("\n".join(line.replace("\n", " ") for line in lines))
    temporary.replace(check.table)


def run_steps(check: Check, steps: dict) -> int:
    """Run every step, recording PASS / SKIP / FAIL; returns the number of failed steps."""
    failures = 0
    for number, (name, step) in enumerate(steps.items(), 1):
        say(f"\n== [{number}/{len(steps)}] {name}")
        start = time.perf_counter()
        stderr = io.StringIO()  # progress bars and library chatter; warnings are shown after the step
        try:
            with contextlib.redirect_stderr(stderr):
                result, details = "PASS", step(check)
        except Skip as skip:
            result, details = "SKIP", str(skip)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit from a script's argument parsing too
            traceback.print_exc(file=sys.stdout)
            result, details = "FAIL", one_line(err)
            failures += 1
        lines = [line.strip() for line in re.split(r"[\r\n]+", stderr.getvalue()) if line.strip()]
        warnings = [line for line in lines if re.match(r"(warning:|\S*Warning: )", line)]  # dd3d's and Python's
        shown = lines[-20:] if result == "FAIL" else warnings[-10:]
        if shown:
            say("\n".join("  stderr| " + line for line in shown))
        seconds = time.perf_counter() - start
        check.rows.append((name, result, seconds, details))
        say(f"== {name}: {result} ({seconds:.1f} s) {details}")
        write_tables(check)
        release()
    return failures


def main(argv=None, steps: dict | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check", help="folder, or a .md file")
    parser.add_argument("--size", choices=["auto", "full", "toy"], default="auto", help="auto: full on CUDA")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {','.join(STEPS)}")
    parser.add_argument("--images", type=Path, default=REFS, help="reference images for stage1")
    args = parser.parse_args(argv)
    steps = dict(steps or STEPS)
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in steps]
        if unknown:
            parser.error(f"unknown step {unknown[0]!r}; steps: {', '.join(steps)}")
        steps = {name: steps[name] for name in args.only.split(",")}
    table = args.out if args.out.suffix == ".md" else args.out / "gpu_check.md"
    size = args.size if args.size != "auto" else ("full" if cuda() else "toy")
    import torch

    threads = torch.get_num_threads()
    if size == "toy" and not cuda():
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and on a busy machine threads contend
    try:
        with tempfile.TemporaryDirectory(prefix="dd3d-gpu-check-") as work:
            check = Check(table=table, size=size, work=Path(work), images=args.images)
            say(f"dd3d GPU check, size {size}: {', '.join(steps)}; tables -> {table}")
            failures = run_steps(check, steps)
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - check.started
    write_tables(check)
    say(f"\n{len(steps) - failures} of {len(steps)} steps passed or skipped, {failures} failed, {total:.0f} s")
    say(table.read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only local models here
    sys.exit(main())
