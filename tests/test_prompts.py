import pytest
import torch

from dd3d.cli import UserError
from dd3d.prompts import SoftPromptEncoder


def test_soft_prompt_of_real_words_equals_plain_encoding(backbone):
    """ctx set to the embeddings of real words must give exactly what the text encoder gives for that text."""
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    words = tokenizer("red wooden", add_special_tokens=False).input_ids
    soft = SoftPromptEncoder(tokenizer, encoder, n_ctx=len(words), prefix="a photo of a", suffix="house at night")
    ctx = encoder.embeddings.token_embedding.weight[words].unsqueeze(0)
    hidden, eos = soft(ctx)
    expected = backbone.encode_text(["a photo of a red wooden house at night"])
    assert hidden.shape == (1, 77, encoder.config.hidden_size)
    ids = tokenizer("a photo of a red wooden house at night").input_ids
    n = len(ids)  # positions after EOS hold padding that both paths fill identically only up to EOS
    assert torch.allclose(hidden[:, :n], expected[:, :n], atol=1e-5)
    assert torch.allclose(eos, expected[:, n - 1], atol=1e-5)


def test_shapes_and_template_positions(backbone):
    soft = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="a photo of", suffix="")
    assert soft.ctx_start == 4 and soft.eos_index == 8
    hidden, eos = soft(torch.randn(5, 4, 32) * 0.02)
    assert hidden.shape == (5, 77, 32) and eos.shape == (5, 32)


def test_reference_positioning_differs(backbone):
    soft = SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=2, prefix="a", suffix="b")
    ctx = torch.randn(2, 2, 32)
    plain, _ = soft(ctx)
    quirk, _ = soft(ctx, fixed_tokens_positioned_twice=True)
    assert not torch.allclose(plain, quirk)


def test_template_too_long(backbone):
    with pytest.raises(UserError, match="needs .* tokens"):
        SoftPromptEncoder(backbone.tokenizer, backbone.text_encoder, n_ctx=4, prefix="word " * 80)
