"""Issue 14: dd3d never deletes what it did not write, and every bad input gets one line (exit code 2)."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from dd3d import gen3d, learn, sample2d
from dd3d.backbone import Backbone
from dd3d.cli import RUN_MARKER, UserError, prepare_run_dir
from dd3d.distribution import PromptDistribution, import_reference_checkpoint
from dd3d.files import Checkpoints, atomic_write
from dd3d.sds import ScoreDistillation
from tests.conftest import run_cli
from tests.test_gen3d import SMALL

FAST = ["prompt.num_prompts=4", "train.batch_size=2", "train.num_samples=2", "augment.crops=1", "sample.every=0"]
OWNS = ("config.yaml", "checkpoints", "train.log")


def one_error_line(code, captured, message):
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def dist_file(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "distribution.safetensors"
    ctx = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(0))
    PromptDistribution(ctx, "a", "house", backbone.model_id, backbone.fingerprint).save(path)
    return path


# --- 1. overwrite deletes only what dd3d wrote ------------------------------------------------------------------


def test_overwrite_refuses_a_user_file_and_keeps_sample2d_output(tiny_model, refs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--images", refs, "--model", tiny_model, "--out", out, "steps=1", *FAST]
    assert run_cli(learn.main, args, capsys)[0] == 0
    assert json.loads((out / RUN_MARKER).read_text())["kind"] == "train_distribution"
    (out / "notes.txt").write_text("mine")
    (out / "2d").mkdir()
    (out / "2d" / "manifest.json").write_text("{}")  # what sample2d writes into <run>/2d by default
    before = sorted(p.name for p in out.iterdir())
    code, captured = run_cli(learn.main, [*args, "overwrite=true"], capsys)
    one_error_line(code, captured, "also holds notes.txt, which the train_distribution run did not write")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted, not even the run's own files
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    (out / "checkpoints" / "step-000001.pt").rename(out / "checkpoints" / "step-000099.pt")  # the old run's
    code, captured = run_cli(learn.main, [*args, "overwrite=true"], capsys)
    assert code == 0, captured.err
    assert "keeps" in captured.err and (out / "2d" / "manifest.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001.pt"]


def test_overwrite_removes_only_the_marked_runs_own_entries(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, False, False, "gen3d", OWNS)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-000001.pt").write_bytes(b"x")
    (out / "config.yaml").write_text("a: 1\n")
    (out / ".config.tmp123.yaml").write_text("half")  # a temporary file a killed run left behind
    prepare_run_dir(out, False, True, "gen3d", OWNS)
    assert [p.name for p in out.iterdir()] == [RUN_MARKER]


def test_overwrite_refuses_what_is_not_recognisably_a_dd3d_run(tmp_path):
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "checkpoints").mkdir()
    with pytest.raises(UserError, match=f"cannot tell as its own \\(no {RUN_MARKER}\\)"):
        prepare_run_dir(out, False, True, "gen3d", OWNS)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]

    stage1 = tmp_path / "stage1"
    prepare_run_dir(stage1, False, False, "train_distribution", OWNS)
    (stage1 / "config.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match="holds a train_distribution run, not a gen3d run"):
        prepare_run_dir(stage1, False, True, "gen3d", OWNS)
    assert (stage1 / "config.yaml").is_file()


def test_overwrite_recognises_a_run_of_a_dd3d_without_markers(tmp_path):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "config.yaml").write_text("images: refs\nresume: false\noverwrite: false\nsteps: 10\n")
    (out / "train.log").write_text("step 10\n")
    prepare_run_dir(out, False, True, "train_distribution", OWNS)
    assert [p.name for p in out.iterdir()] == [RUN_MARKER]


# --- 3. the merged configuration is checked before anything is written ---------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "steps must be a whole number, not 'abc'"),
        ("train.lr=fast", "train.lr must be a finite number, not 'fast'"),
        ("augment.crop_scale=1.5", "augment.crop_scale must be > 0 and <= 1, not 1.5"),
        ("resolution=big", "resolution must be a whole number"),
        ("train.objective=average",
         "train.objective must be in ('gaussian', 'specialise', 'per_reference'), not 'average'"),
    ],
)
def test_bad_values_one_line_before_the_run_folder_exists(override, message, tiny_model, refs, tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_cli(learn.main, ["--images", refs, "--model", tiny_model, "--out", out, override], capsys)
    one_error_line(code, captured, message)
    assert not out.exists()


def test_a_single_std_scale_is_a_one_element_list(tiny_model, dist_file, tmp_path, capsys):
    out = tmp_path / "2d"
    args = ["--dist", dist_file, "--model", tiny_model, "--out", out, "n=1", "steps=1", "std_scale=2"]
    code, captured = run_cli(sample2d.main, args, capsys)
    assert code == 0, captured.err
    assert json.loads((out / "manifest.json").read_text())["settings"]["std_scale"] == [2.0]
    code, captured = run_cli(gen3d.main, ["--dist", dist_file, "--out", tmp_path / "3d", *SMALL, "std_scale=x"], capsys)
    one_error_line(code, captured, "std_scale must be a finite number, not 'x'")
    code, captured = run_cli(gen3d.main, ["--dist", dist_file, "--out", tmp_path / "3d", *SMALL, "sampler=wide"], capsys)
    one_error_line(code, captured, "sampler must be in ('auto', 'gaussian', 'prompts'), not 'wide'")


# --- 4. overrides anywhere on the command line ---------------------------------------------------------------------


def test_overrides_after_a_list_option_are_overrides(tiny_model, dist_file, tmp_path, capsys):
    out = tmp_path / "2d"
    args = ["--dist", dist_file, "n=1", "steps=1", "--model", tiny_model, "--out", out]
    code, captured = run_cli(sample2d.main, args, capsys)
    assert code == 0, captured.err
    assert [p.name for p in sorted(out.glob("0*.png"))] == ["0000.png"]
    args = ["--dist", dist_file, "optim.lr=0.003", "steps=abc", "--out", tmp_path / "3d", *SMALL[1:]]
    code, captured = run_cli(gen3d.main, args, capsys)
    one_error_line(code, captured, "steps must be a whole number")  # not "distribution file optim.lr=... missing"


# --- 5. resuming with a setting that changes the checkpoint's shapes -----------------------------------------------


def test_resume_with_a_shape_setting_changed_says_which(tiny_model, refs, dist_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--images", refs, "--model", tiny_model, "--out", out, "steps=1", *FAST]
    assert run_cli(learn.main, args, capsys)[0] == 0
    saved = (out / "config.yaml").read_text()
    code, captured = run_cli(learn.main, ["--out", out, "resume=true", "steps=2", "prompt.num_prompts=8"], capsys)
    one_error_line(code, captured, "prompt.num_prompts is 8 but the run in")
    assert (out / "config.yaml").read_text() == saved

    out3d = tmp_path / "3d"
    assert run_cli(gen3d.main, ["--dist", dist_file, "--model", tiny_model, "--out", out3d, *SMALL], capsys)[0] == 0
    code, captured = run_cli(gen3d.main, ["--out", out3d, "resume=true", "field.hidden_dim=8"], capsys)
    one_error_line(code, captured, "field.hidden_dim is 8 but the run in")


# --- 6. a local model folder is recorded as an absolute path -------------------------------------------------------


def test_relative_model_path_is_recorded_absolute(tiny_model, dist_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    relative = f"./{tiny_model.name}"
    assert Backbone.load(relative).model_id == str(tiny_model.resolve())  # what distribution files record
    out = tmp_path / "2d"
    code, captured = run_cli(sample2d.main, ["--dist", dist_file, "--model", relative, "--out", out, "n=1",
                                             "steps=1"], capsys)  # fmt: skip
    assert code == 0, captured.err
    assert json.loads((out / "manifest.json").read_text())["settings"]["model"] == str(tiny_model.resolve())


# --- 7. the SDS timestep range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["guidance.max_step_percent=1.0", "guidance.max_step_percent_end=1.0", "guidance.min_step_percent=-0.1"]
)
def test_timestep_percents_are_checked_up_front(override, dist_file, tmp_path, capsys):
    out = tmp_path / "3d"
    code, captured = run_cli(gen3d.main, ["--dist", dist_file, "--out", out, *SMALL, override], capsys)
    one_error_line(code, captured, "guidance timesteps must satisfy")
    assert not out.exists()


@pytest.mark.parametrize("override", ["guidance.guidance_interval=[0.8,0.2]", "guidance.guidance_interval=[0,1.5]",
                                      "guidance.guidance_interval=[0.5]", "guidance.guidance_interval=0.5"])
def test_guidance_interval_is_checked_up_front(override, dist_file, tmp_path, capsys):
    out = tmp_path / "3d"
    code, captured = run_cli(gen3d.main, ["--dist", dist_file, "--out", out, *SMALL, override], capsys)
    one_error_line(code, captured, "guidance.guidance_interval must be")
    assert not out.exists()


def test_timestep_range_stays_inside_the_schedule(backbone):
    guidance = ScoreDistillation(backbone, min_step_percent=0.999, max_step_percent=0.9995)
    assert guidance.step_range(0) == (999, 999)


# --- 8. multi-class reference checkpoints ----------------------------------------------------------------------------


def test_multi_class_reference_checkpoints_are_refused(backbone, tiny_model, tmp_path, capsys):
    single = tmp_path / "single.pt"
    torch.save({"model_state_dict": {"module.ctx": torch.zeros(1, 3, 2, 32)}}, single)
    assert import_reference_checkpoint(single, backbone).ctx.shape == (3, 2, 32)
    multi = tmp_path / "multi.pt"
    torch.save({"model_state_dict": {"ctx": torch.zeros(2, 3, 2, 32)}}, multi)
    for index in (None, 1):
        with pytest.raises(UserError, match="2 classes .*class-name mode.*single-class checkpoints only"):
            import_reference_checkpoint(multi, backbone, class_index=index)
    code, captured = run_cli(sample2d.main, ["--dist", multi, "--model", tiny_model, "--class-index", 1], capsys)
    one_error_line(code, captured, "single-class checkpoints only")


# --- 9. checkpoints ordered by step number ---------------------------------------------------------------------------


def test_checkpoints_past_step_999999_sort_by_number(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        checkpoints.save(step, {"x": torch.tensor(step)})
    assert [p.name for p in checkpoints.paths()] == ["step-1000000.pt", "step-1000001.pt"]
    assert checkpoints.load_latest()["step"] == 1_000_001


# --- 10. file modes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_usual_mode(umask, tmp_path):
    previous = os.umask(umask)
    try:
        path = tmp_path / "d.safetensors"
        atomic_write(path, lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp)))  # safetensors makes 0600 files
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
