"""The 2D path: sampling statistics, mixing, fixed noise, manifests, reference import, --describe, bad input."""

import json
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers.masking_utils import create_causal_mask

from dd3d.cli import UserError
from dd3d.distribution import (
    Gaussian,
    Mixture,
    PromptDistribution,
    blend,
    build_sampler,
    import_reference_checkpoint,
)
from dd3d.sample2d import describe, main, prompt_noise, regenerate, sample, stratified_uniform
from tests.conftest import run_cli

CFG = OmegaConf.load("configs/sample2d.yaml")


def config(**overrides):
    cfg = OmegaConf.merge(CFG, OmegaConf.create({"steps": 2, "n": 3, "batch_size": 2, **overrides}))
    return cfg


@pytest.fixture(scope="module")
def dist_files(backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dists")
    paths = []
    for seed in range(2):
        ctx = torch.randn(6, 4, 32, generator=torch.Generator().manual_seed(seed))
        path = folder / f"d{seed}.safetensors"
        PromptDistribution(ctx, "a", "house", str(backbone.model_id), backbone.fingerprint).save(path)
        paths.append(str(path))
    return paths


def draws(sampler, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = sampler.components[0].mean.shape if isinstance(sampler, Mixture) else sampler.mean.shape
    return sampler.apply(torch.randn(n, *shape, generator=generator), torch.rand(n, generator=generator))[0]


def test_std_scale_zero_and_scaling(backbone, dist_files):
    zero = build_sampler(config(dists=dist_files[:1], std_scale=[0.0]), backbone)
    samples = draws(zero, 3)
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[1], samples[2])
    one = draws(build_sampler(config(dists=dist_files[:1], std_scale=[1.0]), backbone), 4000)
    two = draws(build_sampler(config(dists=dist_files[:1], std_scale=[2.0]), backbone), 4000)
    assert torch.allclose(two.std(0), 2 * one.std(0), rtol=1e-4, atol=1e-6)  # same eps: exactly twice the spread


def test_blend_and_mixture_moments():
    a = Gaussian(torch.full((77, 2), 1.0), torch.full((77, 2), 0.5))
    b = Gaussian(torch.full((77, 2), -3.0), torch.full((77, 2), 2.0))
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    blended = blend([a, b.scaled(2.0)], w)
    assert torch.allclose(blended.mean, torch.full((77, 2), 0.7 * 1 - 0.3 * 3))
    assert torch.allclose(blended.std, torch.full((77, 2), ((0.7 * 0.5) ** 2 + (0.3 * 4.0) ** 2) ** 0.5))
    x = draws(blended, 20000)
    assert abs(x.mean() - (-0.2)) < 0.02 and abs(x.std() - blended.std[0, 0]) < 0.02

    mixture = Mixture([a, b], w.float())
    x = draws(mixture, 20000)[:, 0, 0]
    chosen = mixture.apply(torch.zeros(20000, 77, 2), torch.rand(20000, generator=torch.Generator().manual_seed(1)))[1]
    assert abs(chosen.float().mean() - 0.3) < 0.015  # component b picked with probability 0.3
    mean = 0.7 * 1 + 0.3 * -3
    second = 0.7 * (0.25 + 1) + 0.3 * (4 + 9)
    assert abs(x.mean() - mean) < 0.05
    assert abs(x.var() - (second - mean**2)) < 0.1


def test_stratified_images_draw_components_in_proportion():
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    mixture = Mixture([Gaussian(torch.full((77, 2), float(k)), torch.zeros(77, 2)) for k in range(4)], weights)

    def counts(stratify, n):
        cfg = config(n=n, seed=3, stratify=stratify)
        uniforms = torch.stack([stratified_uniform(cfg, mixture, i, prompt_noise(cfg, i, (77, 2))[1]) for i in range(n)])
        return mixture.apply(torch.zeros(n, 77, 2), uniforms)[1]

    stratified, independent = counts(True, 1000), counts(False, 1000)
    error = lambda chosen: (torch.bincount(chosen, minlength=4) - 1000 * weights).abs().max()  # noqa: E731
    assert error(stratified) <= 3 and error(independent) > 6  # independent draws: binomial noise of ~13 images
    assert torch.equal(counts(True, 50), stratified[:50])  # image i's component does not depend on n


def test_fixed_noise_shares_eps_across_edits(backbone, dist_files):
    base = dict(dists=dist_files[:1], seed=5)
    fixed_a = prompt_noise(config(**base, fixed_noise=True), 2, (77, 32))[0]
    fixed_b = prompt_noise(config(**base, fixed_noise=True, prefix="a photo of", std_scale=[2.0]), 2, (77, 32))[0]
    free_a = prompt_noise(config(**base), 2, (77, 32))[0]
    free_b = prompt_noise(config(**base, prefix="a photo of"), 2, (77, 32))[0]
    assert torch.equal(fixed_a, fixed_b) and not torch.equal(free_a, free_b)
    assert not torch.equal(fixed_a, prompt_noise(config(**base, fixed_noise=True), 3, (77, 32))[0])


def test_fixed_noise_reproduces_images_and_manifest_regenerates(backbone, dist_files, tmp_path):
    first = sample(config(dists=dist_files[:1], fixed_noise=True, out=str(tmp_path / "a"), n=3, batch_size=2))
    second = sample(config(dists=dist_files[:1], fixed_noise=True, out=str(tmp_path / "b"), n=2, batch_size=1))
    for name in ("0000.png", "0001.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert [e["file"] for e in manifest["images"]] == ["0000.png", "0001.png", "0002.png"]
    assert (first / "grid.png").is_file()
    again = np.asarray(regenerate(first / "manifest.json", 2, backbone), dtype=np.int16)
    original = np.asarray(Image.open(first / "0002.png"), dtype=np.int16)
    assert np.abs(again - original).max() <= 1
    del manifest["settings"]["dtype"]  # a manifest written before the setting existed
    (tmp_path / "old.json").write_text(json.dumps(manifest))
    again = np.asarray(regenerate(tmp_path / "old.json", 2), dtype=np.int16)  # opens the model itself
    assert np.abs(again - original).max() <= 1


def test_manifests_from_before_the_guidance_interval_regenerate_their_images(backbone, dist_files, tmp_path):
    every_step = sample(config(dists=dist_files[:1], steps=4, n=1, guidance_interval=[0.0, 1.0], out=str(tmp_path)))
    interval = sample(config(dists=dist_files[:1], steps=4, n=1, out=str(tmp_path / "interval")))
    original = np.asarray(Image.open(every_step / "0000.png"), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(interval / "0000.png"), dtype=np.int16) - original).max() > 8  # t=751 differs
    manifest = json.loads((every_step / "manifest.json").read_text())
    del manifest["settings"]["guidance_interval"]
    (tmp_path / "old.json").write_text(json.dumps(manifest))
    assert np.abs(np.asarray(regenerate(tmp_path / "old.json", 0, backbone), dtype=np.int16) - original).max() <= 1


def test_reference_import_matches_the_reference_encoding(backbone, tmp_path):
    ctx = torch.randn(1, 5, 2, 32) * 0.1
    path = tmp_path / "final-1000.pt"
    torch.save({"model_state_dict": {"module._orig_mod.ctx": ctx}, "step": 1000}, path)
    dist = import_reference_checkpoint(path, backbone, prefix="a", suffix="red house")
    assert dist.reference_positions and torch.equal(dist.ctx, ctx[0])

    # The reference's encoding, re-derived: fixed-token embeddings already carry position embeddings (prefix at
    # its own positions, suffix at its positions within its own tokenisation), and the encoder adds them again.
    tok, enc = backbone.tokenizer, backbone.text_encoder
    emb = enc.embeddings
    prefix_ids = tok("a", padding="max_length", max_length=77, return_tensors="pt").input_ids
    suffix_ids = tok("red house", padding="max_length", max_length=77, return_tensors="pt").input_ids
    p = int((prefix_ids[0] == tok.eos_token_id).nonzero()[0])
    prefix_emb = emb(input_ids=prefix_ids)[:, :p]
    suffix_emb = emb(input_ids=suffix_ids)[:, 1 : 77 - 2 - p + 1]
    tokens = torch.cat([prefix_emb.expand(5, -1, -1), ctx[0], suffix_emb.expand(5, -1, -1)], dim=1)
    hidden = emb(inputs_embeds=tokens)
    mask = create_causal_mask(config=enc.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    hidden = enc.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    hidden = enc.final_layer_norm(hidden)
    ours, _ = dist.encoder(backbone)(dist.ctx, fixed_tokens_positioned_twice=True)
    assert torch.allclose(ours, hidden, atol=1e-5)
    plain, _ = dist.encoder(backbone)(dist.ctx)
    assert not torch.allclose(plain, hidden, atol=1e-3)  # the quirk matters: standard encoding differs


def test_reference_import_errors(backbone, tmp_path):
    multi = tmp_path / "multi.pt"
    torch.save({"ctx": torch.zeros(3, 4, 2, 32)}, multi)
    with pytest.raises(UserError, match="3 classes"):
        import_reference_checkpoint(multi, backbone)
    with pytest.raises(UserError, match="single-class checkpoints only"):  # class-name mode is not supported
        import_reference_checkpoint(multi, backbone, class_index=2)
    wide = tmp_path / "wide.pt"
    torch.save({"ctx": torch.zeros(1, 4, 2, 1024)}, wide)
    with pytest.raises(UserError, match="width 1024"):
        import_reference_checkpoint(wide, backbone)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        import_reference_checkpoint(junk, backbone)


def test_describe_finds_known_tokens(backbone):
    ids = backbone.tokenizer("castle dragon", add_special_tokens=False).input_ids
    table = backbone.text_encoder.embeddings.token_embedding.weight.detach()
    ctx = table[ids].unsqueeze(0).repeat(3, 1, 1)
    dist = PromptDistribution(ctx, "", "", "tiny", backbone.fingerprint)
    words = describe(dist, backbone, topk=2)
    assert [position[0][0] for position in words] == ["castle", "dragon"]
    assert words[0][0][1] == pytest.approx(1.0, abs=1e-5)


def cli(args, capsys):
    return run_cli(main, args, capsys)


def test_cli_describe_and_sample(tiny_model, dist_files, tmp_path, capsys):
    code, out = cli(["--dist", dist_files[0], "--model", tiny_model, "--describe"], capsys)
    assert code == 0 and "ctx[3]:" in out.out
    code, out = cli(["--dist", *dist_files, "--weights", "0.7", "0.3", "--mix", "mixture", "--model", tiny_model,
                     "--n", "2", "--steps", "2", "--out", tmp_path / "mix"], capsys)
    assert code == 0, out.err
    settings = json.loads((tmp_path / "mix" / "manifest.json").read_text())["settings"]
    assert settings["mix"] == "mixture" and settings["weights"] == [0.7, 0.3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "1"], "1 weights given for 2 distributions"),
        (["--weights", "1", "-1"], "non-negative"),
        (["--weights", "0", "0"], "must not all be zero"),
        (["--std-scale", "-1"], "must not be negative"),
        (["--prefix", "word " * 80], "needs .* tokens"),
        (["guidance_interval=[0.7,0.2]"], "guidance_interval must be \\[low, high\\] with 0 <= low <= high <= 1"),
    ],
)
def test_cli_bad_input(extra, message, tiny_model, dist_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, captured = cli(["--dist", *dist_files, "--model", tiny_model, "--out", out, "--steps", "1", *extra], capsys)
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err), captured.err
    assert not out.exists()


def test_cli_bad_files(tiny_model, tiny_model_v, dist_files, tmp_path, capsys):
    code, captured = cli(["--dist", tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and "does not exist" in captured.err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    code, captured = cli(["--dist", corrupt, "--model", tiny_model], capsys)
    assert code == 2 and "not a readable" in captured.err
    code, captured = cli(["--dist", dist_files[0], "--model", tiny_model_v, "--n", "1"], capsys)
    assert code == 2 and "learned for the text encoder" in captured.err


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_model_samples_like_fp32(dist_files, tmp_path, dtype):
    """`dtype` loads the frozen model in half precision (fp16 is the CUDA default); the images barely change."""
    common = {"dists": dist_files[:1], "fixed_noise": True, "n": 2, "batch_size": 2}
    folders = [sample(config(**common, dtype=name, out=str(tmp_path / name))) for name in ("fp32", dtype)]
    full, half = (np.asarray(Image.open(folder / "0001.png"), dtype=np.float32) for folder in folders)
    assert np.abs(full - half).mean() < 3  # of 255; measured 0.1 (fp16) and 1.0 (bf16)
    with pytest.raises(UserError, match="dtype must be"):
        sample(config(**common, dtype="half", out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()
