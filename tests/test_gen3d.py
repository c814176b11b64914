"""Stage 2: per-view prompt sampling, the CLI on CPU, resume equality, bad input, export of a run."""

import pytest
import torch
import trimesh
from omegaconf import OmegaConf

from dd3d.distribution import Gaussian, Mixture, PromptDistribution
from dd3d.gen3d import PromptNoise, export_main, main
from dd3d.view_prompts import VIEWS, ViewPrompts, negative_weights
from tests.conftest import run_cli

SMALL = [
    "steps=4", "camera.width=8", "camera.height=8", "renderer.num_steps=16", "occupancy.resolution=8",
    "occupancy.warmup_steps=2", "occupancy.update_every=2", "field.encoding.n_levels=2",
    "field.encoding.log2_hashmap_size=10", "field.hidden_dim=16", "validation.every=2", "validation.size=8",
    "validation.views=2", "checkpoint_every=2", "video.frames=2", "video.size=8", "export.resolution=16",
    "shading.albedo_steps=2",
]


@pytest.fixture(scope="module")
def dist_file(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "distribution.safetensors"
    ctx = torch.randn(6, 4, 32, generator=torch.Generator().manual_seed(0))
    PromptDistribution(ctx, "a", "house", str(backbone.model_id), backbone.fingerprint).save(path)
    return path


def cli(entry, args, capsys):
    code, captured = run_cli(entry, args, capsys)
    return code, captured.err


def test_view_prompts_use_the_view_template_and_empty_uncond(backbone, dist_file):
    cfg = OmegaConf.create({"dists": [str(dist_file)], "weights": None, "mix": "blend", "std_scale": [1.0],
                            "prefix": None, "suffix": None, "class_index": None})
    prompts = ViewPrompts.from_distributions(cfg, backbone)
    dist = PromptDistribution.load(dist_file)
    eps = torch.randn(2, 77, 32)
    cond, uncond = prompts.draw(["back", "overhead"], eps, torch.rand(2))
    for row, view, e in zip(cond, ["back", "overhead"], eps):
        expected = dist.fit(backbone, suffix=f"house, {view} view").apply(e[None])[0][0]
        assert torch.allclose(row, expected, atol=1e-5)
    assert torch.allclose(uncond[0], backbone.encode_text([""])[0])
    assert set(prompts.samplers) == set(VIEWS)


def test_view_negatives_are_the_same_draw_under_the_sectors_words(backbone, dist_file):
    cfg = OmegaConf.create({"dists": [str(dist_file)], "weights": None, "mix": "blend", "std_scale": [1.0],
                            "prefix": None, "suffix": None, "class_index": None})
    prompts = ViewPrompts.from_distributions(cfg, backbone)
    views, eps, uniforms = ["front", "side"], torch.randn(2, 77, 32), torch.rand(2)
    embeddings, weights = prompts.negatives(views, torch.tensor([0.0, 100.0]), eps, uniforms, 2.0)
    for i in range(2):
        for j, view in enumerate(("front", "side", "back")):
            assert torch.equal(embeddings[i, j], prompts.draw([view], eps[i : i + 1], uniforms[i : i + 1])[0][0])
    assert torch.equal(weights, negative_weights(torch.tensor([0.0, 100.0]), views, 2.0))


def test_a_negative_weighs_by_the_cameras_distance_from_its_view():
    azimuths = torch.tensor([0.0, 30.0, 90.0, -120.0, 180.0, 10.0])
    weights = negative_weights(azimuths, ["front", "front", "side", "side", "back", "overhead"], 1.0)
    expected = [  # columns: front, side, back
        [0.0, 1.0, 1.0],  # at the front: pushed from the side and the back in full
        [0.0, 1 / 3, 1.0],  # near the side sector: barely from the side
        [1.0, 0.0, 1.0],
        [1.0, 0.0, 1 / 3],
        [1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0],  # overhead: none
    ]
    assert torch.allclose(weights, torch.tensor(expected))


def gaussian_prompts() -> ViewPrompts:
    return ViewPrompts({view: Gaussian(torch.zeros(77, 8), torch.ones(77, 8)) for view in VIEWS}, torch.zeros(1, 77, 8))


def test_per_iteration_draws_differ_per_asset_draws_stay_close():
    cfg = OmegaConf.create({"prompt_draw": "auto", "num_samples": 1, "prompt_jitter": 0.3, "seed": 0,
                            "asset_spread": True, "asset_neighbours": 1})
    per_iteration = PromptNoise(cfg, 0, gaussian_prompts())
    a, _ = per_iteration.draw(1, torch.Generator().manual_seed(1))
    b, _ = per_iteration.draw(1, torch.Generator().manual_seed(2))
    assert per_iteration.mode == "per_iteration" and not torch.allclose(a, b)
    per_asset = [PromptNoise(OmegaConf.merge(cfg, {"num_samples": 2}), asset, gaussian_prompts()) for asset in (0, 1)]
    assert per_asset[0].mode == "per_asset"
    x, _ = per_asset[0].draw(1, torch.Generator().manual_seed(1))
    y, _ = per_asset[0].draw(1, torch.Generator().manual_seed(2))
    other, _ = per_asset[1].draw(1, torch.Generator().manual_seed(1))
    assert (x - y).std() < (x - other).std()  # jitter around one asset's draw, far from another asset's


@pytest.mark.parametrize("seed", range(5))
def test_assets_spread_over_the_mixture_cover_both_of_its_modes(seed):
    """Two modes whose prompts alternate by index (A B A B): two assets take one component from each mode, which
    independent draws do only half the time and systematic sampling in index order never does (A A or B B)."""
    modes = torch.stack([torch.full((77, 8), -1.0), torch.full((77, 8), 1.0)])
    mixture = Mixture([Gaussian(modes[i % 2] + 0.01 * i, torch.full((77, 8), 0.1)) for i in range(4)],
                      torch.full((4,), 0.25))
    prompts = ViewPrompts(dict.fromkeys(VIEWS, mixture), torch.zeros(1, 77, 8))
    cfg = OmegaConf.create({"prompt_draw": "auto", "num_samples": 2, "prompt_jitter": 0.3, "seed": seed,
                            "asset_spread": True, "asset_neighbours": 1})
    chosen = [mixture.apply(torch.zeros(1, 77, 8), PromptNoise(cfg, asset, prompts).asset_uniform[None])[1].item()
              for asset in (0, 1)]
    assert {index % 2 for index in chosen} == {0, 1}


def test_an_asset_drawing_from_its_neighbourhood_stays_in_its_mode():
    """Six prompts in two modes that alternate by index: with 3 neighbours an asset's steps use three prompts,
    all of its own mode (index neighbours would mix the modes)."""
    modes = torch.stack([torch.full((77, 8), -1.0), torch.full((77, 8), 1.0)])
    mixture = Mixture([Gaussian(modes[i % 2] + 0.01 * i, torch.full((77, 8), 0.1)) for i in range(6)],
                      torch.full((6,), 1 / 6))
    prompts = ViewPrompts(dict.fromkeys(VIEWS, mixture), torch.zeros(1, 77, 8))
    cfg = OmegaConf.create({"prompt_draw": "per_asset", "num_samples": 2, "prompt_jitter": 0.3, "seed": 0,
                            "asset_spread": True, "asset_neighbours": 3})
    for asset in (0, 1):
        noise = PromptNoise(cfg, asset, prompts)
        _, uniforms = noise.draw(64, torch.Generator().manual_seed(asset))
        used = set(mixture.apply(torch.zeros(64, 77, 8), uniforms)[1].tolist())
        assert len(used) == 3 and len({index % 2 for index in used}) == 1


def test_cli_runs_resumes_exactly_and_exports(tiny_model, dist_file, tmp_path, capsys):
    common = ["--dist", dist_file, "--model", tiny_model, *SMALL]
    code, err = cli(main, [*common, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    whole = tmp_path / "whole"
    for name in ("config.yaml", "train.log", "mesh.obj", "mesh.glb", "validation/step-000004.png"):
        assert (whole / name).is_file(), name
    assert (whole / "turntable.mp4").is_file() or (whole / "turntable.gif").is_file()
    assert len(trimesh.load(whole / "mesh.glb", force="mesh").faces) > 0

    assert cli(main, [*common, "--out", tmp_path / "split", "steps=2"], capsys)[0] == 0
    assert cli(main, ["--out", tmp_path / "split", "resume=true", "steps=4"], capsys)[0] == 0
    a = torch.load(whole / "checkpoints" / "step-000004.pt")["scene"]
    b = torch.load(tmp_path / "split" / "checkpoints" / "step-000004.pt")["scene"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (whole / "mesh.glb").unlink()
    code, err = cli(export_main, [whole, "--format", "glb", "--resolution", "12"], capsys)
    assert code == 0, err
    assert (whole / "mesh.glb").is_file()


def test_weight_average_is_the_mean_of_the_late_steps_and_resumes_exactly(tiny_model, dist_file, tmp_path, capsys):
    """optim.average_from=N: the asset is the mean of the weights after steps N+1..end; a split run holds the same
    average, and the evaluation and mesh export load it instead of the last step's weights."""
    from dd3d.gen3d import load_scene

    common = ["--dist", dist_file, "--model", tiny_model, *SMALL, "checkpoint_every=1", "keep_checkpoints=4",
              "export.formats=[]", "optim.average_from=1"]
    assert cli(main, [*common, "--out", tmp_path / "whole"], capsys)[0] == 0
    states = [torch.load(tmp_path / "whole" / "checkpoints" / f"step-{s:06d}.pt") for s in (2, 3, 4)]
    average = states[-1]["average"]
    assert average["count"] == 3
    keys = list(average["mean"])
    for key in keys:
        mean = sum(state["scene"][key] for state in states) / 3
        assert torch.allclose(average["mean"][key], mean, atol=1e-6), key
    assert any(not torch.allclose(average["mean"][k], states[-1]["scene"][k]) for k in keys)

    assert cli(main, [*common, "--out", tmp_path / "split", "steps=2"], capsys)[0] == 0
    assert cli(main, ["--out", tmp_path / "split", "resume=true", "steps=4"], capsys)[0] == 0
    split = torch.load(tmp_path / "split" / "checkpoints" / "step-000004.pt")["average"]
    assert split["count"] == 3 and all(torch.equal(split["mean"][k], average["mean"][k]) for k in keys)

    scene, _ = load_scene(tmp_path / "whole" / "checkpoints" / "step-000004.pt")
    loaded = dict(scene.named_parameters())
    assert all(torch.equal(loaded[k].detach(), average["mean"][k]) for k in keys)


def test_plain_prompt_and_several_assets(tiny_model, tmp_path, capsys):
    args = ["--prompt", "a red house", "--model", tiny_model, "--num-samples", "2", "--out", tmp_path / "two",
            *SMALL, "steps=1", "export.formats=[]", "view_negative=1"]
    code, err = cli(main, args, capsys)
    assert code == 0, err
    assert (tmp_path / "two" / "sample-0" / "checkpoints").is_dir()
    assert (tmp_path / "two" / "sample-1" / "config.yaml").is_file()


def test_asset_shared_blends_in_a_fresh_draw_of_the_whole_distribution(tiny_model, dist_file, tmp_path, capsys,
                                                                     monkeypatch):
    """With --num-samples and asset_shared, each step's guidance also gets a draw that changes every step (the
    whole distribution's), while the asset's own stays close; a single asset drawing afresh every step
    (prompt_draw=per_iteration) gets none, one that keeps its own draw (per_asset) gets it too, a plain prompt none."""
    from dd3d import sds

    seen = []
    original = sds.ScoreDistillation.__call__

    def spy(self, rgb, cond, uncond, iteration, generator, opacity=None, negatives=None, shared=None):
        seen.append((cond.clone(), shared))
        return original(self, rgb, cond, uncond, iteration, generator, opacity, negatives, shared)

    monkeypatch.setattr(sds.ScoreDistillation, "__call__", spy)
    common = ["--dist", dist_file, "--model", tiny_model, *SMALL, "steps=2", "export.formats=[]", "asset_shared=0.5",
              "camera.batch_size=1"]
    assert cli(main, [*common, "--num-samples", "2", "--out", tmp_path / "two"], capsys)[0] == 0
    (own_a, (shared_a, weight)), (own_b, (shared_b, _)) = seen[:2]  # the first asset's two steps
    assert weight == 0.5
    assert (shared_a - shared_b).norm() > 2 * (own_a - own_b).norm()
    seen.clear()
    assert cli(main, [*common, "prompt_draw=per_iteration", "--out", tmp_path / "one"], capsys)[0] == 0
    assert all(shared is None for _, shared in seen)
    seen.clear()
    assert cli(main, [*common, "prompt_draw=per_asset", "--out", tmp_path / "own"], capsys)[0] == 0
    assert all(shared is not None for _, shared in seen)
    seen.clear()  # a plain prompt has nothing to share: no extra guidance for it
    text = ["--prompt", "a red car", *common[2:], "prompt_draw=per_asset", "--out", tmp_path / "text"]
    assert cli(main, text, capsys)[0] == 0
    assert seen and all(shared is None for _, shared in seen)


def test_perp_neg_weight_changes_after_its_steps(tiny_model, dist_file, tmp_path, capsys, monkeypatch):
    """view_negative_steps N: Perp-Neg at view_negative in the first N steps, at view_negative_late afterwards (0:
    no negatives evaluated at all)."""
    from dd3d import sds

    seen = []
    original = sds.ScoreDistillation.__call__

    def spy(self, rgb, cond, uncond, iteration, generator, opacity=None, negatives=None, shared=None):
        seen.append(None if negatives is None else float(negatives[1].max()))
        return original(self, rgb, cond, uncond, iteration, generator, opacity, negatives, shared)

    monkeypatch.setattr(sds.ScoreDistillation, "__call__", spy)
    common = ["--dist", dist_file, "--model", tiny_model, *SMALL, "export.formats=[]", "camera.azimuth_range=[0,1]",
              "view_negative=1", "view_negative_steps=2"]  # front cameras: the back view is a full-weight negative
    assert cli(main, [*common, "view_negative_late=0", "--out", tmp_path / "off"], capsys)[0] == 0
    assert seen == [1.0, 1.0, None, None]
    seen.clear()
    assert cli(main, [*common, "view_negative_late=0.25", "--out", tmp_path / "late"], capsys)[0] == 0
    assert seen == [1.0, 1.0, 0.25, 0.25]


def test_fp16_model_trains_the_fp32_scene_on_cpu(tiny_model, dist_file, tmp_path, capsys):
    """The GPU setting (fp16 UNet and VAE, fp32 field and render) runs end to end on CPU."""
    args = ["--dist", dist_file, "--model", tiny_model, "--out", tmp_path / "half", *SMALL, "dtype=fp16",
            "export.formats=[]"]
    code, err = cli(main, args, capsys)
    assert code == 0, err
    start = torch.load(tmp_path / "half" / "checkpoints" / "step-000002.pt")["scene"]
    scene = torch.load(tmp_path / "half" / "checkpoints" / "step-000004.pt")["scene"]
    floats = [k for k, v in scene.items() if v.is_floating_point()]
    assert all(scene[k].dtype == torch.float32 and scene[k].isfinite().all() for k in floats)
    assert any(not torch.equal(start[k], scene[k]) for k in floats)  # the field kept learning


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "either --dist"),
        (["camera.elevation_range=[50,10]"], "impossible camera ranges"),
        (["camera.distance_range=[0.5,0.8]"], "impossible camera ranges"),
        (["dtype=fp8"], "dtype must be auto, fp32, fp16 or bf16"),
        (["camera.light_direction=[1,0]"], "light_direction must be null or a non-zero [x, y, z]"),
        (["renderer.ambient=-0.1"], "renderer.ambient"),
        (["loss.sparsity=-1"], "loss.sparsity"),
    ],
)
def test_bad_input(args, message, tiny_model, tmp_path, capsys):
    code, err = cli(main, ["--model", tiny_model, "--out", tmp_path / "run", *args,
                           *(["--prompt", "a house"] if args else [])], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_other_text_encoder_is_refused(tiny_model_v, dist_file, tmp_path, capsys):
    code, err = cli(main, ["--dist", dist_file, "--model", tiny_model_v, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "learned for the text encoder" in err


def test_nan_stops_and_keeps_the_last_good_checkpoint(tiny_model, dist_file, tmp_path, capsys, monkeypatch):
    from dd3d import sds

    original = sds.ScoreDistillation.__call__

    def poisoned(self, *args, **kwargs):
        loss, info = original(self, *args, **kwargs)
        iteration = args[3]
        return (loss * float("nan") if iteration == 2 else loss), info

    monkeypatch.setattr(sds.ScoreDistillation, "__call__", poisoned)
    code, err = cli(main, ["--dist", dist_file, "--model", tiny_model, "--out", tmp_path / "run", *SMALL], capsys)
    assert code == 2 and "loss became nan at step 3" in err and "step-000002.pt is kept" in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002.pt"]


def test_lights_follow_the_camera_or_stay_fixed_in_the_world():
    """DreamFusion's default: each light sits near its camera; with camera.light_direction a distant light stays on
    that side of the world whichever way the camera looks (front and back views lit from the same side)."""
    from dd3d.cli import CONFIG_DIR, load_config
    from dd3d.gen3d import light_positions
    from dd3d.nerf import orbit_cameras

    cfg = load_config("gen3d.yaml", None, []).camera
    cameras = orbit_cameras(2, 15.0, 1.8, 50.0)  # azimuth 0 (front, +X) and 180 (back)
    near = light_positions(cameras, cfg, torch.Generator().manual_seed(0))
    assert (torch.nn.functional.cosine_similarity(near, cameras.positions) > 0.5).all()
    fixed = load_config("gen3d.yaml", None, ["camera.light_direction=[1,0,1]"], base=CONFIG_DIR / "gen3d_cpu.yaml")
    far = light_positions(cameras, fixed.camera, torch.Generator().manual_seed(0))
    assert (far.norm(dim=-1) > 50).all() and (far[:, 0] > 0).all()  # both lit from the front, from far away
