"""Soft prompts through the frozen CLIP text encoder: `[BOS] prefix [ctx x n_ctx] suffix [EOS] pad...`."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from dd3d.cli import UserError


class SoftPromptEncoder:
    """Encodes learned context vectors placed inside a fixed text template.

    `__call__(ctx)` with ctx (K, n_ctx, d) returns the encoder's last hidden state (K, 77, d) after the final layer
    norm -- what conditions the UNet -- and the pooled features at the EOS position (K, d).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, n_ctx: int, prefix="", suffix=""):
        self.text_encoder = text_encoder
        self.n_ctx = n_ctx
        self.prefix, self.suffix = prefix, suffix
        prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
        suffix_ids = tokenizer(suffix, add_special_tokens=False).input_ids
        length = tokenizer.model_max_length
        used = 2 + len(prefix_ids) + n_ctx + len(suffix_ids)
        if used > length:
            raise UserError(
                f"template '{prefix} [ctx x {n_ctx}] {suffix}' needs {used} tokens, "
                f"more than the text encoder's {length}"
            )
        placeholder = tokenizer.pad_token_id
        ids = [tokenizer.bos_token_id, *prefix_ids, *([placeholder] * n_ctx), *suffix_ids, tokenizer.eos_token_id]
        ids += [tokenizer.pad_token_id] * (length - len(ids))
        self.input_ids = torch.tensor(ids)
        self.ctx_start = 1 + len(prefix_ids)
        self.eos_index = used - 1

    def __call__(self, ctx: torch.Tensor, fixed_tokens_positioned_twice: bool = False):
        encoder = self.text_encoder
        device, dtype = encoder.device, encoder.dtype
        count = ctx.shape[0]
        ids = self.input_ids.to(device)
        fixed = encoder.embeddings.token_embedding(ids).unsqueeze(0).expand(count, -1, -1)
        if fixed_tokens_positioned_twice:
            fixed = fixed + self._reference_extra_positions(encoder)
        start, end = self.ctx_start, self.ctx_start + self.n_ctx
        tokens = torch.cat([fixed[:, :start], ctx.to(device, dtype), fixed[:, end:]], dim=1)
        hidden = encoder.embeddings(inputs_embeds=tokens)
        mask = create_causal_mask(
            config=encoder.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None
        )
        hidden = encoder.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = encoder.final_layer_norm(hidden)
        return hidden, hidden[:, self.eos_index]

    def _reference_extra_positions(self, encoder) -> torch.Tensor:
        """The position embeddings the reference DreamDistribution code adds to fixed tokens before its encoder adds
        them again: prefix tokens at their own index, the tokens after ctx at their index within the separately
        tokenized suffix (1 = the first token after BOS). Checkpoints it trained only work under this encoding."""
        length = len(self.input_ids)
        index = torch.arange(length)
        ctx_end = self.ctx_start + self.n_ctx
        index = torch.where(index >= ctx_end, index - ctx_end + 1, index).to(encoder.device)
        return encoder.embeddings.position_embedding(index).unsqueeze(0)
