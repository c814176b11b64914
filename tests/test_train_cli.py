"""Stage 1 from the command line: a full run, resume equality, and every bad input giving one line and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dd3d.distribution import PromptDistribution
from dd3d.learn import PromptLearner, main
from dd3d.prompts import SoftPromptEncoder
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
FAST = ["prompt.num_prompts=4", "train.batch_size=2", "train.num_samples=2", "augment.crops=1", "sample.every=0"]


def cli(args, capsys):
    code, captured = run_cli(main, args, capsys)
    return code, captured.err


def test_end_to_end_subprocess(tiny_model, refs, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_distribution.py"), "--images", str(refs),
           "--model", str(tiny_model), "--out", str(out), "steps=4", "checkpoint_every=2", "sample.every=2",
           "sample.n=4", "sample.steps=2", "prompt.num_prompts=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.pt", "step-000004.pt"]
    dist = PromptDistribution.load(out / "distribution.safetensors")
    assert dist.ctx.shape == (4, 4, 32)
    tensors = load_file(str(out / "distribution.safetensors"))  # the contexts and each prompt's share, nothing else
    assert set(tensors) == {"ctx", "weights"} and tensors["weights"].shape == (4,)
    assert tensors["weights"].sum().item() == pytest.approx(1.0) and dist.sampler == "prompts"
    assert "step 4 loss" in (out / "train.log").read_text()


@pytest.mark.parametrize("objective", [[], ["train.objective=per_reference", "prompt.shared_base=true"],
                                       ["train.objective=per_reference", "train.view_words=true"]])
def test_resume_equals_uninterrupted(objective, tiny_model, refs, tmp_path, capsys):
    common = ["--images", refs, "--model", tiny_model, "checkpoint_every=2", *FAST, *objective]
    code, err = cli([*common, "--out", tmp_path / "whole", "steps=4"], capsys)
    assert code == 0, err
    assert cli([*common, "--out", tmp_path / "split", "steps=2"], capsys)[0] == 0  # "killed" after step 2
    assert cli(["--out", tmp_path / "split", "resume=true", "steps=4"], capsys)[0] == 0
    whole = PromptDistribution.load(tmp_path / "whole" / "distribution.safetensors").ctx
    split = PromptDistribution.load(tmp_path / "split" / "distribution.safetensors").ctx
    first = torch.load(tmp_path / "split" / "checkpoints" / "step-000002.pt")["ctx"]
    assert not torch.equal(first, split)  # the resumed run did train further
    assert torch.equal(whole, split)
    if "train.view_words=true" in objective:  # each prompt's view word is in the file
        views = PromptDistribution.load(tmp_path / "whole" / "distribution.safetensors").views
        assert len(views) == 4 and set(views) <= {"front", "side", "back", "overhead"}


def test_refuses_a_folder_holding_another_run(tiny_model, refs, tmp_path, capsys):
    args = ["--images", refs, "--model", tiny_model, "--out", tmp_path / "run", "steps=1", *FAST]
    assert cli(args, capsys)[0] == 0
    code, err = cli(args, capsys)
    assert code == 2 and "already holds a run" in err
    assert cli([*args, "overwrite=true"], capsys)[0] == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "holds no image files"),
        ("corrupt", "none of the 2 image files"),
        ("bad-model", "neither an existing folder nor a hub id"),
        ("not-diffusers", "not a diffusers"),
        ("bad-override", "bad configuration"),
        ("bad-interval", "sample.guidance_interval must be [low, high]"),
        ("view-words-objective", "train.view_words needs train.objective=per_reference"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(case, message, tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    model = tiny_model
    extra = []
    if case == "missing":
        images = tmp_path / "nowhere"
    elif case == "corrupt":
        (images / "a.png").write_bytes(b"junk")
        (images / "b.jpg").write_bytes(b"\xff\xd8junk")
    elif case == "bad-model":
        model = tmp_path / "no-model"
    elif case == "not-diffusers":
        model = images
    elif case == "bad-override":
        extra = ["train.no_such_key=1"]
    elif case == "bad-interval":
        extra = ["sample.guidance_interval=[0.5]"]
    elif case == "view-words-objective":
        extra = ["train.view_words=true", "train.objective=gaussian"]
    out = tmp_path / "run"
    code, err = cli(["--images", images, "--model", model, "--out", out, "steps=1", *extra], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_bf16_mixed_precision_trains_like_fp32(tiny_model, backbone, refs, tmp_path, capsys):
    """The GPU default (frozen model in bf16 under autocast, ctx in fp32) runs on CPU too and learns the same way."""
    # The paper's smooth objective: under `specialise` a bf16 rounding can flip which draw wins, a discrete change
    # that says nothing about the precision path's numerics.
    common = ["--images", refs, "--model", tiny_model, "steps=2", *FAST, "sample.every=2", "sample.n=2",
              "sample.steps=2", "train.objective=gaussian"]  # the later sample.every wins
    code, err = cli([*common, "--out", tmp_path / "no", "train.mixed_precision=no"], capsys)
    assert code == 0, err
    # accelerate fixes a process's precision at its first Accelerator: the bf16 run gets its own process.
    script = str(ROOT / "scripts" / "train_distribution.py")
    args = [str(a) for a in (*common, "--out", tmp_path / "bf16", "train.mixed_precision=bf16")]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "precision bf16" in (tmp_path / "bf16" / "train.log").read_text()
    assert (tmp_path / "bf16" / "samples" / "step-000002.png").is_file()
    cfg = OmegaConf.load(tmp_path / "bf16" / "config.yaml")
    p = cfg.prompt
    encoder = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, p.n_ctx, p.prefix, p.suffix)
    start = PromptLearner(encoder, p.num_prompts, p.init_std, cfg.seed).ctx.detach()  # both runs' initial ctx
    fp32, bf16 = (load_file(str(tmp_path / p / "distribution.safetensors"))["ctx"] for p in ("no", "bf16"))
    assert bf16.dtype == torch.float32
    similarity = torch.cosine_similarity((fp32 - start).flatten(), (bf16 - start).flatten(), dim=0)
    assert similarity > 0.9 and not torch.equal(fp32, bf16), similarity


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tiny_model, refs, tmp_path, capsys, monkeypatch):
    from dd3d import learn

    original = learn.training_losses
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss, denoise, ortho = original(*args)
        return (loss * float("nan") if len(calls) == 3 else loss), denoise, ortho

    monkeypatch.setattr(learn, "training_losses", poisoned)
    args = ["--images", refs, "--model", tiny_model, "--out", tmp_path / "run", "steps=4", "checkpoint_every=2", *FAST]
    code, err = cli(args, capsys)
    assert code == 2 and "loss became non-finite (nan" in err and "at step 3" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002.pt"]
    assert not (tmp_path / "run" / "distribution.safetensors").exists()
